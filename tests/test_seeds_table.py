"""benchmarks/seeds.py's table: means and spreads over seeds, and ties under two standard
deviations, on made-up results whose numbers are worked out here."""

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "seeds", Path(__file__).resolve().parent.parent / "benchmarks" / "seeds.py")
seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeds)


def _row(category: str, auroc: float, error: float = math.nan) -> dict:
    recall = {f"recall_{kind}_{site}": math.nan for kind in ("error", "mean")
              for site in seeds.SITES}
    recall.update({"recall_error_bottleneck": error, "recall_mean_bottleneck": 2.0})
    return {"category": category, "image_auroc": auroc, "pixel_aupro": 0.5, **recall}


def test_spread_and_ties():
    assert seeds.spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert seeds.compare([90.0, 91.0, 92.0], [95.0, 95.5, 96.0]) == "+4.50"
    assert seeds.compare([90.0, 91.0, 92.0], [91.0, 92.5, 93.0]) == "tie"  # 1.5 < 2 sd
    assert seeds.compare([90.0], [99.0]) == "tie (one seed)"


def test_table_per_category_and_overall():
    results = {
        "memkd": {0: [_row("a", 0.90, 1.0), _row("b", 0.80, 1.0)],
                  1: [_row("a", 0.92, 1.2), _row("b", 0.82, 1.4)]},
        "rd": {0: [_row("a", 0.70), _row("b", 0.81)], 1: [_row("a", 0.72), _row("b", 0.83)]},
    }
    lines = seeds.summarise(results)
    tables = "\n".join(lines).split("\n\n")
    auroc = {line.split(" | ")[0].strip("| "): line for line in tables[0].splitlines()[3:]}
    # a: memkd 91 ± 1.41, rd 71 ± 1.41: -20 points beyond 2 sd; b: a tie.
    assert "91.00 ± 1.41 | 71.00 ± 1.41 | -20.00" in auroc["a"]
    assert "tie" in auroc["b"]
    assert "86.00 ± 1.41 | 76.50 ± 1.41 | -9.50" in auroc["all categories (mean)"]
    assert "50.00 ± 0.00 | 50.00 ± 0.00 | tie" in tables[1]  # equal means: a tie
    # The recall ratio: worst memory's error over its mean baseline; RD has none.
    assert "| b | 0.60 ± 0.14 | - | - |" in tables[2]
    assert seeds.recall_ratio(_row("a", 0.9, 1.0)) == pytest.approx(0.5)


def test_existing_runs_group_by_config_apart_from_the_seed(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    def run(name: str, seed: int, memory: bool, auroc: float, root: str,
            status: str = "ok") -> None:
        directory = tmp_path / "runs" / name
        directory.mkdir(parents=True)
        config = {"data": {"root": root}, "memory": {"enabled": memory},
                  "train": {"seed": seed}}
        (directory / "train_spec.json").write_text(json.dumps({"config": config}))
        pq.write_table(pa.Table.from_pylist([{**_row("a", auroc), "status": status}]),
                       directory / "results.parquet")

    run("20261207-1", 0, True, 0.90, "/data")
    run("20261207-2", 1, True, 0.92, "/elsewhere")  # another data root: the same variant
    run("20261207-3", 0, False, 0.70, "/data")
    run("20261207-4", 1, False, 0.72, "/data")
    (tmp_path / "runs" / "20261207-5").mkdir()  # unfinished: no results, left out
    run("20261207-6", 2, True, math.nan, "/data", status="interrupted")  # left out
    groups = seeds.existing_runs([tmp_path])
    assert list(groups) == ["first", "memory.enabled=False"]
    assert {seed: rows[0]["image_auroc"] for seed, rows in groups["first"].items()} == {
        0: 0.90, 1: 0.92}
    assert "91.00 ± 1.41 | 71.00 ± 1.41 | -20.00" in "\n".join(seeds.summarise(groups))
