"""One or more configurations trained with several seeds: mean and spread per category.

Each variant (a name and its `--set` overrides on top of `--config`) is trained once per seed
with `memkd-ray train` (all categories at once, `train.seed` set, everything else as the user
would run it) into `--storage`; the script then reads every run's results.parquet and prints,
per category and over all categories, the mean and sample standard deviation over seeds of
image AUROC, AU-PRO and the memories' recall ratio (Eq. 10 error on held-out normals over the
mean-feature baseline, worst memory). Each later variant is compared with the first: a
difference smaller than twice the larger of the two standard deviations is reported as a tie.

    python benchmarks/seeds.py --config configs/photos.yaml --data-root DATA \\
        --category coins moon --seeds 0 1 2 \\
        --variant memkd --variant rd memory.enabled=false

Runs made earlier (an interrupted study, several studies put side by side) are summarised
without training with `--existing STORAGE [STORAGE ...]`: runs whose configurations differ
only in `train.seed` form one variant, named by the keys where it differs from the first.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

SHOWN = {"image_auroc": "I-AUROC", "pixel_aupro": "AU-PRO", "recall_ratio": "recall/mean"}
SITES = ("bottleneck", "decoder1", "decoder2")


def recall_ratio(row: dict) -> float:
    """The worst memory's Eq. 10 error over its mean-feature baseline (NaN without one)."""
    ratios = [row[f"recall_error_{site}"] / row[f"recall_mean_{site}"] for site in SITES
              if not math.isnan(row.get(f"recall_error_{site}", math.nan))]
    return max(ratios) if ratios else math.nan


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the finite values; NaN where there are none."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def compare(first: list[float], other: list[float]) -> str:
    """`+d`/`-d` when the means differ by at least twice the larger standard deviation of
    the two, `tie` otherwise (or with fewer than two seeds on a side), `-` without values."""
    (m1, s1), (m2, s2) = spread(first), spread(other)
    if math.isnan(m1) or math.isnan(m2):
        return "-"
    if math.isnan(s1) or math.isnan(s2):
        return "tie (one seed)"
    difference = m2 - m1
    return f"{difference:+.2f}" if difference and abs(difference) >= 2 * max(s1, s2) else "tie"


def summarise(results: dict[str, dict[int, list[dict]]]) -> list[str]:
    """Lines of the table: results[variant][seed] holds a run's results rows."""
    variants = list(results)
    categories = sorted({row["category"] for runs in results.values()
                         for rows in runs.values() for row in rows})

    def values(variant: str, category: str | None, key: str) -> list[float]:
        out = []
        for rows in results[variant].values():
            picked = [r for r in rows if category is None or r["category"] == category]
            numbers = [recall_ratio(r) if key == "recall_ratio" else r[key] for r in picked]
            numbers = [100 * v if key != "recall_ratio" else v for v in numbers]
            out.append(statistics.fmean(numbers) if numbers else math.nan)
        return out

    lines = []
    for key, label in SHOWN.items():
        header = [f"{label} (mean ± sd over seeds)", *variants,
                  *(f"{v} vs {variants[0]}" for v in variants[1:])]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for category in [*categories, None]:
            cells = []
            for variant in variants:
                mean, sd = spread(values(variant, category, key))
                cells.append("-" if math.isnan(mean) else f"{mean:.2f} ± {sd:.2f}")
            cells += [compare(values(variants[0], category, key), values(v, category, key))
                      for v in variants[1:]]
            lines.append(f"| {category or 'all categories (mean)'} | " + " | ".join(cells) + " |")
    return lines


def train(args: argparse.Namespace, overrides: list[str], seed: int, storage: Path) -> list[dict]:
    before = set((storage / "runs").iterdir()) if (storage / "runs").is_dir() else set()
    command = [sys.executable, "-m", "memkd_ray.cli", "train", "--config", args.config,
               "--data-root", args.data_root, "--category", *args.category,
               "--storage", str(storage), "--no-report",
               *(part for item in [*overrides, f"train.seed={seed}"] for part in ("--set", item))]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (run,) = set((storage / "runs").iterdir()) - before
    return pq.read_table(run / "results.parquet").to_pylist()


def dotted(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {"section.key": value}."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def existing_runs(storages: list[Path]) -> dict[str, dict[int, list[dict]]]:
    """Runs under `storages` that finished every category, grouped as `summarise` reads
    them: by configuration apart from `train.seed` (and the data root), in run id order."""
    groups: dict[str, dict[int, list[dict]]] = {}
    first: dict[str, object] | None = None
    keys: dict[tuple, str] = {}
    runs = sorted((r for s in storages for r in (s / "runs").iterdir()
                   if (r / "results.parquet").is_file()), key=lambda r: r.name)
    for run in runs:
        rows = pq.read_table(run / "results.parquet").to_pylist()
        if any(row["status"] != "ok" for row in rows):  # interrupted or failed: left out
            continue
        spec = json.loads((run / "train_spec.json").read_text())
        config = dotted(spec["config"])
        seed = config.pop("train.seed")
        config.pop("data.root")
        first = config if first is None else first
        key = tuple(sorted((k, repr(v)) for k, v in config.items()))
        if key not in keys:
            keys[key] = " ".join(f"{k}={v}" for k, v in config.items()
                                 if v != first.get(k)) or "first"
        groups.setdefault(keys[key], {})[seed] = rows
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--existing", nargs="+", type=Path,
                        help="summarise the runs under these storage folders; train nothing")
    parser.add_argument("--config")
    parser.add_argument("--data-root")
    parser.add_argument("--category", nargs="+", default=["all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="a name and its overrides; repeat for each variant")
    parser.add_argument("--storage", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.existing:
        print("\n".join(summarise(existing_runs(args.existing))))
        return
    if not (args.config and args.data_root):
        parser.error("--config and --data-root are needed to train")
    variants = {name: overrides for name, *overrides in (args.variant or [["default"]])}
    with tempfile.TemporaryDirectory() as scratch:
        storage = Path(args.storage or scratch).resolve()
        results: dict[str, dict[int, list[dict]]] = {}
        for name, overrides in variants.items():
            for seed in args.seeds:
                started = time.perf_counter()
                results.setdefault(name, {})[seed] = train(args, overrides, seed, storage)
                print(f"{name} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
        print(f"config {args.config}, overrides per variant: "
              + "; ".join(f"{n}: {' '.join(o) or '-'}" for n, o in variants.items()))
        print("\n".join(summarise(results)))


if __name__ == "__main__":
    main()
