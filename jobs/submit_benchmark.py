#!/usr/bin/env python3
"""Train and evaluate every category of one or more benchmarks as ONE Ray job on a cluster.

Runs `memkd-ray train --category all --address auto` on the cluster (one TorchTrainer per
category, as many at once as the cluster holds), once per `--benchmark CONFIG DATA_ROOT`, all
in the same job so that one `ray job logs` shows every results table. DATA_ROOT is the
benchmark's directory as the cluster's nodes see it (a shared volume), not on this machine.

Example, MVTec AD on a GPU cluster whose dashboard is port-forwarded to localhost:

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/memkd-cluster.token \\
    jobs/submit_benchmark.py --address http://127.0.0.1:8265 \\
        --benchmark configs/mvtec.yaml /data/mvtec --storage s3://memkd/results \\
        --set distributed.gpus_per_worker=1 --wait
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _submit import (
    SubmitError,
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
    parser = job_parser("submit_benchmark.py", __doc__)
    parser.add_argument("--benchmark", nargs=2, action="append", required=True,
                        metavar=("CONFIG", "DATA_ROOT"),
                        help="a config of this repository and the benchmark's directory on "
                        "the cluster nodes; repeat for several benchmarks")
    parser.add_argument("--category", nargs="+", default=["all"],
                        help="categories (default: all; names only with one --benchmark)")
    parser.add_argument("--workers-per-category", type=int, metavar="K",
                        help="data-parallel workers per category")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. train.epochs=5")
    parser.add_argument("--no-promote", dest="promote", action="store_false",
                        help="do not offer the new checkpoints to the model registry")
    add_cluster_arguments(parser, entrypoint_cpus=0.0)
    return parser


def train_command(args: argparse.Namespace, config: str, data_root: str) -> list[str]:
    command = cli_command(
        args.python, "train", "--config", config_in_tree(config, args.working_dir),
        "--data-root", data_root, "--category", *args.category, "--storage", args.storage,
        "--address", "auto", *repeated("--set", args.overrides),
    )
    if args.workers_per_category is not None:
        command += ["--workers-per-category", str(args.workers_per_category)]
    if not args.promote:
        command.append("--no-promote")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.benchmark) > 1 and args.category != ["all"]:
        raise SubmitError("--category names apply to one benchmark; use all with several")
    commands = [train_command(args, config, root) for config, root in args.benchmark]
    return submit(args, shell_sequence(commands), "submit_benchmark.py")


if __name__ == "__main__":
    sys.exit(run(main))
