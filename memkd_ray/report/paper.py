"""The paper's published numbers (paper_results.yaml), to set beside a run's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import yaml

METHODS = ("MemKD", "RD")


@dataclass(frozen=True)
class PaperResults:
    """Percent values as printed: method -> metric -> value, for the mean and per category."""

    source: str
    category_count: int
    """How many categories the paper's mean covers."""
    mean: dict[str, dict[str, float]]
    categories: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def category(self, name: str, method: str, metric: str) -> float | None:
        return self.categories.get(name, {}).get(method, {}).get(metric)


@cache
def _all_results() -> dict[str, PaperResults]:
    text = resources.files("memkd_ray.report").joinpath("paper_results.yaml").read_text()
    return {name: PaperResults(**entry) for name, entry in yaml.safe_load(text).items()}


def paper_results(benchmark: str) -> PaperResults | None:
    """The paper's numbers for a benchmark it reports (mvtec, visa, mpdd, mvtec3d,
    eyecandies); None for the others (synthetic, folder)."""
    return _all_results().get(benchmark)
