"""What Ray Train costs per category, and what running categories at once buys.

1. Per-epoch cost and fixed cost of a one-category Ray Train run (one worker), from two runs
   of different length: per_epoch = (wall(E2) - wall(E1)) / (E2 - E1), fixed = wall(E1) -
   E1 * per_epoch; compared with the same epoch driver in one process (`engine.fit`).
2. N categories trained concurrently (one `train` call) vs one after another (N calls).

Runs on a local Ray cluster started here; prints the numbers and the machine.

    python benchmarks/ray_overhead.py [--categories 3] [--size 128] [--epochs 2 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from memkd_ray.config import load_config
from memkd_ray.data import read_configured_category
from memkd_ray.data.synthetic import generate_benchmark
from memkd_ray.distributed.launcher import train_benchmark
from memkd_ray.engine import fit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, nargs=2, default=[2, 8])
    args = parser.parse_args()
    short, long = args.epochs
    work = Path(tempfile.mkdtemp(prefix="memkd-ray-bench-"))
    names = generate_benchmark(work / "data", categories=args.categories, size=args.size)
    store = f"file://{work / 'store'}"

    def config(epochs: int):
        return load_config(CONFIG, [f"data.root={work / 'data'}", f"data.image_size={args.size}",
                                    f"train.epochs={epochs}", "train.num_threads=1",
                                    "distributed.cpus_per_worker=0.5"])

    torch.set_num_threads(1)
    cfg = config(long)
    history = fit(cfg, read_configured_category(cfg.data, names[0]),
                  torch.device("cpu")).state.history
    plain_epoch = sum(h["seconds"] for h in history) / len(history)

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - started
    quiet = {"on_message": lambda message: None}
    wall_short = timed(train_benchmark, config(short), [names[0]], store, **quiet)
    wall_long = timed(train_benchmark, config(long), [names[0]], store, **quiet)
    per_epoch = (wall_long - wall_short) / (long - short)
    fixed = wall_short - short * per_epoch

    concurrent = timed(train_benchmark, config(short), names, store, **quiet)
    sequential = sum(timed(train_benchmark, config(short), [name], store, **quiet)
                     for name in names)
    ray.shutdown()

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}; "
          f"synthetic categories at {args.size} px, demo model, 1 worker x 0.5 CPU per category")
    print(f"ray.init (local cluster start)          {ray_start:7.1f} s")
    print(f"the epoch driver without Ray, per epoch   {plain_epoch:7.2f} s")
    print(f"Ray Train, per epoch (incl. report)      {per_epoch:7.2f} s")
    print(f"Ray Train, fixed cost per category run   {fixed:7.1f} s  (worker group start, "
          "data load, cache, final eval, results)")
    print(f"{len(names)} categories x {short} epochs concurrently {concurrent:7.1f} s")
    print(f"{len(names)} categories x {short} epochs one by one   {sequential:7.1f} s")
    print(f"concurrent / sequential wall time        {concurrent / sequential:7.2f}")


if __name__ == "__main__":
    main()
