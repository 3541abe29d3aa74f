"""What a benchmark reader returns (CategoryData) and the layout checks readers share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memkd_ray.data.sample import Sample, list_images
from memkd_ray.errors import DataError


@dataclass
class CategoryData:
    benchmark: str
    category: str
    train: list[Sample]
    test: list[Sample]

    def counts(self) -> dict[str, int]:
        """Train, test-good and per-defect test counts."""
        defects = Counter(s.defect for s in self.test if s.label == 1)
        return {
            "train": len(self.train),
            "test_good": sum(1 for s in self.test if s.label == 0),
            **{f"test_{d}": n for d, n in sorted(defects.items())},
        }


def category_dir(root: Path, category: str, list_categories: Callable[[Path], list[str]]) -> Path:
    """`root/category`, or a DataError that names the categories root does hold."""
    base = require_dir(root, "data root") / category
    if not base.is_dir():
        known = ", ".join(list_categories(root)) or "none"
        raise DataError(f"{base}: category {category!r} not found (found: {known})")
    return base


def categories_with(root: Path, marker: str) -> list[str]:
    """Sub-directories of root that hold the directory `marker` (e.g. `train/good`): the
    layout's sign that a directory is a category."""
    return sorted(p.name for p in require_dir(root, "data root").iterdir()
                  if (p / marker).is_dir())


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a directory, else a DataError saying which part of the layout is missing."""
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found")
    return path


def require_images(directory: Path, what: str) -> list[Path]:
    """The images in `directory`, which must exist and hold at least one."""
    images = list_images(require_dir(directory, f"{what} directory"))
    if not images:
        raise DataError(f"{directory}: no {what} images")
    return images
