"""Training and evaluation of MemKD for ONE category; no Ray, no storage.

`fit` is the single-process loop; distributed code calls `train_one_epoch` and `evaluate`
the same way, with its own batches of indices and its own reporting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from memkd_ray.config import MemKDConfig
from memkd_ray.data import CategoryData
from memkd_ray.data.datasets import TestImages, load_training_images, to_float
from memkd_ray.data.sample import Sample
from memkd_ray.metrics import compute_metrics
from memkd_ray.model import MemKD, anomaly_map, image_scores
from memkd_ray.model.teacher import FEATURE_STRIDES, Teacher

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "kd", "nm", "orth")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainingFeatures:
    """Teacher features of a category's training images, looked up by index.

    The teacher is frozen and there is no augmentation, so its features of the training set
    never change: with the cache on they are computed once (the main training speed lever),
    otherwise recomputed for every batch and every exemplar set.
    """

    def __init__(
        self, teacher: Teacher, images: torch.Tensor, device: torch.device, cache: bool,
        batch_size: int = 32,
    ) -> None:
        self.teacher = teacher
        self.images = images
        self.device = device
        self.cached: list[torch.Tensor] | None = None
        if cache:
            chunks = [self._compute(images[i : i + batch_size])
                      for i in range(0, len(images), batch_size)]
            self.cached = [torch.cat(stage) for stage in zip(*chunks, strict=True)]

    def __len__(self) -> int:
        return len(self.images)

    def _compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.teacher(to_float(images.to(self.device)))

    def __call__(self, indices: torch.Tensor) -> list[torch.Tensor]:
        if self.cached is not None:
            return [stage[indices.to(stage.device)] for stage in self.cached]
        return self._compute(self.images[indices])


def feature_cache_bytes(teacher: Teacher, images: int, size: int) -> int:
    per_image = sum(c * (size // s) ** 2 for c, s in zip(teacher.channels, FEATURE_STRIDES,
                                                        strict=True))
    return 4 * per_image * images


def use_feature_cache(cfg: MemKDConfig, teacher: Teacher, images: int) -> bool:
    if cfg.train.feature_cache != "auto":
        return cfg.train.feature_cache == "on"
    needed = feature_cache_bytes(teacher, images, cfg.data.image_size)
    return needed <= cfg.train.feature_cache_max_gb * 2**30


def shuffled_batches(
    count: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """One epoch of random index batches; the last short batch is kept unless it has one
    image (BatchNorm needs two)."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        batch = order[start : start + batch_size]
        if len(batch) > 1 or count == 1:
            yield batch


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
    """One pass over `batches` (index tensors); returns the mean of each loss term.

    `objective` computes the loss terms; by default `MemKDObjective(model)`, under
    distributed training the same wrapped for gradient synchronisation.
    """
    model.train()
    objective = objective if objective is not None else MemKDObjective(model, cfg)
    totals = dict.fromkeys(LOSS_TERMS, 0.0)
    steps = 0
    for batch in batches:
        exemplars = None
        if model.needs_exemplars(cfg.loss.lambda_nm):
            exemplars = features(exemplar_indices(len(features), cfg.train.exemplars, generator))
        terms = objective(features(batch), exemplars)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        for key in LOSS_TERMS:
            totals[key] += float(terms[key].detach())
        steps += 1
    return {key: value / max(steps, 1) for key, value in totals.items()}


@dataclass
class Evaluation:
    """Per-image anomaly maps and masks at the metric resolution, and the five metrics."""

    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    metrics: dict[str, float]


