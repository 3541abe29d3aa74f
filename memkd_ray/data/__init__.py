"""Benchmark readers producing one Sample type, the synthetic generator, torch datasets."""

from memkd_ray.data.check import check_benchmark
from memkd_ray.data.sample import Sample, validate_samples
from memkd_ray.data.splits import (
    CategoryData,
    read_category,
    read_configured_category,
    reader_options,
    resolve_categories,
)

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
