"""Reader of a plain folder benchmark: your own good and bad images, masks optional.

    <root>/<category>/good/*          normal images, split into train and test
    <root>/<category>/bad/*           anomalous images, test only
    <root>/<category>/masks/<name>_mask.png  or  <name>.png   (optional, per bad image)

A share `data.folder_test_fraction` of the good images (at least one) is held out for testing,
drawn with a fixed seed from the sorted file names, so every run and every training seed
evaluates on the same images. Bad images without a mask are allowed: they still count for the
image metrics, but the pixel metrics (computed over the masks they are given) treat such an
image as all-normal pixels, which lowers P-AUROC, P-AP and AU-PRO. Give masks for every bad
image or for none; with none, the pixel metrics are n/a. `memkd-ray data check` reports how
many bad images lack a mask.
"""

from __future__ import annotations

import random
from pathlib import Path

from memkd_ray.config import DataConfig
from memkd_ray.data.benchmarks import Benchmark, register_benchmark
from memkd_ray.data.reading import (
    CategoryData,
    categories_with,
    category_dir,
    require_images,
)
from memkd_ray.data.sample import Sample
from memkd_ray.errors import DataError

NORMAL, ANOMALOUS = "good", "bad"
SPLIT_SEED = 0
"""Fixed on purpose: the held-out images must not move with `train.seed`."""


def list_folder_categories(root: Path) -> list[str]:
    """Sub-directories of root that look like categories (they have good/)."""
    return categories_with(root, NORMAL)


def read_folder_category(
    root: Path,
    category: str,
    benchmark: str = "folder",
    test_fraction: float = DataConfig.folder_test_fraction,
    with_test: bool = True,
) -> CategoryData:
    """Seeded train/test split of good/, plus bad/ with whatever masks exist."""
    base = category_dir(root, category, list_folder_categories)
    good = require_images(base / NORMAL, "normal")
    held_out = _held_out(good, test_fraction, base / NORMAL)
    train = [Sample(p, 0, NORMAL) for i, p in enumerate(good) if i not in held_out]
    if not with_test:
        return CategoryData(benchmark, category, train, [])
    bad = require_images(base / ANOMALOUS, "anomalous")
    test = [Sample(good[i], 0, NORMAL) for i in sorted(held_out)]
    test += [Sample(p, 1, ANOMALOUS, _mask(base / "masks", p)) for p in bad]
    return CategoryData(benchmark, category, train, test)


def _held_out(good: list[Path], test_fraction: float, where: Path) -> set[int]:
    count = max(1, round(test_fraction * len(good)))
    if count >= len(good):
        raise DataError(
            f"{where}: {len(good)} normal images leave none for training at "
            f"data.folder_test_fraction={test_fraction}"
        )
    return set(random.Random(SPLIT_SEED).sample(range(len(good)), count))


def _mask(masks: Path, image: Path) -> Path | None:
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        if (masks / name).is_file():
            return masks / name
    return None


register_benchmark(("folder",), Benchmark(list_folder_categories, read_folder_category,
                                            {"test_fraction": "folder_test_fraction"}))
