"""`train_loop_per_worker`: the single-process loop of engine.py, data-parallel under Ray Train.

Each worker of a category's group holds the whole (small) training set and its teacher-feature
cache, trains on its DistributedSampler shard with the global batch split across workers,
draws its own NEL exemplars, and DDP averages the gradients. Rank 0 writes the checkpoints.
When the driver asks for a stop (Ctrl+C), the workers leave at the next step boundary without
a checkpoint of the unfinished epoch: a resumed run repeats that epoch only.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import ray.exceptions
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DistributedSampler

from memkd_ray.checkpoint import restore_training_state, save_checkpoint
from memkd_ray.config import MemKDConfig, from_dict, validate
from memkd_ray.data import read_configured_category
from memkd_ray.data.datasets import ArrayImages, load_training_images
from memkd_ray.data.validation import make_validation_split
from memkd_ray.engine import (
    MemKDObjective,
    TrainState,
    calibrate_normal_map,
    evaluate,
    evaluate_dataset,
    make_optimizer,
    maybe_compile,
    place_model,
    start_epoch,
    train_one_epoch,
    training_features,
    with_training_budget,
)
from memkd_ray.eval_record import RECORD_DIR, encode_eval_record
from memkd_ray.model import MemKD, create_memkd


def sharded_batches(
    count: int, batch_size: int, rank: int, world: int, seed: int, epoch: int
) -> list[torch.Tensor]:
    """This worker's index batches for one epoch.

    The sampler pads the shards to equal length, so every worker runs the same number of steps
    (DDP needs that); a trailing batch of one is dropped everywhere alike (BatchNorm).
    """
    sampler = DistributedSampler(range(count), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


STOPPED = "stopped"
"""What the loop returns when the driver stopped it before its last epoch."""


class StopPolling:
    """Whether the driver asked for a stop (launcher.StopFlag). Polled at most once a second;
    with several workers the answer is all-reduced every `every` steps, so that all of them stop
    at the same step (DDP would wait forever for one that went on)."""

    POLL_S = 1.0

    def __init__(self, flag: Any, world: int, device: torch.device, every: int = 4) -> None:
        self.flag, self.world, self.device = flag, world, device
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
            votes = torch.tensor([float(self._seen)], device=self.device)
            torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
            self.requested = bool(votes.item())
        else:
            self.requested = self._seen
        return self.requested


def until_stopped(batches: Iterable[torch.Tensor], stop: StopPolling) -> Iterator[torch.Tensor]:
    for batch in batches:
        if stop():
            return
        yield batch


def sync_student_batchnorm(model: MemKD) -> None:
    """The student's BatchNorm layers as SyncBatchNorm: in training, statistics over every
    worker's share of the batch. Same parameters and buffer names, so checkpoints load into
    the plain model; the frozen teacher's BatchNorm (eval mode) is left alone."""
    model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)


