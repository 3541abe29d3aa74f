"""Reader of VisA as released (amazon-science/spot-diff), read in place from its split file.

    <root>/split_csv/1cls.csv                 object,split,label,image,mask
    <root>/<object>/Data/Images/Normal/*.JPG
    <root>/<object>/Data/Images/Anomaly/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png

The one-class split (`1cls.csv`) is the protocol behind the published VisA numbers: `train`
rows are normal, `test` rows normal or anomalous; paths are relative to root and the mask
field is empty for normal rows. The official `prepare_data.py` only copies these files into an
MVTec layout and binarises the masks (`!= 0`, they hold class ids), which `Sample.load_mask`
does on the fly, so no conversion step is needed. VisA has no per-image defect type: anomalous
images get the defect `anomaly`, normal ones `good`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from memkd_ray.data.benchmarks import Benchmark, register_benchmark
from memkd_ray.data.reading import CategoryData
from memkd_ray.data.sample import Sample
from memkd_ray.errors import DataError

SPLIT_FILE = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
DEFECTS = ("good", "anomaly")


def _rows(root: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row of the split file, after checking its header."""
    path = root / SPLIT_FILE
    if not path.is_file():
        raise DataError(f"{path}: VisA split file not found (is {root} the VisA root?)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise DataError(f"{path}: header must be {','.join(COLUMNS)}")
        for row in reader:
            yield reader.line_num, row


def list_visa_categories(root: Path) -> list[str]:
    """The objects named in the split file."""
    return sorted({row["object"] for _, row in _rows(root)})


def read_visa_category(
    root: Path, category: str, benchmark: str = "visa", with_test: bool = True
) -> CategoryData:
    """Train and test samples of one object, every listed file checked to exist."""
    wanted = ("train", "test") if with_test else ("train",)
    splits: dict[str, list[Sample]] = {split: [] for split in wanted}
    for line, row in _rows(root):
        if row["object"] == category and row["split"] in wanted:
            split, sample = _sample(root, line, row)
            splits[split].append(sample)
    where = root / SPLIT_FILE
    if not any(splits.values()):
        known = ", ".join(list_visa_categories(root)) or "none"
        raise DataError(f"{where}: category {category!r} not listed (found: {known})")
    for split, samples in splits.items():
        if not samples:
            raise DataError(f"{where}: no {split} images of {category!r}")
    return CategoryData(benchmark, category, splits["train"], splits.get("test", []))


def _sample(root: Path, line: int, row: dict[str, str]) -> tuple[str, Sample]:
    where = f"{root / SPLIT_FILE} line {line}"
    split, label = row["split"], LABELS.get(row["label"])
    if split not in ("train", "test"):
        raise DataError(f"{where}: split {split!r} is neither train nor test")
    if label is None:
        raise DataError(f"{where}: label {row['label']!r} is neither normal nor anomaly")
    if split == "train" and label == 1:
        raise DataError(f"{where}: anomalous image in the train split")
    image = _listed_file(root, row["image"], "image", where)
    mask = _listed_file(root, row["mask"], "mask", where) if label == 1 else None
    return split, Sample(image, label, DEFECTS[label], mask)


def _listed_file(root: Path, relative: str, what: str, where: str) -> Path:
    if not relative:
        raise DataError(f"{where}: {what} field is empty")
    path = root / relative
    if not path.is_file():
        raise DataError(f"{path}: {what} listed in {where} not found")
    return path


register_benchmark(("visa",), Benchmark(list_visa_categories, read_visa_category))
