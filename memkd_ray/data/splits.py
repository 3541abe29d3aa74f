"""A category's splits, and the registry of benchmark readers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memkd_ray.data.sample import Sample, validate_samples
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


@dataclass(frozen=True)
class Benchmark:
    list_categories: Callable[[Path], list[str]]
    read_category: Callable[[Path, str, str], CategoryData]


def _registry() -> dict[str, Benchmark]:
    from memkd_ray.data.mvtec import list_mvtec_categories, read_mvtec_category

    mvtec_layout = Benchmark(list_mvtec_categories, read_mvtec_category)
    return {"mvtec": mvtec_layout, "mpdd": mvtec_layout, "synthetic": mvtec_layout}


def get_benchmark(name: str) -> Benchmark:
    registry = _registry()
    if name not in registry:
        raise DataError(f"data.benchmark: unknown benchmark {name!r} ({', '.join(registry)})")
    return registry[name]


def read_category(benchmark: str, root: str | Path, category: str) -> CategoryData:
    """Read a category's splits and check every image and mask header (sizes, readability)."""
    data = get_benchmark(benchmark).read_category(Path(root), category, benchmark)
    validate_samples([*data.train, *data.test])
    return data


def resolve_categories(
    benchmark: str, root: str | Path, requested: list[str], configured: list[str]
) -> list[str]:
    """`all` means the config's category list, else every category found under root."""
    if requested != ["all"]:
        return requested
    found = configured or get_benchmark(benchmark).list_categories(Path(root))
    if not found:
        raise DataError(f"{root}: no categories found")
    return found
