"""Reader of the MVTec AD layout, shared by MPDD and the synthetic benchmark.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/<name>.png
    <root>/<category>/ground_truth/<defect>/<name>_mask.png
"""

from __future__ import annotations

from pathlib import Path

from memkd_ray.data.sample import Sample, list_images
from memkd_ray.data.splits import (
    CategoryData,
    categories_with,
    category_dir,
    require_dir,
    require_images,
)
from memkd_ray.errors import DataError

NORMAL = "good"


def list_mvtec_categories(root: Path) -> list[str]:
    """Sub-directories of root that look like categories (they have train/good)."""
    return categories_with(root, f"train/{NORMAL}")


def read_mvtec_category(
    root: Path, category: str, benchmark: str = "mvtec", with_test: bool = True
) -> CategoryData:
    """Training images from train/good; test images of every defect with their masks."""
    base = category_dir(root, category, list_mvtec_categories)
    train_dir = base / "train" / NORMAL
    train = [Sample(p, 0, NORMAL) for p in require_images(train_dir, "training")]
    if not with_test:
        return CategoryData(benchmark, category, train, [])
    test_dir = require_dir(base / "test", "test directory")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image_path in list_images(defect_dir):
            if defect == NORMAL:
                test.append(Sample(image_path, 0, NORMAL))
                continue
            mask_path = base / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            if not mask_path.is_file():
                raise DataError(f"{mask_path}: ground-truth mask of {image_path} not found")
            test.append(Sample(image_path, 1, defect, mask_path))
    if not test:
        raise DataError(f"{test_dir}: no test images")
    return CategoryData(benchmark, category, train, test)