@torch.no_grad()
def predict_maps(
    model: MemKD, images: torch.Tensor, size: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (B, size, size) and image scores (B,) for images in [0, 1]."""
    model.eval()
    teacher_features, student_features = model(images)
    maps = anomaly_map(student_features, teacher_features, size, sigma)
    return maps, image_scores(maps)


def evaluate(
    model: MemKD, samples: list[Sample], cfg: MemKDConfig, device: torch.device
) -> Evaluation:
    """Maps and the five metrics on a category's test samples."""
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return evaluate_dataset(model, TestImages(samples, cfg.data.image_size), labels, cfg, device)


def evaluate_dataset(
    model: MemKD, dataset: Dataset, labels: np.ndarray, cfg: MemKDConfig, device: torch.device
) -> Evaluation:
    """Maps and the five metrics on any dataset yielding (image in [0, 1], mask)."""
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size)
    maps, masks, scores = [], [], []
    for images, batch_masks in loader:
        batch_maps, batch_scores = predict_maps(
            model, images.to(device), cfg.data.image_size, cfg.eval.gaussian_sigma
        )
        maps.append(batch_maps.float().cpu().numpy())
        scores.append(batch_scores.float().cpu().numpy())
        masks.append(batch_masks.numpy())
    result = Evaluation(
        maps=np.concatenate(maps).astype(np.float32),
        masks=np.concatenate(masks).astype(np.uint8),
        labels=labels,
        scores=np.concatenate(scores),
        metrics={},
    )
    result.metrics = compute_metrics(result.maps, result.masks, result.labels, result.scores)
    return result


def make_optimizer(model: MemKD, cfg: MemKDConfig) -> torch.optim.Optimizer:
    """Adam over the student and the memories (paper Sec. 5.2)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trainable, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


@dataclass
class TrainState:
    """Everything a resumed run needs besides the data."""

    model: MemKD
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


EpochCallback = Callable[[TrainState, dict[str, float], "Evaluation | None"], None]


def fit(
    state: TrainState,
    data: CategoryData,
    cfg: MemKDConfig,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> Evaluation:
    """Train from `state.epoch` to `cfg.train.epochs`, evaluate on the test split at the
    configured epochs and at the end; `on_epoch` sees every epoch (for checkpoints, logs)."""
    model = state.model.to(device)
    images = load_training_images(data.train, cfg.data.image_size)
    cache = use_feature_cache(cfg, model.teacher, len(images))
    features = TrainingFeatures(model.teacher, images, device, cache)
    log.info("%s/%s: %d training images, teacher feature cache %s", data.benchmark,
             data.category, len(images), "on" if cache else "off")
    epochs = range(state.epoch, cfg.train.epochs)
    with logging_redirect_tqdm():
        # disable=None: a bar on terminals only, clean epoch lines in logs and CI.
        bar = tqdm(epochs, desc=data.category, unit="epoch", disable=None if progress else True,
                   leave=False)
        evaluation = _run_epochs(state, bar, features, data, cfg, device, on_epoch)
    if evaluation is None:  # nothing left to train: evaluate the loaded weights
        evaluation = evaluate(model, data.test, cfg, device)
    return evaluation


def _run_epochs(
    state: TrainState,
    bar: tqdm,
    features: TrainingFeatures,
    data: CategoryData,
    cfg: MemKDConfig,
    device: torch.device,
    on_epoch: EpochCallback | None,
) -> Evaluation | None:
    model = state.model
    evaluation = None
    for epoch in bar:
        started = time.perf_counter()
        batches = shuffled_batches(len(features), cfg.train.batch_size, state.generator)
        stats = train_one_epoch(model, features, batches, state.optimizer, cfg, state.generator)
        state.epoch = epoch + 1
        stats = {"epoch": state.epoch, **stats, "seconds": time.perf_counter() - started}
        last = state.epoch == cfg.train.epochs
        every = cfg.train.eval_every
        evaluation = None
        if last or (every and state.epoch % every == 0):
            evaluation = evaluate(model, data.test, cfg, device)
            stats.update(evaluation.metrics)
        state.history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        log.info(format_epoch(data.category, stats))
        if on_epoch is not None:
            on_epoch(state, stats, evaluation)
    return evaluation


def format_epoch(category: str, stats: dict[str, float]) -> str:
    text = (f"{category} epoch {stats['epoch']}: loss {stats['loss']:.4f} "
            f"(kd {stats['kd']:.4f}, nm {stats['nm']:.4f}, orth {stats['orth']:.4f}) "
            f"{stats['seconds']:.1f}s")
    if "image_auroc" in stats:
        text += f" I-AUROC {stats['image_auroc']:.3f}"
    return text
