"""Benchmark readers producing one Sample type, the synthetic generator, torch datasets.

Importing the package imports every reader module, and so registers its benchmarks
(benchmarks.py).
"""

from memkd_ray.data import eyecandies, folder, mvtec, mvtec3d, visa  # noqa: F401 (registration)
from memkd_ray.data.benchmarks import (
    read_category,
    read_configured_category,
    reader_options,
    resolve_categories,
)
from memkd_ray.data.check import check_benchmark
from memkd_ray.data.reading import CategoryData
from memkd_ray.data.sample import Sample, validate_samples

__all__ = [
    "CategoryData",
    "Sample",
    "check_benchmark",
    "read_category",
    "read_configured_category",
    "reader_options",
    "resolve_categories",
    "validate_samples",
]
