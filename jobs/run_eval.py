#!/usr/bin/env python3
"""Runs INSIDE the Ray job that submit_eval.py submits: registry models of a benchmark, re-tested.

Only the `memkd-ray` command line is used (`models list --format json`, then `eval` per
category, each in its own process): one broken category fails alone with its one-line reason,
and this file depends on nothing but the CLI contract. Prints one line per category, then the
table of all of them. Exit 0 if every category evaluated, 1 if one failed, 2 if the registry has
no model for the benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

CLI = [sys.executable, "-m", "memkd_ray.cli", "-q"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--category", nargs="+", default=["all"])
    return parser


def registered_categories(benchmark: str, storage: str) -> list[str]:
    listing = subprocess.run(
        [*CLI, "models", "list", "--benchmark", benchmark, "--format", "json",
         "--storage", storage], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise SystemExit(_fail(f"models list: {_last_line(listing.stderr)}"))
    return sorted({card["category"] for card in json.loads(listing.stdout)})


def evaluate(benchmark: str, category: str, data_root: str, storage: str) -> dict[str, Any]:
    """One row of the results table: the metrics, or the category's one-line failure."""
    result = subprocess.run(
        [*CLI, "eval", "--checkpoint", f"registry:{benchmark}/{category}", "--storage", storage,
         "--data-root", data_root, "--category", category],
        capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return {"category": category, "status": "ok", **json.loads(result.stdout)}
    return {"category": category, "status": "failed", "error": _last_line(result.stderr)}


def main(argv: Sequence[str] | None = None) -> int:
    from memkd_ray.cli.tables import format_results_table
    from memkd_ray.metrics import METRIC_KEYS

    args = build_parser().parse_args(argv)
    categories = (registered_categories(args.benchmark, args.storage)
                  if args.category == ["all"] else args.category)
    if not categories:
        return _fail(f"no model registered for benchmark {args.benchmark} in {args.storage}")
    rows = []
    for category in categories:
        row = evaluate(args.benchmark, category, args.data_root, args.storage)
        if row["status"] == "ok":
            print(f"{category}: I-AUROC {100 * row['image_auroc']:.1f}", flush=True)
        else:
            print(f"{category}: FAILED: {row['error']}", flush=True)
            row.update(dict.fromkeys(METRIC_KEYS, math.nan))
        rows.append(row)
    print(format_results_table(rows))
    return 1 if any(row["status"] != "ok" for row in rows) else 0


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _fail(message: str) -> int:
    print(f"run_eval.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
