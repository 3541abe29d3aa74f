"""The epoch driver of one category: the only training loop there is.

`train_category` takes a category from a fresh or restored state to its last epoch: the step
budget, the learning-rate schedule, the batches, the evaluation cadence with its normal-map
calibration, a callback at the end of every epoch (checkpoints, reports) and a stop check.
`fit` runs it in this process; each Ray Train worker runs it through distributed/worker.py,
which supplies its share of the batches (`Workers`), the checkpoint restore, the reports and
the stop flag.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from memkd_ray.config import MEMORY_SITES, MemKDConfig
from memkd_ray.data import CategoryData, read_configured_category
from memkd_ray.data.datasets import ArrayImages, load_training_images
from memkd_ray.data.sample import Sample
from memkd_ray.data.validation import hold_out_normals, make_validation_split
from memkd_ray.decision import Decision, decision_rates
from memkd_ray.engine.devices import maybe_compile, place_model, resolve_device
from memkd_ray.engine.evaluation import (
    Evaluation,
    calibrate_decision,
    calibrate_normal_map,
    evaluate_dataset,
    labelled_test_images,
)
from memkd_ray.engine.features import TrainingFeatures, training_features
from memkd_ray.engine.memory_recall import RecallProbe, initialise_memory_values
from memkd_ray.engine.optimization import (
    MemKDObjective,
    epoch_batches,
    make_optimizer,
    start_epoch,
    train_one_epoch,
    with_training_budget,
)
from memkd_ray.model import MemKD, create_memkd

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the data."""

    model: MemKD
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Scoring:
    """The images a category is scored on while it trains, and how often."""

    images: Dataset
    """(image in [0, 1], mask) pairs, as evaluation.evaluate_dataset reads them."""
    labels: np.ndarray
    prefix: str = ""
    """Put before the metric names: `val_` for a validation split."""
    every_epoch: bool = False
    """Score every epoch (a search's scheduler needs it) instead of `train.eval_every`."""
    samples: list[Sample] | None = None
    """The test samples, when the test split is scored."""
    held_out: tuple[Sample, ...] = ()
    """Normal training images not trained on: the decision threshold is fitted on them after
    the last epoch (none: the model carries no decision)."""

    @classmethod
    def test_split(cls, samples: list[Sample], image_size: int, every_epoch: bool = False,
                   held_out: Sequence[Sample] = ()) -> Scoring:
        return cls(*labelled_test_images(samples, image_size), every_epoch=every_epoch,
                   samples=samples, held_out=tuple(held_out))

    def due(self, epoch: int, last: bool, every: int) -> bool:
        return self.every_epoch or last or bool(every and epoch % every == 0)


def training_inputs(cfg: MemKDConfig, category: str,
                    selection: str | None = None) -> tuple[list[Sample], Scoring]:
    """The training samples of `category` and what it is scored on.

    `selection` None scores the test split (after the last epoch and every
    `train.eval_every`); a search scores every epoch, on the test split (`test`) or on a
    validation split cut from the training images (`validation`, data/validation.py), in
    which case the test split is not even listed. Either way `decision.holdout_fraction` of
    the training images is first held out for the decision threshold.
    """
    data = read_configured_category(cfg.data, category, with_test=selection != "validation")
    train, held_out = decision_holdout(cfg, data.train, category)
    if selection != "validation":
        return train, Scoring.test_split(data.test, cfg.data.image_size,
                                         every_epoch=selection is not None, held_out=held_out)
    split = make_validation_split(train, cfg.data.image_size, cfg.train.seed,
                                  cfg.tune.validation_normal_fraction,
                                  cfg.tune.validation_defect_fraction)
    scoring = Scoring(ArrayImages(split.images, split.masks), split.labels, "val_", True,
                      held_out=tuple(held_out))
    return split.train, scoring


