"""Reader of the MVTec AD layout, shared by MPDD and the synthetic benchmark.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/<name>.png
    <root>/<category>/ground_truth/<defect>/<name>_mask.png
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from memkd_ray.data.benchmarks import Benchmark, register_benchmark
from memkd_ray.data.reading import (
    CategoryData,
    categories_with,
    category_dir,
    require_dir,
    require_images,
)
from memkd_ray.data.sample import Sample
from memkd_ray.errors import DataError

NORMAL = "good"


def list_mvtec_categories(root: Path) -> list[str]:
    """Sub-directories of root that look like categories (they have train/good)."""
    return categories_with(root, f"train/{NORMAL}")


def read_mvtec_category(
    root: Path, category: str, benchmark: str = "mvtec", with_test: bool = True
) -> CategoryData:
    """Training images from train/good; test images of every defect with their masks."""
    return read_mvtec_family(
        root, category, benchmark, with_test, list_mvtec_categories,
        images_in=lambda split_dir: split_dir,
        mask_of=lambda base, defect_dir, image: (
            base / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
        ),
    )


def read_mvtec_family(
    root: Path,
    category: str,
    benchmark: str,
    with_test: bool,
    list_categories: Callable[[Path], list[str]],
    images_in: Callable[[Path], Path],
    mask_of: Callable[[Path, Path, Path], Path],
) -> CategoryData:
    """The MVTec family's `train/good` + `test/<defect>` layout, with the image folder inside
    a split folder (`images_in`) and the mask of an image (`mask_of(base, defect_dir, image)`)
    given by the layout; `good` test images are normal and need no mask."""
    base = category_dir(root, category, list_categories)
    training = images_in(base / "train" / NORMAL)
    train = [Sample(p, 0, NORMAL) for p in require_images(training, "training")]
    if not with_test:
        return CategoryData(benchmark, category, train, [])
    test_dir = require_dir(base / "test", "test directory")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in require_images(images_in(defect_dir), f"{defect} test"):
            if defect == NORMAL:
                test.append(Sample(image, 0, NORMAL))
                continue
            mask = mask_of(base, defect_dir, image)
            if not mask.is_file():
                raise DataError(f"{mask}: ground-truth mask of {image} not found")
            test.append(Sample(image, 1, defect, mask))
    if not test:
        raise DataError(f"{test_dir}: no test images")
    return CategoryData(benchmark, category, train, test)


register_benchmark(("mvtec", "mpdd", "synthetic", "photos"),
                   Benchmark(list_mvtec_categories, read_mvtec_category))
