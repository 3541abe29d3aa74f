"""Reader of the RGB part of Eyecandies (MemKD Table 2b uses colour images only).

    <root>/<Category>/train/data/NNN_image_K.png        normal only (1000 per category)
    <root>/<Category>/val/data/...                      (not used)
    <root>/<Category>/test_public/data/NNN_image_K.png  25 normal + 25 anomalous
    <root>/<Category>/test_public/data/NNN_metadata.yaml
    <root>/<Category>/test_public/data/NNN_mask.png

This is the layout `pipelime -m eyecandies ec-get` and the per-category archives produce
(category folders such as `CandyCane`, one Pipelime "underfolder" per split). Every sample is
rendered under six lights, `K` = 0 all spotlights, 1-4 a single spotlight (bottom, right, top,
left), 5 global light box; `data.eyecandies_light` picks one (default 0; the MemKD paper does
not say which it used, Eyecandies' own anomalib converter defaults to 5).

Labels: the release documents `metadata` as "image-level anomaly classification labels", and
its own tools select normal test samples with the query `metadata.anomalous == 0`, so the
reader takes `anomalous: 0|1` (or false/true) from `NNN_metadata.yaml`. `NNN_mask.png` is the
pixel-wise OR of the per-type masks (bumps, dents, colors, normals); there is no single defect
type per image, so anomalous images get the defect `anomaly`. The training split is anomaly-free
by construction and is read without metadata. Only `test_public` has labels and masks
(`test_private` is scored by the dataset authors), so results here are on the public test set.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from memkd_ray.config import DataConfig
from memkd_ray.data.benchmarks import Benchmark, register_benchmark
from memkd_ray.data.reading import CategoryData, categories_with, category_dir, require_dir
from memkd_ray.data.sample import Sample
from memkd_ray.errors import DataError

DEFECTS = ("good", "anomaly")


def list_eyecandies_categories(root: Path) -> list[str]:
    """Sub-directories of root that look like categories (they have train/data)."""
    return categories_with(root, "train/data")


def read_eyecandies_category(
    root: Path,
    category: str,
    benchmark: str = "eyecandies",
    light: int = DataConfig.eyecandies_light,
    with_test: bool = True,
) -> CategoryData:
    """Normal training renders from train, labelled renders with masks from test_public."""
    base = category_dir(root, category, list_eyecandies_categories)
    train = [Sample(p, 0, DEFECTS[0]) for p in _renders(base / "train", light)]
    if not with_test:
        return CategoryData(benchmark, category, train, [])
    test = [_test_sample(p, light) for p in _renders(base / "test_public", light)]
    return CategoryData(benchmark, category, train, test)


def _renders(split_dir: Path, light: int) -> list[Path]:
    data = require_dir(split_dir / "data", f"{split_dir.name} split directory")
    images = sorted(data.glob(f"*_image_{light}.png"))
    if not images:
        raise DataError(f"{data}: no *_image_{light}.png images (data.eyecandies_light={light})")
    return images


def _test_sample(image: Path, light: int) -> Sample:
    prefix = image.name.removesuffix(f"_image_{light}.png")
    label = _anomalous(image.with_name(f"{prefix}_metadata.yaml"))
    if not label:
        return Sample(image, 0, DEFECTS[0])
    mask = image.with_name(f"{prefix}_mask.png")
    if not mask.is_file():
        raise DataError(f"{mask}: ground-truth mask of {image} not found")
    return Sample(image, 1, DEFECTS[1], mask)


def _anomalous(path: Path) -> int:
    """The image-level label from a sample's metadata file."""
    try:
        metadata = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: metadata file not found") from None
    except yaml.YAMLError:
        raise DataError(f"{path}: invalid YAML") from None
    value = metadata.get("anomalous") if isinstance(metadata, dict) else None
    if value not in (0, 1):
        raise DataError(f"{path}: no `anomalous: 0|1` field")
    return int(value)


register_benchmark(("eyecandies",), Benchmark(list_eyecandies_categories, read_eyecandies_category,
                                                {"light": "eyecandies_light"}))
