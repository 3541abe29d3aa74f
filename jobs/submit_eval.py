#!/usr/bin/env python3
"""Re-evaluate the model registry's best model of each category of a benchmark, as a Ray job.

Runs `jobs/run_eval.py` on the cluster (shipped with this tree): for every category registered
under BENCHMARK in the registry of `--storage` (or the ones named), `memkd-ray eval
--checkpoint registry:BENCHMARK/CATEGORY` on the cluster's copy of the data, then one table.
Evaluation runs in the job's driver: give it a GPU with `--entrypoint-num-gpus 1`.

Example:

    jobs/submit_eval.py --address http://127.0.0.1:8265 --benchmark mvtec \\
        --data-root /data/mvtec --storage s3://memkd/results --entrypoint-num-gpus 1 --wait
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _submit import add_cluster_arguments, job_parser, run, shell_sequence, submit


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("submit_eval.py", __doc__)
    parser.add_argument("--benchmark", required=True,
                        help="registry benchmark name (data.benchmark of its config), e.g. mvtec")
    parser.add_argument("--data-root", required=True,
                        help="the benchmark's directory on the cluster nodes")
    parser.add_argument("--category", nargs="+", default=["all"],
                        help="categories (default: every one registered for the benchmark)")
    add_cluster_arguments(parser, entrypoint_cpus=1.0)
    return parser


def eval_command(args: argparse.Namespace) -> list[str]:
    return [args.python, "jobs/run_eval.py", "--benchmark", args.benchmark,
            "--data-root", args.data_root, "--storage", args.storage,
            "--category", *args.category]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return submit(args, shell_sequence([eval_command(args)]), "submit_eval.py")


if __name__ == "__main__":
    sys.exit(run(main))
