"""`memkd-ray train`: every category of a benchmark at once, one Ray Train `TorchTrainer` each.

Each trainer is started from its own driver thread (`TorchTrainer.fit` blocks); as many run
together as the cluster's CPUs/GPUs hold and the others queue. One category failing does not
stop the others; results.parquet gets one row per category either way.

Ray Train stops a run on Ctrl+C only when `fit()` runs in the main thread, so the driver takes
SIGINT and SIGTERM itself: the first asks every category's workers to stop at their next step
(a flag actor they poll), categories not started are not started, and after a grace period the
driver stops waiting; unfinished categories are recorded as `interrupted`. The request is saved
with the run, so `train --resume RUN_ID` continues from the checkpoints in storage: Ray Train
restores each category's last checkpoint, finished categories are kept.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.train

from memkd_ray.config import MemKDConfig, from_dict
from memkd_ray.decision import DECISION_RATE_KEYS
from memkd_ray.distributed.cluster import concurrent_categories, connect, needs
from memkd_ray.distributed.console import (
    Interruption,
    Progress,
    StopFlag,
    one_line_reason,
)
from memkd_ray.distributed.ray_compat import worker_group_start_timeout
from memkd_ray.distributed.runs import category_trainer, preflight, save_request, saved_request
from memkd_ray.distributed.worker import TrainLoop, train_loop_per_worker
from memkd_ray.engine import STOPPED
from memkd_ray.metrics import METRIC_KEYS, RECALL_KEYS
from memkd_ray.storage import Storage, open_storage
from memkd_ray.storage.layout import RunLayout, read_results, results_row, write_results

log = logging.getLogger(__name__)

STOP_GRACE_S = 25.0
"""After a stop request, how long the driver waits for categories to reach a step boundary."""


@dataclass
class RunSummary:
    run_id: str
    results_uri: str
    rows: list[dict]
    signal: str = ""
    """The signal that interrupted the run (SIGINT, SIGTERM), or empty."""

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "failed"]

    @property
    def interrupted(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "interrupted"]


class PlacementError(RuntimeError):
    """A category's worker group found no room in the cluster within the placement timeout."""


def train_benchmark(
    cfg: MemKDConfig | None,
    categories: list[str],
    storage_uri: str,
    address: str | None = None,
    on_message: Callable[[str], None] | None = None,
    resume_run: str | None = None,
    data_root: str | None = None,
    train_loop: TrainLoop = train_loop_per_worker,
) -> RunSummary:
    """Train `categories` (or `["all"]`) concurrently; write results.parquet; return rows.

    Bad input that concerns the whole run (config, storage, every category's data) raises a
    UserInputError before anything is written. `resume_run` continues a run from its saved
    request and checkpoints (`cfg` and `categories` are then ignored; `data_root`, if given,
    replaces the saved one). `train_loop` is what every worker runs (a wrapper of
    `train_loop_per_worker`, say, that observes it).
    """
    storage = open_storage(storage_uri)
    storage.check_writable()
    finished: dict[str, dict] = {}
    if resume_run:
        layout, cfg, categories, finished = _saved_run(storage, resume_run, data_root)
    cfg, names, broken = preflight(cfg, categories)
    connect(address, storage)
    say = on_message or log.info
    slots = concurrent_categories(cfg.distributed, joined=address is not None)
    if not resume_run:
        layout = RunLayout.create(storage)
        save_request(storage, layout.train_spec_path,
                     {"config": cfg.to_dict(), "categories": names})
    todo = [name for name in names if name not in broken and name not in finished]
    say(f"run {layout.run_id}: {len(names)} categories, {slots} at a time, "
        f"{cfg.distributed.workers_per_category} workers each -> {storage.uri_for(layout.run_dir)}"
        + (f" (resumed: {len(todo)} to continue)" if resume_run else ""))
    done, signal = _train_categories(cfg, todo, layout, slots, say, train_loop)
    rows = [finished.get(name) or done.get(name)
            or _row(cfg, layout, name, "failed" if name in broken else "interrupted",
                    error=broken.get(name, ""))
            for name in names]
    results_uri = write_results(layout, rows)
    return RunSummary(layout.run_id, results_uri, read_results(layout), signal)


def _saved_run(
    storage: Storage, run_id: str, data_root: str | None
) -> tuple[RunLayout, MemKDConfig, list[str], dict[str, dict]]:
    """The request of a run started earlier and the categories it finished."""
    layout = RunLayout(storage, run_id)
    request = saved_request(storage, layout.train_spec_path, run_id, "train")
    cfg = from_dict(request["config"])
    if data_root:
        cfg = replace(cfg, data=replace(cfg.data, root=data_root))
    finished = {}
    if storage.exists(layout.results_path):
        finished = {row["category"]: row for row in read_results(layout)
                    if row["status"] == "ok"}
    return layout, cfg, list(request["categories"]), finished


