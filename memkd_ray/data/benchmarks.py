"""The registry of benchmark readers: a reader module registers its layout under one or more
benchmark names (`register_benchmark`), and everything else reads categories through here.

A new reader is a module in this package that defines `list_<x>_categories(root)` and
`read_<x>_category(root, category, benchmark, with_test=...)`, calls `register_benchmark` at
import, and is imported by `data/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memkd_ray.data.reading import CategoryData
from memkd_ray.data.sample import validate_samples
from memkd_ray.errors import DataError

if TYPE_CHECKING:
    from memkd_ray.config import DataConfig


@dataclass(frozen=True)
class Benchmark:
    """How to find a benchmark's categories and read one of them.

    `read_category(root, category, benchmark, **options)` takes keyword options only where a
    layout needs a choice (Eyecandies' lighting, the folder benchmark's split); `options` maps
    each of those keywords to the `data.*` config key that sets it, so the config reaches only
    the readers that use it and `read_category(benchmark, root, category)` works for all.
    """

    list_categories: Callable[[Path], list[str]]
    read_category: Callable[..., CategoryData]
    options: Mapping[str, str] = field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {}
"""`data.benchmark` name -> its reader, filled by the reader modules as they are imported."""


def register_benchmark(names: tuple[str, ...], benchmark: Benchmark) -> None:
    """Make `benchmark` the reader of every name in `names` (`data.benchmark` values)."""
    for name in names:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHMARKS[name] = benchmark


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DataError(f"data.benchmark: unknown benchmark {name!r} ({', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]


def reader_options(data: DataConfig) -> dict[str, Any]:
    """The keyword options that `data.benchmark`'s reader takes, with their configured values.

    `read_category(cfg.data.benchmark, root, name, **reader_options(cfg.data))` reads a
    category exactly as the config says; benchmarks without options get `{}`.
    """
    options = get_benchmark(data.benchmark).options
    return {keyword: getattr(data, key) for keyword, key in options.items()}


def read_category(
    benchmark: str, root: str | Path, category: str, with_test: bool = True,
    decode: bool = False, **options: Any
) -> CategoryData:
    """Read a category's splits and check every image and mask header (sizes, readability);
    with `decode`, every pixel too (the driver's check before a run and `data check`).

    `options` are the benchmark's reader options (see `reader_options`); omitted ones take the
    config defaults.
    """
    data = get_benchmark(benchmark).read_category(
        Path(root), category, benchmark, with_test=with_test, **options
    )
    validate_samples([*data.train, *data.test], decode)
    return data


def read_configured_category(
    data: DataConfig, category: str, with_test: bool = True, decode: bool = False
) -> CategoryData:
    """Read `category` from `data.root` with the benchmark and reader options of the config.

    `with_test=False` leaves the test split untouched (not even listed): hyper-parameter
    search must not see it before selection.
    """
    if not data.root:
        raise DataError("data.root is not set (pass --data-root)")
    return read_category(data.benchmark, data.root, category, with_test, decode,
                         **reader_options(data))


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