def train_loop_per_worker(loop_config: dict[str, Any]) -> str | None:
    cfg: MemKDConfig = validate(from_dict(loop_config["config"]))
    category: str = loop_config["category"]
    progress = loop_config.get("progress")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _emit(progress, rank, {"category": category, "event": "started"})  # placed: not waiting
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = ray.train.torch.get_device()

    # Under hyper-parameter search (`selection`), every epoch is scored for the scheduler; with
    # the default validation selection the test split is not even listed.
    selection = loop_config.get("selection")
    data = read_configured_category(cfg.data, category, with_test=selection != "validation")
    train_samples, validation = data.train, None
    if selection == "validation":
        split = make_validation_split(data.train, cfg.data.image_size, cfg.train.seed,
                                      cfg.tune.validation_normal_fraction,
                                      cfg.tune.validation_defect_fraction)
        train_samples, validation = split.train, split
    cfg = with_training_budget(cfg, len(train_samples))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    # On the device before the optimiser exists, so restored Adam moments land beside it.
    model = place_model(create_memkd(cfg), cfg, device)
    if world > 1 and device.type == "cuda" and cfg.distributed.sync_batchnorm:
        sync_student_batchnorm(model)
    state = TrainState(model, make_optimizer(model, cfg),
                       torch.Generator().manual_seed(cfg.train.seed + rank))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            restore_training_state(directory, state)
        if rank != 0:  # the checkpoint holds rank 0's RNG; the others draw their own exemplars
            state.generator.manual_seed(cfg.train.seed + rank + 1000 * state.epoch)
        _emit(progress, rank, {"category": category, "event": "resumed", "epoch": state.epoch})
    if restored is not None and state.epoch >= cfg.train.epochs:
        # The run had finished, but whoever launched it died before recording that (an
        # interrupted search): hand back its last result and checkpoint without retraining.
        ray.train.report({**state.history[-1], "checkpoint_path": restored.path})
        return None
    objective = maybe_compile(ray.train.torch.prepare_model(MemKDObjective(model, cfg)), cfg)

    images = load_training_images(train_samples, cfg.data.image_size, cfg.train.loader_workers)
    features = training_features(cfg, model.teacher, images, device)
    per_worker_batch = cfg.train.batch_size // world  # launcher.check_worker_split
    fault = loop_config.get("fault") or {}
    record: dict[str, bytes] | None = None
    stop = StopPolling(loop_config.get("stop_flag"), world, device)

    for epoch in range(state.epoch, cfg.train.epochs):
        started = time.perf_counter()
        start_epoch(state.optimizer, cfg, epoch)
        batches = sharded_batches(len(images), per_worker_batch, rank, world, cfg.train.seed,
                                  epoch)
        stats = train_one_epoch(model, features, until_stopped(batches, stop), state.optimizer,
                                cfg, state.generator, objective)
        if stop.requested:  # the unfinished epoch is dropped; Result.return_value says why
            return STOPPED
        state.epoch = epoch + 1
        if restored is None and state.epoch == fault.get("fail_at_epoch"):
            _inject_fault(fault, rank)
        metrics: dict[str, Any] = {"epoch": state.epoch, "workers": world, **stats,
                                   "seconds": time.perf_counter() - started}
        last = state.epoch == cfg.train.epochs
        every = cfg.train.eval_every
        if rank == 0 and validation is not None:
            calibrate_normal_map(model, features, cfg)
            scores = evaluate_dataset(model, ArrayImages(validation.images, validation.masks),
                                      validation.labels, cfg, device).metrics
            metrics.update({f"val_{key}": value for key, value in scores.items()})
        elif rank == 0 and (last or selection or (every and state.epoch % every == 0)):
            calibrate_normal_map(model, features, cfg)
            evaluation = evaluate(model, data.test, cfg, device)
            metrics.update(evaluation.metrics)
            if last and selection is None:  # the final test evaluation, kept for the report
                record = encode_eval_record(data.test, evaluation, cfg.data.image_size)
        state.history.append(metrics)
        _emit(progress, rank, {"category": category, "event": "epoch", **metrics})
        if last or state.epoch % cfg.train.checkpoint_every == 0:
            _report_with_checkpoint(metrics, state, cfg, rank, category, record)
        else:
            ray.train.report(metrics)
    return None


def _report_with_checkpoint(
    metrics: dict[str, Any], state: TrainState, cfg: MemKDConfig, rank: int, category: str,
    record: dict[str, bytes] | None,
) -> None:
    """Every worker reports (it is a barrier); only rank 0 attaches the checkpoint, with the
    test evaluation record (eval_record.py) after the last epoch."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as scratch:
        scored = {k: v for k, v in metrics.items() if k.startswith(("image_", "pixel_"))}
        directory = save_checkpoint(f"{scratch}/checkpoint", state.model, cfg, state.epoch,
                                    scored, state=state, category=category)
        if record is not None:
            (directory / RECORD_DIR).mkdir()
            for name, data in record.items():
                (directory / RECORD_DIR / name).write_bytes(data)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_epoch_{state.epoch:04d}")


def _emit(progress: Any, rank: int, message: dict[str, Any]) -> None:
    """Progress for the driver's console; losing it (the queue actor died) must not stop
    training, which reports and checkpoints through Ray Train, not through the queue."""
    if progress is not None and rank == 0:
        try:
            progress.put(message, timeout=10)
        except Exception as exc:  # queue.Full, a dead queue actor (RayActorError)
            print(f"progress message not delivered ({type(exc).__name__})", flush=True)


def _inject_fault(fault: dict[str, Any], rank: int) -> None:
    """Test hook: fail once, on the first attempt, to exercise resume-from-checkpoint.

    The failure comes `delay_s` into the epoch, as a real crash would: Ray Train's controller
    registers a reported checkpoint when it next polls the workers (every 2 s by default), so
    a worker dying within that window of its last report loses that checkpoint too.
    """
    if rank != 0:
        return
    time.sleep(fault.get("delay_s", 5.0))
    if fault.get("mode", "raise") == "exit":
        os._exit(1)  # a hard kill: no exception, no cleanup
    raise RuntimeError("injected fault")