def decision_holdout(cfg: MemKDConfig, train: list[Sample],
                     category: str) -> tuple[list[Sample], list[Sample]]:
    """(images to train on, images held out for the decision threshold)."""
    kept, held_out = hold_out_normals(train, cfg.train.seed, cfg.decision.holdout_fraction,
                                      cfg.decision.min_holdout)
    if cfg.decision.holdout_fraction and not held_out:
        log.warning("%s: %d training images are too few to hold out %d for the decision "
                    "threshold; the model will carry none", category, len(train),
                    cfg.decision.min_holdout)
    return kept, held_out


def _as_is(module: torch.nn.Module) -> torch.nn.Module:
    return module


@dataclass(frozen=True)
class Workers:
    """This process's place in a category's data-parallel group; one process by default.
    `wrap` makes the objective synchronise its gradients (DDP) across the group."""

    rank: int = 0
    world: int = 1
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = _as_is


@dataclass
class EpochEnd:
    """What the per-epoch callback sees; every worker of a group calls it at the same epoch."""

    state: TrainState
    metrics: dict[str, float]
    evaluation: Evaluation | None
    """The scoring of this epoch (rank 0 only), when one was due."""
    last: bool
    checkpoint_due: bool
    """Every `train.checkpoint_every` epochs and after the last one."""
    decision: Decision | None = None
    """After the last epoch (rank 0), fitted on `Scoring.held_out` when it holds images."""


FINISHED, STOPPED, ALREADY_FINISHED = "finished", "stopped", "already_finished"


@dataclass
class Training:
    state: TrainState
    evaluation: Evaluation | None
    """The last scoring (rank 0), None when no epoch was scored."""
    status: str
    """FINISHED; STOPPED (the stop check fired: the unfinished epoch was dropped); or
    ALREADY_FINISHED (the restored state had trained every epoch; nothing ran)."""
    decision: Decision | None = None


def sync_student_batchnorm(model: MemKD) -> None:
    """The student's BatchNorm layers as SyncBatchNorm: in training, statistics over every
    worker's share of the batch. Same parameters and buffer names, so checkpoints load into
    the plain model; the frozen teacher's BatchNorm (eval mode) is left alone."""
    model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)


