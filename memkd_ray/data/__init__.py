"""Benchmark readers producing one Sample type, the synthetic generator, torch datasets."""

from memkd_ray.data.sample import Sample, validate_samples
from memkd_ray.data.splits import CategoryData, read_category, resolve_categories

__all__ = ["CategoryData", "Sample", "read_category", "resolve_categories", "validate_samples"]
