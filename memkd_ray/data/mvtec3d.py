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

from memkd_ray.data.benchmarks import Benchmark, register_benchmark
from memkd_ray.data.mvtec import NORMAL, read_mvtec_family
from memkd_ray.data.reading import CategoryData, categories_with


def list_mvtec3d_categories(root: Path) -> list[str]:
    """Sub-directories of root that look like categories (they have train/good/rgb)."""
    return categories_with(root, f"train/{NORMAL}/rgb")


def read_mvtec3d_category(
    root: Path, category: str, benchmark: str = "mvtec3d", with_test: bool = True
) -> CategoryData:
    """RGB training images from train/good; RGB test images of every defect with their gt."""
    return read_mvtec_family(
        root, category, benchmark, with_test, list_mvtec3d_categories,
        images_in=lambda split_dir: split_dir / "rgb",
        mask_of=lambda base, defect_dir, image: defect_dir / "gt" / f"{image.stem}.png",
    )


register_benchmark(("mvtec3d",), Benchmark(list_mvtec3d_categories, read_mvtec3d_category))