def train_category(
    cfg: MemKDConfig,
    train: list[Sample],
    scoring: Scoring,
    device: torch.device,
    *,
    workers: Workers = Workers(),
    restore: Callable[[TrainState], None] | None = None,
    on_epoch: Callable[[EpochEnd], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    name: str = "",
) -> Training:
    """Train a category on `train` to the epochs of its budget and score it with `scoring`.

    `restore` loads a checkpoint into the fresh state; `should_stop` is asked before every
    step and, once true, ends the run without the unfinished epoch.
    """
    cfg = with_training_budget(cfg, len(train))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    # On the device before the optimiser exists, so restored Adam moments land beside it.
    model = place_model(create_memkd(cfg), cfg, device)
    if workers.world > 1 and device.type == "cuda" and cfg.distributed.sync_batchnorm:
        sync_student_batchnorm(model)
    state = TrainState(model, make_optimizer(model, cfg),
                       torch.Generator().manual_seed(cfg.train.seed + workers.rank))
    if restore is not None:
        restore(state)
        if workers.rank:  # the checkpoint holds rank 0's RNG; the others draw their own
            state.generator.manual_seed(cfg.train.seed + workers.rank + 1000 * state.epoch)
        if state.epoch >= cfg.train.epochs:
            return Training(state, None, ALREADY_FINISHED)
    images = load_training_images(train, cfg.data.image_size, cfg.train.loader_workers)
    features = training_features(cfg, model.teacher, images, device)
    if cfg.memory.value_init == "features" and state.epoch == 0:
        initialise_memory_values(model, features, cfg.train.seed)
    probe = None
    if workers.rank == 0 and scoring.held_out and model.memories:
        held_out = load_training_images(list(scoring.held_out), cfg.data.image_size,
                                        cfg.train.loader_workers)
        probe = RecallProbe.build(model, features,
                                  TrainingFeatures(model.teacher, held_out, device, "device"))
    objective = maybe_compile(workers.wrap(MemKDObjective(model, cfg)), cfg)
    log.info("%s: %d training images, teacher feature cache %s%s, teacher in %s", name,
             len(images), features.placement,
             f" (augmented steps: {', '.join(cfg.train.augment)})" if cfg.train.augment else "",
             str(features.precision).removeprefix("torch."))
    stop = _StopCheck(should_stop)
    evaluation = None
    for epoch in range(state.epoch, cfg.train.epochs):
        started = time.perf_counter()
        start_epoch(state.optimizer, cfg, epoch)
        batches = epoch_batches(len(features), cfg.train.batch_size // workers.world,
                                cfg.train.seed, epoch, workers.rank, workers.world)
        stats = train_one_epoch(model, features, stop.guard(batches), state.optimizer, cfg,
                                state.generator, objective)
        if stop.requested:
            return Training(state, evaluation, STOPPED)
        state.epoch = epoch + 1
        metrics = {"epoch": state.epoch, "workers": workers.world, **stats,
                   "seconds": time.perf_counter() - started}
        last = state.epoch == cfg.train.epochs
        if probe is not None:
            metrics.update(probe.measure(model))
        evaluation = decision = None
        if workers.rank == 0 and scoring.due(state.epoch, last, cfg.train.eval_every):
            calibrate_normal_map(model, features, cfg)
            evaluation = evaluate_dataset(model, scoring.images, scoring.labels, cfg, device)
            metrics.update({scoring.prefix + k: v for k, v in evaluation.metrics.items()})
            if last and scoring.held_out:
                decision = calibrate_decision(model, list(scoring.held_out), cfg, device)
                rates = decision_rates(evaluation.labels, evaluation.scores, decision)
                metrics.update({scoring.prefix + k: v for k, v in rates.items()})
        state.history.append(metrics)
        log.info(format_epoch(name, metrics))
        if on_epoch is not None:
            checkpoint_due = last or state.epoch % cfg.train.checkpoint_every == 0
            on_epoch(EpochEnd(state, metrics, evaluation, last, checkpoint_due, decision))
    return Training(state, evaluation, FINISHED, decision)


class _StopCheck:
    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop
        self.requested = False

    def guard(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for batch in batches:
            if self.should_stop is not None and self.should_stop():
                self.requested = True
                return
            yield batch


def fit(cfg: MemKDConfig, data: CategoryData, device: torch.device | None = None,
        on_epoch: Callable[[EpochEnd], None] | None = None) -> Training:
    """Train and evaluate a category in this process, as a worker of `memkd-ray train` does
    (on `train.device` unless `device` is given)."""
    device = device if device is not None else resolve_device(cfg.train.device)
    train, held_out = decision_holdout(cfg, data.train, data.category)
    scoring = Scoring.test_split(data.test, cfg.data.image_size, held_out=held_out)
    return train_category(cfg, train, scoring, device, on_epoch=on_epoch, name=data.category)


def format_epoch(category: str, stats: dict[str, float]) -> str:
    text = (f"{category} epoch {stats['epoch']}: loss {stats['loss']:.4f} "
            f"(kd {stats['kd']:.4f}, nm {stats['nm']:.4f}, orth {stats['orth']:.4f}) "
            f"{stats['seconds']:.1f}s")
    ratios = [stats[f"recall_error_{site}"] / stats[f"recall_mean_{site}"]
              for site in MEMORY_SITES if f"recall_error_{site}" in stats]
    if ratios:  # below 1: the memory recalls unseen normal features better than their mean
        text += " recall/mean " + "|".join(f"{ratio:.2f}" for ratio in ratios)
    if "image_auroc" in stats:
        text += f" I-AUROC {stats['image_auroc']:.3f}"
    return text
