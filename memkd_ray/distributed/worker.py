"""`train_loop_per_worker`: the epoch driver of engine/driver.py as a Ray Train worker.

Each worker of a category's group holds the whole (small) training set and its teacher-feature
cache, trains on its shard of every epoch with the global batch split across the workers,
draws its own NEL exemplars, and DDP averages the gradients. Rank 0 evaluates, writes the
checkpoints and sends the console lines. When the driver asks for a stop (Ctrl+C), the workers
leave at the next step boundary without a checkpoint of the unfinished epoch: a resumed run
repeats that epoch only.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray.exceptions
import ray.train
import ray.train.torch
import torch

from memkd_ray.checkpoint import restore_training_state, save_checkpoint
from memkd_ray.config import MemKDConfig, from_dict, validate
from memkd_ray.decision import DECISION_RATE_KEYS
from memkd_ray.engine import (
    ALREADY_FINISHED,
    STOPPED,
    EpochEnd,
    TrainState,
    Workers,
    resolve_device,
    train_category,
    training_inputs,
)
from memkd_ray.eval_record import encode_eval_record
from memkd_ray.storage.layout import checkpoint_dir_name, newest_complete_checkpoint

TrainLoop = Callable[[dict[str, Any]], Any]
"""What every worker of a category runs: `train_loop_per_worker`, or a wrapper of it."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> str | None:
    """`loop_config`: the config, the category, and from `train` the progress queue, the stop
    flag and the category's run directory, from `tune` the selection split. Returns STOPPED
    when the driver stopped it."""
    cfg = validate(from_dict(loop_config["config"]))
    category, selection = loop_config["category"], loop_config.get("selection")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    emit = _emitter(loop_config.get("progress"), rank, category)
    emit({"event": "started"})  # placed and running: not waiting for resources
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    train, scoring = training_inputs(cfg, category, selection)
    restored = _latest_checkpoint(loop_config.get("run_dir"))

    def restore(state: TrainState) -> None:
        with restored.as_directory() as directory:
            restore_training_state(directory, state)
        emit({"event": "resumed", "epoch": state.epoch})

    def report(end: EpochEnd) -> None:
        emit({"event": "epoch", **end.metrics})
        record = None
        if end.last and selection is None and end.evaluation is not None:
            record = encode_eval_record(scoring.samples, end.evaluation, cfg.data.image_size)
        _report(end, cfg, rank, category, record)

    training = train_category(
        cfg, train, scoring, resolve_device(cfg.train.device, ray.train.torch.get_device()),
        workers=Workers(rank, world, ray.train.torch.prepare_model),
        restore=restore if restored is not None else None, on_epoch=report,
        should_stop=StopPolling(loop_config.get("stop_flag"), world), name=category)
    if training.status == ALREADY_FINISHED:
        # The run had finished, but whoever launched it died before recording that (an
        # interrupted search): hand back its last result and checkpoint without retraining.
        ray.train.report({**training.state.history[-1], "checkpoint_path": restored.path})
    return STOPPED if training.status == STOPPED else None


def _report(end: EpochEnd, cfg: MemKDConfig, rank: int, category: str,
            record: dict[str, bytes] | None) -> None:
    """Every worker reports (it is a barrier); only rank 0 attaches the checkpoint, with the
    test evaluation record (eval_record.py) after the last epoch."""
    if rank != 0 or not end.checkpoint_due:
        ray.train.report(end.metrics)
        return
    with tempfile.TemporaryDirectory() as scratch:
        scored = {k: v for k, v in end.metrics.items()
                  if k.startswith(("image_", "pixel_")) or k in DECISION_RATE_KEYS}
        directory = save_checkpoint(f"{scratch}/checkpoint", end.state.model, cfg,
                                    end.state.epoch, scored, state=end.state, category=category,
                                    evaluation_record=record, decision=end.decision)
        ray.train.report(end.metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=checkpoint_dir_name(end.state.epoch))


def _latest_checkpoint(run_dir: tuple[Any, str] | None) -> ray.train.Checkpoint | None:
    """What to continue from. Given the category's run directory (filesystem, path), the
    newest complete checkpoint there, which may be newer than the one Ray registered (a
    driver killed after an upload, a worker within Ray's polling window); otherwise Ray's."""
    if run_dir is None:
        return ray.train.get_checkpoint()
    filesystem, path = run_dir
    newest = newest_complete_checkpoint(filesystem, path)
    return ray.train.Checkpoint(newest, filesystem) if newest else None


def _emitter(progress: Any, rank: int, category: str) -> Any:
    """Progress for the driver's console from rank 0; losing it (the queue actor died) must
    not stop training, which reports and checkpoints through Ray Train, not the queue."""

    def emit(message: dict[str, Any]) -> None:
        if progress is None or rank != 0:
            return
        try:
            progress.put({"category": category, **message}, timeout=10)
        except Exception as exc:  # queue.Full, a dead queue actor (RayActorError)
            print(f"progress message not delivered ({type(exc).__name__})", flush=True)

    return emit


class StopPolling:
    """Whether the driver asked for a stop (console.StopFlag). Polled at most once a second;
    with several workers the answer is all-reduced every `every` steps, so that all of them stop
    at the same step (DDP would wait forever for one that went on)."""

    POLL_S = 1.0

    def __init__(self, flag: Any, world: int, every: int = 4) -> None:
        self.flag, self.world = flag, world
        self.every = every if world > 1 else 1
        self.requested = False
        self._seen = False
        self._polled = -math.inf
        self._steps = 0

    def __call__(self) -> bool:
        self._steps += 1
        if self.requested or self._steps % self.every:
            return self.requested
        if self.flag is not None and time.monotonic() - self._polled >= self.POLL_S:
            self._polled = time.monotonic()
            # The driver gone or slow: training goes on, and so do its checkpoints.
            with contextlib.suppress(ray.exceptions.RayError):
                self._seen = self._seen or ray.get(self.flag.is_set.remote(), timeout=5)
        if self.world > 1:
            votes = torch.tensor([float(self._seen)], device=ray.train.torch.get_device())
            torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
            self.requested = bool(votes.item())
        else:
            self.requested = self._seen
        return self.requested
