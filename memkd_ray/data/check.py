"""`memkd-ray data check`: read a whole benchmark the way `train` will and tabulate it.

Reading every category with the same readers as training, and decoding every image and mask
as `train` does before it starts, means a tree that passes here does not fail half-way
through a long multi-category run, and the counts can be
compared with the dataset's published statistics before any GPU time is spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memkd_ray.data.benchmarks import read_category, resolve_categories
from memkd_ray.data.reading import CategoryData

HEADER = ("category", "train", "test good", "test defective", "defect types")


def check_benchmark(
    benchmark: str, root: str | Path, categories: list[str] | None = None, **options: Any
) -> str:
    """Read every category (`categories`, or all found under root) and return a table of counts.

    `options` are the benchmark's reader options (`reader_options(cfg.data)`). The first broken
    file or directory raises DataError naming it.
    """
    names = resolve_categories(benchmark, root, ["all"], categories or [])
    data = [read_category(benchmark, root, name, decode=True, **options) for name in names]
    lines = [f"{benchmark} at {root}: {len(data)} categories", _table([_row(d) for d in data])]
    unmasked = sum(1 for d in data for s in d.test if s.label == 1 and s.mask_path is None)
    if unmasked:
        lines.append(f"note: {unmasked} defective test images have no mask; pixel metrics "
                     "count their pixels as normal")
    return "\n".join(lines)


def _row(data: CategoryData) -> list[str]:
    counts = data.counts()
    defects = {k.removeprefix("test_"): n for k, n in counts.items()
               if k.startswith("test_") and k != "test_good"}
    types = " ".join(f"{name}={n}" for name, n in defects.items())
    return [data.category, str(counts["train"]), str(counts["test_good"]),
            str(sum(defects.values())), types]


def _table(rows: list[list[str]]) -> str:
    total = ["total", *(str(sum(int(row[i]) for row in rows)) for i in (1, 2, 3)), ""]
    cells = [list(HEADER), *rows, total]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER) - 1)]
    return "\n".join(_render(row, widths) for row in cells)


def _render(row: list[str], widths: list[int]) -> str:
    """Name left-aligned, counts right-aligned, the defect types last and unpadded."""
    name, *counts, types = row
    aligned = (count.rjust(width) for count, width in zip(counts, widths[1:], strict=True))
    return "  ".join([name.ljust(widths[0]), *aligned, types]).rstrip()
