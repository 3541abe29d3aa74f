"""Reader of the MVTec AD layout, shared by MPDD and the synthetic benchmark.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/<name>.png
    <root>/<category>/ground_truth/<defect>/<name>_mask.png
"""

from __future__ import annotations

from pathlib import Path

from memkd_ray.data.sample import Sample, list_images
from memkd_ray.data.splits import CategoryData
from memkd_ray.errors import DataError

NORMAL = "good"


def list_mvtec_categories(root: Path) -> list[str]:
    """Sub-directories of root that look like categories (they have train/good)."""
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    return sorted(p.name for p in root.iterdir() if (p / "train" / NORMAL).is_dir())


def read_mvtec_category(root: Path, category: str, benchmark: str = "mvtec") -> CategoryData:
    base = root / category
    if not base.is_dir():
        known = ", ".join(list_mvtec_categories(root)) if root.is_dir() else "none"
        raise DataError(f"{base}: category {category!r} not found (found: {known or 'none'})")
    train_dir = base / "train" / NORMAL
    if not train_dir.is_dir():
        raise DataError(f"{train_dir}: training directory not found")
    train = [Sample(p, 0, NORMAL) for p in list_images(train_dir)]
    if not train:
        raise DataError(f"{train_dir}: no training images")
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: test directory not found")
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
