"""Train and evaluate a benchmark's categories one after another on this machine.

Writes the storage layout of DESIGN.md 6: a checkpoint per category every
`train.checkpoint_every` epochs and at the end, then `results.parquet` for the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from memkd_ray.checkpoint import save_checkpoint
from memkd_ray.config import MemKDConfig
from memkd_ray.data import CategoryData, read_category, resolve_categories
from memkd_ray.engine import TrainState, fit, make_optimizer, resolve_device
from memkd_ray.errors import ConfigError
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.model import create_memkd
from memkd_ray.storage.layout import RunLayout, write_parquet_atomic

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    results_path: str
    rows: list[dict]


def load_categories(cfg: MemKDConfig, requested: list[str]) -> list[CategoryData]:
    """Read and validate every requested category before anything is trained or written."""
    if not cfg.data.root:
        raise ConfigError("data.root is not set (pass --data-root)")
    names = resolve_categories(cfg.data.benchmark, cfg.data.root, requested, cfg.data.categories)
    return [read_category(cfg.data.benchmark, cfg.data.root, name) for name in names]


def train_category(
    cfg: MemKDConfig, data: CategoryData, layout: RunLayout, progress: bool = True
) -> dict:
    """Train one category from scratch; returns its results row."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = create_memkd(cfg)
    state = TrainState(model, make_optimizer(model, cfg),
                       torch.Generator().manual_seed(cfg.train.seed))
    checkpoint_dir = layout.checkpoint_dir(data.benchmark, data.category)

    def on_epoch(state: TrainState, stats: dict, evaluation: object) -> None:
        if state.epoch % cfg.train.checkpoint_every == 0 and state.epoch < cfg.train.epochs:
            save_checkpoint(checkpoint_dir, state.model, cfg, state.epoch)

    started = time.perf_counter()
    evaluation = fit(state, data, cfg, device, on_epoch=on_epoch, progress=progress)
    wall = time.perf_counter() - started
    save_checkpoint(checkpoint_dir, state.model, cfg, state.epoch, evaluation.metrics)
    return {
        "run_id": layout.run_id,
        "benchmark": data.benchmark,
        "category": data.category,
        **{key: evaluation.metrics[key] for key in METRIC_KEYS},
        "epochs": state.epoch,
        "wall_seconds": wall,
        "checkpoint_uri": checkpoint_dir.resolve().as_uri(),
        "config_hash": cfg.hash(),
    }


def train_benchmark(
    cfg: MemKDConfig,
    categories: list[str],
    storage_root: str,
    progress: bool = True,
    on_category: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Train every category in turn under a new run id; results.parquet is written last."""
    datasets = load_categories(cfg, categories)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    layout = RunLayout.create(storage_root)
    log.info("run %s: %d categories -> %s", layout.run_id, len(datasets), layout.run_dir)
    rows = []
    for data in datasets:
        row = train_category(cfg, data, layout, progress)
        rows.append(row)
        if on_category is not None:
            on_category(row)
    write_parquet_atomic(rows, layout.results_path)
    return RunSummary(layout.run_id, str(layout.results_path), rows)
