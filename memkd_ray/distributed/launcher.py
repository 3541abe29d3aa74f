"""Every category of a benchmark at once: one Ray Train `TorchTrainer` per category.

Each trainer is started from its own driver thread (`TorchTrainer.fit` blocks); as many run
together as the cluster's CPUs/GPUs hold and the others queue. Rank 0 of every category sends
one progress message per epoch through a Ray queue, printed here as one line, instead of Ray's
worker logs. One category failing does not stop the others; results.parquet gets one row per
category either way.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from memkd_ray.config import MemKDConfig
from memkd_ray.data import read_configured_category, resolve_categories
from memkd_ray.distributed.train_loop import train_loop_per_worker
from memkd_ray.engine import format_epoch
from memkd_ray.errors import DataError, UserInputError
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.storage.layout import RunLayout, read_results, write_results
from memkd_ray.storage.uri import open_storage, plain_name

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    results_uri: str
    rows: list[dict]

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] != "ok"]


def connect(address: str | None = None) -> None:
    """Join a cluster (`auto`, `ray://...`, `host:port`) or start a local one (no address).

    Worker logs stay in Ray's log files: progress comes through our own queue.
    """
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=False, configure_logging=False)


def concurrent_categories(cfg: MemKDConfig, joined: bool = False) -> int:
    """How many category worker groups fit in the cluster at once.

    On a joined cluster (`--address`) that holds too little right now, one at a time: an
    autoscaling cluster starts with no GPU nodes and adds them when the trainers ask.
    """
    d = cfg.distributed
    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 0) / (d.workers_per_category * d.cpus_per_worker) + 1e-9)
    if d.gpus_per_worker:
        gpu_need = d.workers_per_category * d.gpus_per_worker
        slots = min(slots, math.floor(total.get("GPU", 0) / gpu_need + 1e-9))
    if slots < 1 and not joined:
        raise UserInputError(
            f"a category needs {d.workers_per_category} workers x {d.cpus_per_worker} CPU"
            f"{f' x {d.gpus_per_worker} GPU' if d.gpus_per_worker else ''}, the cluster has "
            f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU"
        )
    if d.max_concurrent_categories:
        return d.max_concurrent_categories
    if slots < 1:
        log.info("the cluster has no room for a category yet; waiting for the autoscaler")
        return 1
    return slots


def train_benchmark(
    cfg: MemKDConfig,
    categories: list[str],
    storage_uri: str,
    address: str | None = None,
    fault: dict[str, Any] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> RunSummary:
    """Train `categories` (or `["all"]`) concurrently; write results.parquet; return rows.

    Bad input that concerns the whole run (config, storage, every category's data) raises a
    UserInputError before anything is written. `fault` is a test hook passed to the workers.
    """
    storage = open_storage(storage_uri)
    cfg, names, broken = _check_data(cfg, categories)
    connect(address)
    layout = RunLayout.create(storage)
    say = on_message or log.info
    slots = concurrent_categories(cfg, joined=address is not None)
    say(f"run {layout.run_id}: {len(names)} categories, {slots} at a time, "
        f"{cfg.distributed.workers_per_category} workers each -> {storage.uri_for(layout.run_dir)}")
    progress = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    printer = threading.Thread(target=_print_progress, args=(progress, stop, say), daemon=True)
    printer.start()
    try:
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="category") as pool:
            futures = {
                name: pool.submit(_train_category, cfg, name, layout, progress, fault)
                for name in names if name not in broken
            }
            rows = [
                _failed_row(cfg, layout, name, broken[name]) if name in broken
                else _collect(futures[name], cfg, layout, name, say)
                for name in names
            ]
    finally:
        stop.set()
        printer.join()
        ray.kill(progress.actor)
    results_uri = write_results(layout, rows)
    return RunSummary(layout.run_id, results_uri, read_results(layout))


def _check_data(
    cfg: MemKDConfig, categories: list[str]
) -> tuple[MemKDConfig, list[str], dict[str, str]]:
    """Read every category where this machine sees the data: broken ones fail alone, before
    any worker starts; if all are broken the run stops here."""
    if not cfg.data.root:
        raise UserInputError("data.root is not set (pass --data-root)")
    # Category names become storage paths (runs/<id>/<benchmark>/<category>, registry/...).
    for name in [*categories, *cfg.data.categories]:
        plain_name("category", name)
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        if categories == ["all"] and not cfg.data.categories:
            raise DataError(f"{root}: data root not found")
        log.info("%s is not visible here: the workers read it on their nodes", root)
        names = categories if categories != ["all"] else cfg.data.categories
        return cfg, names, {}
    # Workers may start in another directory: ship an absolute data root.
    cfg = replace(cfg, data=replace(cfg.data, root=str(root.resolve())))
    names = resolve_categories(cfg.data.benchmark, root, categories, cfg.data.categories)
    broken = {}
    for name in names:
        try:
            read_configured_category(cfg.data, name)
        except DataError as exc:
            broken[name] = str(exc)
    if len(broken) == len(names):
        raise DataError(broken[names[0]])
    return cfg, names, broken


def _train_category(
    cfg: MemKDConfig, category: str, layout: RunLayout, progress: Queue,
    fault: dict[str, Any] | None,
) -> dict:
    d = cfg.distributed
    resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker
                                               else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "category": category, "progress": progress,
                           "fault": fault},
        scaling_config=ScalingConfig(num_workers=d.workers_per_category,
                                     use_gpu=d.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=category,
            storage_path=layout.benchmark_dir(cfg.data.benchmark),
            storage_filesystem=layout.storage.filesystem,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.checkpoints_to_keep),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    return {
        **_base_row(cfg, layout, category),
        "status": "ok",
        "error": "",
        **{key: float(metrics.get(key, math.nan)) for key in METRIC_KEYS},
        "epochs": int(metrics.get("epoch", 0)),
        "workers": int(metrics.get("workers", 0)),
        "wall_seconds": time.perf_counter() - started,
        "checkpoint_uri": layout.storage.uri_for(result.checkpoint.path),
    }


def _collect(future: Any, cfg: MemKDConfig, layout: RunLayout, category: str,
             say: Callable[[str], None]) -> dict:
    try:
        row = future.result()
    except Exception as exc:
        reason = one_line_reason(exc)
        say(f"{category}: FAILED: {reason}")
        return _failed_row(cfg, layout, category, reason)
    say(f"{category}: done in {row['wall_seconds']:.0f}s, I-AUROC {row['image_auroc']:.3f}")
    return row


def _base_row(cfg: MemKDConfig, layout: RunLayout, category: str) -> dict:
    return {"run_id": layout.run_id, "benchmark": cfg.data.benchmark, "category": category,
            "config_hash": cfg.hash()}


def _failed_row(cfg: MemKDConfig, layout: RunLayout, category: str, reason: str) -> dict:
    return {**_base_row(cfg, layout, category), "status": "failed", "error": reason,
            **dict.fromkeys(METRIC_KEYS, math.nan), "epochs": 0, "workers": 0,
            "wall_seconds": 0.0,
            "checkpoint_uri": ""}


def one_line_reason(exc: BaseException) -> str:
    """The innermost error's `Type: message` line, not Ray's wall of tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def _print_progress(queue: Queue, stop: threading.Event, say: Callable[[str], None]) -> None:
    while not (stop.is_set() and queue.empty()):
        try:
            message = queue.get(timeout=0.5)
        except Empty:
            continue
        category = message["category"]
        if message["event"] == "resumed":
            say(f"{category}: resumed from the checkpoint of epoch {message['epoch']}")
        else:
            say(format_epoch(category, message))
