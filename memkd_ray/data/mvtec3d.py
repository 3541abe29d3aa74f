"""Reader of the RGB part of MVTec 3D-AD (MemKD Table 2a uses colour images only).

    <root>/<category>/train/good/rgb/NNN.png
    <root>/<category>/validation/good/rgb/NNN.png      (not used)
    <root>/<category>/test/<defect>/rgb/NNN.png
    <root>/<category>/test/<defect>/gt/NNN.png         (same name as its image)

Point clouds (`xyz/`) are ignored. The validation split is left out so that training sees the
same normal images as the paper's protocol (train/good). `test/good/gt` masks are all zero,
so good test images are read as normal without them.
"""

from __future__ import annotations

from pathlib import Path

from memkd_ray.data.sample import Sample
from memkd_ray.data.splits import (
    CategoryData,
    categories_with,
    category_dir,
    require_dir,
    require_images,
)
from memkd_ray.errors import DataError

NORMAL = "good"


def list_mvtec3d_categories(root: Path) -> list[str]:
    """Sub-directories of root that look like categories (they have train/good/rgb)."""
    return categories_with(root, f"train/{NORMAL}/rgb")


def read_mvtec3d_category(
    root: Path, category: str, benchmark: str = "mvtec3d", with_test: bool = True
) -> CategoryData:
    """RGB training images from train/good; RGB test images of every defect with their gt."""
    base = category_dir(root, category, list_mvtec3d_categories)
    train_dir = base / "train" / NORMAL / "rgb"
    train = [Sample(p, 0, NORMAL) for p in require_images(train_dir, "training")]
    if not with_test:
        return CategoryData(benchmark, category, train, [])
    test_dir = require_dir(base / "test", "test directory")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        test.extend(_test_samples(defect_dir))
    if not test:
        raise DataError(f"{test_dir}: no test images")
    return CategoryData(benchmark, category, train, test)


def _test_samples(defect_dir: Path) -> list[Sample]:
    defect = defect_dir.name
    images = require_images(defect_dir / "rgb", f"{defect} test")
    if defect == NORMAL:
        return [Sample(p, 0, NORMAL) for p in images]
    samples = []
    for image in images:
        mask = defect_dir / "gt" / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"{mask}: ground-truth mask of {image} not found")
        samples.append(Sample(image, 1, defect, mask))
    return samples
