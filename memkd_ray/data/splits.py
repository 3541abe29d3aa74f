"""A category's splits, the registry of benchmark readers, and the checks they share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memkd_ray.data.sample import Sample, list_images, validate_samples
from memkd_ray.errors import DataError

if TYPE_CHECKING:
    from memkd_ray.config import DataConfig


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
    """How to find a benchmark's categories and read one of them.

    `read_category(root, category, benchmark, **options)` takes keyword options only where a
    layout needs a choice (Eyecandies' lighting, the folder benchmark's split); `options` maps
    each of those keywords to the `data.*` config key that sets it, so the config reaches only
    the readers that use it and `read_category(benchmark, root, category)` works for all.
    """

    list_categories: Callable[[Path], list[str]]
    read_category: Callable[..., CategoryData]
    options: Mapping[str, str] = field(default_factory=dict)


def _registry() -> dict[str, Benchmark]:
    from memkd_ray.data.eyecandies import list_eyecandies_categories, read_eyecandies_category
    from memkd_ray.data.folder import list_folder_categories, read_folder_category
    from memkd_ray.data.mvtec import list_mvtec_categories, read_mvtec_category
    from memkd_ray.data.mvtec3d import list_mvtec3d_categories, read_mvtec3d_category
    from memkd_ray.data.visa import list_visa_categories, read_visa_category

    mvtec_layout = Benchmark(list_mvtec_categories, read_mvtec_category)
    return {
        "mvtec": mvtec_layout,
        "mpdd": mvtec_layout,
        "synthetic": mvtec_layout,
        "photos": mvtec_layout,
        "visa": Benchmark(list_visa_categories, read_visa_category),
        "mvtec3d": Benchmark(list_mvtec3d_categories, read_mvtec3d_category),
        "eyecandies": Benchmark(list_eyecandies_categories, read_eyecandies_category,
                                {"light": "eyecandies_light"}),
        "folder": Benchmark(list_folder_categories, read_folder_category,
                            {"test_fraction": "folder_test_fraction"}),
    }


def get_benchmark(name: str) -> Benchmark:
    registry = _registry()
    if name not in registry:
        raise DataError(f"data.benchmark: unknown benchmark {name!r} ({', '.join(registry)})")
    return registry[name]


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
