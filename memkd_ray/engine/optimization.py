"""One epoch of optimisation: batches, exemplars, the learning-rate schedule, Eq. 11's step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch.utils.data import DistributedSampler

from memkd_ray.config import MemKDConfig
from memkd_ray.data.augmentation import create_augmentation
from memkd_ray.engine.devices import autocast, resolve_precision
from memkd_ray.engine.features import TrainingFeatures
from memkd_ray.model import MemKD

LOSS_TERMS = ("loss", "kd", "nm", "orth")


def epoch_batches(
    count: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[torch.Tensor]:
    """This worker's index batches for one epoch, shuffled by (seed, epoch) alone, so that a
    resumed run draws the epochs it has left exactly as an uninterrupted one.

    With several workers the sampler pads their shards to equal length, so every worker runs
    the same number of steps (DDP needs that); a trailing batch of one is dropped everywhere
    alike (BatchNorm needs two).
    """
    sampler = DistributedSampler(range(count), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed)
    sampler.set_epoch(epoch)
    batches = list(torch.tensor(list(sampler)).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Optimiser steps in one epoch over `count` images: the batches epoch_batches yields."""
    full, rest = divmod(count, batch_size)
    return full + (1 if rest > 1 or count == 1 else 0)


def with_training_budget(cfg: MemKDConfig, train_count: int) -> MemKDConfig:
    """`cfg` for a training set of `train_count` images: with a budget of `train.steps`, its
    epochs become the fewest that hold that many steps (unchanged when `train.steps` is 0)."""
    if cfg.train.steps == 0:
        return cfg
    epochs = math.ceil(cfg.train.steps / steps_per_epoch(train_count, cfg.train.batch_size))
    return replace(cfg, train=replace(cfg.train, epochs=max(1, epochs)))


def epoch_bound(cfg: MemKDConfig) -> int:
    """An upper bound of the epochs a run of `cfg` trains, before its training set is known."""
    return cfg.train.steps or cfg.train.epochs


def learning_rate(cfg: MemKDConfig, epoch: int) -> float:
    """The learning rate of epoch `epoch` (from 0) under `train.lr_schedule`."""
    if cfg.train.lr_schedule == "constant":
        return cfg.train.lr
    return 0.5 * cfg.train.lr * (1 + math.cos(math.pi * epoch / cfg.train.epochs))


def start_epoch(optimizer: torch.optim.Optimizer, cfg: MemKDConfig, epoch: int) -> None:
    """Set the epoch's learning rate. A function of the epoch alone, so a resumed run
    continues the schedule without any scheduler state in its checkpoint."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, epoch) * group.get("lr_scale", 1.0)


def exemplar_indices(count: int, exemplars: int, generator: torch.Generator) -> torch.Tensor:
    """N random normal training images for the normality embedding learning (Sec. 4.2)."""
    if exemplars >= count:
        return torch.randperm(count, generator=generator)
    return torch.randperm(count, generator=generator)[:exemplars]


class MemKDObjective(torch.nn.Module):
    """Eq. 11 as a module's forward, so that a data-parallel wrapper (DDP) can sync it."""

    def __init__(self, model: MemKD, cfg: MemKDConfig) -> None:
        super().__init__()
        self.model = model
        self.loss = cfg.loss

    def forward(
        self, teacher_features: list[torch.Tensor], exemplar_features: list[torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        return self.model.losses(teacher_features, exemplar_features, self.loss.lambda_nm,
                                 self.loss.lambda_orth, self.loss.orth)


def train_one_epoch(
    model: MemKD,
    features: TrainingFeatures,
    batches: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: MemKDConfig,
    generator: torch.Generator,
    objective: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One pass over `batches` (index tensors); returns the mean of each loss term. With
    `train.augment`, every batch (not the exemplars) is augmented with draws from `generator`.

    `objective` computes the loss terms; by default `MemKDObjective(model)`, under
    distributed training the same wrapped for gradient synchronisation. The forward pass runs
    under `train.precision`'s autocast on the features' device; the loss terms are float32.
    """
    model.train()
    objective = objective if objective is not None else MemKDObjective(model, cfg)
    dtype = resolve_precision(cfg.train.precision, features.device)
    augmentation = create_augmentation(cfg.train)
    steps = []
    for batch in batches:
        exemplars = None
        if model.needs_exemplars(cfg.loss.lambda_nm):
            exemplars = features(exemplar_indices(len(features), cfg.train.exemplars, generator))
        if augmentation is None:
            teacher_features = features(batch)
        else:
            teacher_features = features.augmented(batch, augmentation, generator)
        with autocast(features.device, dtype):
            terms = objective(teacher_features, exemplars)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        # Kept on the device until the epoch ends: reading a loss every step would make the
        # host wait for the GPU every step.
        steps.append(torch.stack([terms[key].detach() for key in LOSS_TERMS]))
    totals = dict.fromkeys(LOSS_TERMS, 0.0)
    # Summed one by one in Python floats, exactly as a per-step float() would.
    for row in torch.stack(steps).tolist() if steps else []:
        for key, value in zip(LOSS_TERMS, row, strict=True):
            totals[key] += value
    return {key: value / max(len(steps), 1) for key, value in totals.items()}


def make_optimizer(model: MemKD, cfg: MemKDConfig) -> torch.optim.Optimizer:
    """Adam over the student and the memories (paper Sec. 5.2); the memories in a group of
    their own at `memory.lr_scale` times the rate when that is not 1."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    memory = [p for p in model.memories.parameters() if p.requires_grad]
    if cfg.memory.lr_scale == 1.0 or not memory:
        return torch.optim.Adam(trainable, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    own = {id(p) for p in memory}
    groups = [{"params": [p for p in trainable if id(p) not in own]},
              {"params": memory, "lr": cfg.train.lr * cfg.memory.lr_scale,
               "lr_scale": cfg.memory.lr_scale}]
    return torch.optim.Adam(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
