#!/usr/bin/env python3
"""Run a Ray Tune hyper-parameter search per category as one Ray job on a cluster.

Runs `memkd-ray tune --address auto` on the cluster with the flags given here; the search
space defaults to `tune/default.yaml` beside the config (shipped with this tree). DATA_ROOT is
the benchmark's directory as the cluster's nodes see it.

Example:

    jobs/submit_tune.py --address http://127.0.0.1:8265 --config configs/mvtec.yaml \\
        --data-root /data/mvtec --category bottle screw --samples 16 --scheduler asha \\
        --storage s3://memkd/results --wait
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _submit import (
    add_cluster_arguments,
    cli_command,
    config_in_tree,
    job_parser,
    repeated,
    run,
    shell_sequence,
    submit,
)


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("submit_tune.py", __doc__)
    parser.add_argument("--config", required=True, help="a config of this repository")
    parser.add_argument("--data-root", help="the benchmark's directory on the cluster nodes")
    parser.add_argument("--category", nargs="+", default=["all"])
    parser.add_argument("--samples", type=int, default=8, help="trials per category")
    parser.add_argument("--space", help="search space YAML of this repository")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    parser.add_argument("--search", choices=("random", "optuna"), default="random")
    parser.add_argument("--max-concurrent", type=int, default=0, metavar="M",
                        help="trials at once per category (0: what the cluster holds)")
    parser.add_argument("--select-on", choices=("validation", "test"), default="validation")
    parser.add_argument("--workers-per-category", type=int, metavar="K")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--no-promote", dest="promote", action="store_false")
    add_cluster_arguments(parser, entrypoint_cpus=0.0)
    return parser


def tune_command(args: argparse.Namespace) -> list[str]:
    command = cli_command(
        args.python, "tune", "--config", config_in_tree(args.config, args.working_dir),
        "--category", *args.category, "--samples", str(args.samples),
        "--scheduler", args.scheduler, "--search", args.search,
        "--max-concurrent", str(args.max_concurrent), "--select-on", args.select_on,
        "--storage", args.storage, "--address", "auto", *repeated("--set", args.overrides),
    )
    if args.data_root:
        command += ["--data-root", args.data_root]
    if args.space:
        command += ["--space", config_in_tree(args.space, args.working_dir)]
    if args.workers_per_category is not None:
        command += ["--workers-per-category", str(args.workers_per_category)]
    if not args.promote:
        command.append("--no-promote")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return submit(args, shell_sequence([tune_command(args)]), "submit_tune.py")


if __name__ == "__main__":
    sys.exit(run(main))