def _train_categories(cfg: MemKDConfig, names: list[str], layout: RunLayout, slots: int,
                      say: Callable[[str], None], train_loop: TrainLoop
                      ) -> tuple[dict[str, dict], str]:
    """Every category's trainer, `slots` at a time, under our Ctrl+C handling; returns the
    rows of the categories that ended and the signal that stopped the run, if any."""
    progress = Progress(cfg.distributed, say)
    flag = StopFlag.remote()
    interruption = Interruption()

    def train(name: str) -> dict:
        try:
            row = _train_category(cfg, name, layout, progress, flag, train_loop)
        except Exception as exc:
            if interruption.requested.is_set():
                return _row(cfg, layout, name, "interrupted")
            say(f"{name}: FAILED: {one_line_reason(exc)}")
            return _row(cfg, layout, name, "failed", error=one_line_reason(exc))
        if row["status"] == "interrupted":
            say(f"{name}: stopped after epoch {row['epochs']}")
        else:
            say(f"{name}: done in {row['wall_seconds']:.0f}s, I-AUROC {row['image_auroc']:.3f}")
        return row

    try:
        with (interruption.handlers(),
              worker_group_start_timeout(cfg.distributed.placement_timeout_s)):
            done = run_in_threads(names, slots, interruption, flag.set.remote, say, train)
    finally:
        progress.close()
        ray.kill(flag)
    return done, interruption.signal


def run_in_threads(
    names: list[str], slots: int, interruption: Interruption, stop_workers: Callable[[], Any],
    say: Callable[[str], None], run: Callable[[str], dict],
) -> dict[str, dict]:
    """Run `run(name)` for every name, `slots` at a time, in daemon threads; on a stop request
    start no more, call `stop_workers` and wait at most STOP_GRACE_S (a second signal: not at
    all). Returns the rows of the categories that ended; a thread still running when we stop
    waiting is abandoned (daemon: the process may exit; Ray ends its actors with us)."""
    queue = list(reversed(names))
    rows: dict[str, dict] = {}
    lock = threading.Lock()

    def worker() -> None:
        while not interruption.requested.is_set():
            with lock:
                if not queue:
                    return
                name = queue.pop()
            rows[name] = run(name)

    threads = [threading.Thread(target=worker, name=f"category-{i}", daemon=True)
               for i in range(min(slots, len(names)))]
    for thread in threads:
        thread.start()
    deadline = math.inf
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.2)
        if interruption.requested.is_set() and deadline == math.inf:
            say(f"{interruption.signal}: stopping every category at its next step "
                f"(waiting up to {STOP_GRACE_S:.0f}s; press Ctrl+C again to stop now)")
            stop_workers()
            deadline = time.monotonic() + STOP_GRACE_S
        if interruption.forced.is_set() or time.monotonic() > deadline:
            break
    return dict(rows)


def _train_category(cfg: MemKDConfig, category: str, layout: RunLayout, progress: Progress,
                    flag: Any, train_loop: TrainLoop) -> dict:
    filesystem = layout.storage.filesystem
    loop_config = {"category": category, "progress": progress.queue, "stop_flag": flag,
                   "run_dir": (filesystem, layout.category_dir(cfg.data.benchmark, category))}
    trainer = category_trainer(train_loop, loop_config, cfg, category,
                               layout.benchmark_dir(cfg.data.benchmark), filesystem)
    began = time.perf_counter()
    progress.launched(category)
    try:
        result = trainer.fit()
    except ray.train.ControllerError:
        if progress.started(category):
            raise
        raise PlacementError(f"no room in the cluster after "
                             f"{cfg.distributed.placement_timeout_s:g} s "
                             f"(distributed.placement_timeout_s): {needs(cfg.distributed)}"
                             ) from None
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    # A category found finished in storage reports its checkpoint's path instead of a new one.
    checkpoint = metrics.get("checkpoint_path") or (result.checkpoint and result.checkpoint.path)
    return _row(
        cfg, layout, category, "interrupted" if result.return_value == STOPPED else "ok",
        **{key: float(metrics.get(key, math.nan))
           for key in (*METRIC_KEYS, *DECISION_RATE_KEYS, *RECALL_KEYS)},
        epochs=int(metrics.get("epoch", 0)), workers=int(metrics.get("workers", 0)),
        wall_seconds=time.perf_counter() - began,
        checkpoint_uri=layout.storage.uri_for(checkpoint) if checkpoint else "")


def _row(cfg: MemKDConfig, layout: RunLayout, category: str, status: str,
         **values: Any) -> dict:
    return results_row(layout.run_id, cfg.data.benchmark, category, cfg.hash(), status,
                       **values)
