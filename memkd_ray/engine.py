"""Training and evaluation of MemKD for ONE category; no Ray, no storage.

`fit` is the single-process loop; distributed code calls `train_one_epoch` and `evaluate`
the same way, with its own batches of indices and its own reporting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from memkd_ray.config import MemKDConfig
from memkd_ray.data import CategoryData
from memkd_ray.data.datasets import TestImages, load_training_images, to_float
from memkd_ray.data.sample import Sample
from memkd_ray.metrics import Curve, metrics_and_curves
from memkd_ray.model import MemKD, create_scorer
from memkd_ray.model.teacher import FEATURE_STRIDES, Teacher

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "kd", "nm", "orth")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype that `train.precision` / `eval.precision` mean on `device`;
    float32 means no autocast."""
    if name == "auto":
        # Only native bfloat16 (Ampere and later): emulated it is slower than float32.
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    return PRECISIONS[name]


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast the enclosed forward passes to `dtype`; float32 leaves them untouched.

    Losses, memory recall and anomaly maps opt out themselves (model/precision.py). bfloat16
    has float32's exponent range, so no gradient scaling is needed.
    """
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def use_channels_last(setting: str, device: torch.device) -> bool:
    """`train.channels_last` on `device`: `auto` is on for CUDA only, where cuDNN's tensor-core
    convolutions want NHWC; on CPU the default layout keeps today's results bit for bit."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def place_model(model: MemKD, cfg: MemKDConfig, device: torch.device) -> MemKD:
    """Move `model` to `device` in the configured memory format (in place; returns it); on
    CUDA let cuDNN pick its convolution algorithms by timing them, and make float32 IEEE
    float32.

    Call it before the optimiser takes its first step, so that Adam's moments are created in
    the parameters' layout. Inputs need no conversion: a convolution with channels-last
    weights produces channels-last outputs, so the layout propagates from the first layer.
    """
    model = model.to(device)
    if device.type == "cuda":
        # Input sizes are fixed: cuDNN may time its algorithms once per shape and keep the best.
        torch.backends.cudnn.benchmark = True
        # PyTorch runs cuDNN convolutions in TF32 (a 10-bit mantissa) by default: on an H200
        # that moved the teacher's features by up to 0.045 against the CPU. float32 stays
        # float32 (the paper's precision); bfloat16 autocast is the opt-in for speed.
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    if use_channels_last(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(objective: torch.nn.Module, cfg: MemKDConfig) -> torch.nn.Module:
    """The training objective, compiled with torch.compile if `train.compile` asks for it."""
    return torch.compile(objective) if cfg.train.compile else objective


def teacher_device(teacher: Teacher) -> torch.device:
    return next(iter(teacher.buffers())).device


# Where TrainingFeatures keeps the teacher features: on the training device, in host memory
# (copied to the device per batch), or nowhere (recomputed per batch).
CACHE_PLACEMENTS = ("device", "host", "off")


class TrainingFeatures:
    """Teacher features of a category's training images, looked up by index.

    The teacher is frozen and there is no augmentation, so its features of the training set
    never change: with a cache they are computed once (the main training speed lever),
    otherwise recomputed for every batch and every exemplar set. `cache` is a placement of
    CACHE_PLACEMENTS, or a bool (True: on the device). `precision` is the autocast dtype of
    the teacher; a bfloat16 cache takes half the memory of a float32 one.
    """

    def __init__(
        self, teacher: Teacher, images: torch.Tensor, device: torch.device, cache: bool | str,
        batch_size: int = 32, *, precision: torch.dtype = torch.float32,
    ) -> None:
        self.teacher = teacher
        self.device = device
        self.precision = precision
        self.placement = {True: "device", False: "off"}.get(cache, cache)
        if self.placement not in CACHE_PLACEMENTS:
            raise ValueError(f"feature cache placement {cache!r} is not one of "
                             f"{CACHE_PLACEMENTS} or a bool")
        # Host batches go to a GPU through pinned memory, so the copy runs asynchronously.
        self.pinned = self.placement == "host" and device.type == "cuda"
        self.cached: list[torch.Tensor] | None = None
        if self.placement == "off":
            # Read at every step: the uint8 images are small next to their features, so they
            # live on the device and only the indices travel.
            self.images = images.to(device)
        else:
            self.images = images
            self.cached = self._build_cache(batch_size)

    def __len__(self) -> int:
        return len(self.images)

    def _compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        with autocast(self.device, self.precision):
            return self.teacher(to_float(images.to(self.device)))

    def _build_cache(self, batch_size: int) -> list[torch.Tensor]:
        # Filled chunk by chunk into preallocated tensors: the device never holds the
        # chunks and their concatenation at once, which would double the cache's peak size.
        where = self.device if self.placement == "device" else torch.device("cpu")
        stages: list[torch.Tensor] = []
        for start in range(0, len(self.images), batch_size):
            chunk = self._compute(self.images[start : start + batch_size])
            if not stages:
                stages = [torch.empty((len(self.images), *f.shape[1:]), dtype=f.dtype,
                                      device=where, memory_format=_layout(f)) for f in chunk]
            for stage, features in zip(stages, chunk, strict=True):
                stage[start : start + len(features)] = features
        return stages

    def __call__(self, indices: torch.Tensor) -> list[torch.Tensor]:
        if self.cached is None:
            return self._compute(self.images[indices.to(self.images.device)])
        if self.pinned:
            return [_gather_pinned(stage, indices).to(self.device, non_blocking=True)
                    for stage in self.cached]
        return [stage[indices.to(stage.device)] for stage in self.cached]


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _gather_pinned(stage: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of a host tensor, gathered straight into pinned memory (one copy, not two)."""
    out = torch.empty((len(indices), *stage.shape[1:]), dtype=stage.dtype, pin_memory=True,
                      memory_format=_layout(stage))
    return torch.index_select(stage, 0, indices, out=out)


def feature_cache_bytes(
    teacher: Teacher, images: int, size: int, element_size: int = 4
) -> int:
    per_image = sum(c * (size // s) ** 2 for c, s in zip(teacher.channels, FEATURE_STRIDES,
                                                        strict=True))
    return element_size * per_image * images


def use_feature_cache(cfg: MemKDConfig, teacher: Teacher, images: int) -> str:
    """Where to cache the teacher features of `images` training images (CACHE_PLACEMENTS),
    following `train.feature_cache`; the training device is the teacher's."""
    setting = cfg.train.feature_cache
    if setting in CACHE_PLACEMENTS:
        return setting
    device = teacher_device(teacher)
    element_size = resolve_precision(cfg.train.precision, device).itemsize
    needed = feature_cache_bytes(teacher, images, cfg.data.image_size, element_size)
    if setting == "auto" and needed > cfg.train.feature_cache_max_gb * 2**30:
        return "off"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if needed > cfg.train.feature_cache_device_share * free:
            return "host"
    return "device"


def training_features(
    cfg: MemKDConfig, teacher: Teacher, images: torch.Tensor, device: torch.device
) -> TrainingFeatures:
    """TrainingFeatures with the configured cache placement and training precision."""
    return TrainingFeatures(teacher, images, device, use_feature_cache(cfg, teacher, len(images)),
                            precision=resolve_precision(cfg.train.precision, device))


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


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Optimiser steps in one epoch over `count` images: the batches shuffled_batches yields."""
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
        group["lr"] = learning_rate(cfg, epoch)


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
    distributed training the same wrapped for gradient synchronisation. The forward pass runs
    under `train.precision`'s autocast on the features' device; the loss terms are float32.
    """
    model.train()
    objective = objective if objective is not None else MemKDObjective(model, cfg)
    dtype = resolve_precision(cfg.train.precision, features.device)
    steps = []
    for batch in batches:
        exemplars = None
        if model.needs_exemplars(cfg.loss.lambda_nm):
            exemplars = features(exemplar_indices(len(features), cfg.train.exemplars, generator))
        teacher_features = features(batch)
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


@dataclass
class Evaluation:
    """Per-image anomaly maps and masks at the metric resolution, and the five metrics."""

    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    metrics: dict[str, float]
    curves: dict[str, Curve] = field(default_factory=dict)
    """The ROC and PRO curves behind the metrics (metrics.metrics_and_curves)."""


@torch.no_grad()
def predict_maps(
    model: MemKD, images: torch.Tensor, cfg: MemKDConfig, precision: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 anomaly maps (B, size, size) and image scores (B,) for images in [0, 1], on
    the images' device; the networks run under autocast to `precision`. The model's normal
    map (zeros unless calibrated) is subtracted before the scores (`eval.score_top_k`) are
    taken."""
    model.eval()
    # The map and score run in float32 whatever the autocast (model.anomaly_map.in_float32).
    with autocast(images.device, precision):
        return create_scorer(model, cfg)(images)


@torch.no_grad()
def calibrate_normal_map(model: MemKD, features: TrainingFeatures, cfg: MemKDConfig) -> None:
    """With `eval.normal_map: mean`, set the model's normal map to the mean anomaly map of the
    training images (their cached teacher features, so only the student runs).

    A pixel's map value on normal images depends on where it is: the student reproduces the
    teacher less well at the image border (zero padding) and on the busy parts of a scene,
    and there the maximum of a normal image's map sits. Subtracting the normal mean makes the
    map say how much worse than usual a pixel is, which is what a defect is.
    """
    model.normal_map_mean.zero_()
    if cfg.eval.normal_map == "none":
        return
    model.eval()
    precision = resolve_precision(cfg.eval.precision, features.device)
    scorer = create_scorer(model, cfg)
    total = torch.zeros_like(model.normal_map_mean)
    for start in range(0, len(features), cfg.eval.batch_size):
        indices = torch.arange(start, min(start + cfg.eval.batch_size, len(features)))
        teacher_features = features(indices)
        with autocast(features.device, precision):
            student_features = model.student_forward(teacher_features)
        total += scorer.raw_map(student_features, teacher_features[:3]).sum(dim=0)
    model.normal_map_mean.copy_(total / len(features))


def evaluate(
    model: MemKD, samples: list[Sample], cfg: MemKDConfig, device: torch.device
) -> Evaluation:
    """Maps and the five metrics on a category's test samples."""
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return evaluate_dataset(model, TestImages(samples, cfg.data.image_size), labels, cfg, device)


def evaluate_dataset(
    model: MemKD, dataset: Dataset, labels: np.ndarray, cfg: MemKDConfig, device: torch.device
) -> Evaluation:
    """Maps and the five metrics on any dataset yielding (image in [0, 1], mask), predicted
    in batches of `eval.batch_size` under `eval.precision`."""
    loader = image_loader(dataset, cfg.eval.batch_size, cfg.train.loader_workers, device)
    precision = resolve_precision(cfg.eval.precision, device)
    maps, masks, scores = [], [], []
    for images, batch_masks in loader:
        batch_maps, batch_scores = predict_maps(model, images.to(device, non_blocking=True),
                                                cfg, precision)
        # Left on the device and fetched once: no wait for the GPU between batches.
        maps.append(batch_maps)
        scores.append(batch_scores)
        masks.append(batch_masks)
    result = Evaluation(
        maps=torch.cat(maps).cpu().numpy(),
        masks=torch.cat(masks).numpy().astype(np.uint8),
        labels=labels,
        scores=torch.cat(scores).cpu().numpy(),
        metrics={},
    )
    result.metrics, result.curves = metrics_and_curves(result.maps, result.masks,
                                                       result.labels, result.scores)
    return result


def image_loader(
    dataset: Dataset, batch_size: int, workers: int, device: torch.device
) -> DataLoader:
    """Batches of decoded images: `workers` processes decode, and batches bound for a GPU
    land in pinned memory so their copies can run asynchronously."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda")


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
    """Train from `state.epoch` to `cfg.train.epochs` (or the epochs of `cfg.train.steps`),
    evaluate on the test split at the configured epochs and at the end; `on_epoch` sees every
    epoch (for checkpoints, logs)."""
    cfg = with_training_budget(cfg, len(data.train))
    model = place_model(state.model, cfg, device)
    images = load_training_images(data.train, cfg.data.image_size, cfg.train.loader_workers)
    features = training_features(cfg, model.teacher, images, device)
    objective = maybe_compile(MemKDObjective(model, cfg), cfg)
    log.info("%s/%s: %d training images, teacher feature cache %s, teacher in %s",
             data.benchmark, data.category, len(images), features.placement,
             str(features.precision).removeprefix("torch."))
    epochs = range(state.epoch, cfg.train.epochs)
    with logging_redirect_tqdm():
        # disable=None: a bar on terminals only, clean epoch lines in logs and CI.
        bar = tqdm(epochs, desc=data.category, unit="epoch", disable=None if progress else True,
                   leave=False)
        evaluation = _run_epochs(state, bar, features, objective, data, cfg, device, on_epoch)
    if evaluation is None:  # nothing left to train: evaluate the loaded weights
        evaluation = evaluate(model, data.test, cfg, device)
    return evaluation


def _run_epochs(
    state: TrainState,
    bar: tqdm,
    features: TrainingFeatures,
    objective: torch.nn.Module,
    data: CategoryData,
    cfg: MemKDConfig,
    device: torch.device,
    on_epoch: EpochCallback | None,
) -> Evaluation | None:
    model = state.model
    evaluation = None
    for epoch in bar:
        started = time.perf_counter()
        start_epoch(state.optimizer, cfg, epoch)
        batches = shuffled_batches(len(features), cfg.train.batch_size, state.generator)
        stats = train_one_epoch(model, features, batches, state.optimizer, cfg, state.generator,
                                objective)
        state.epoch = epoch + 1
        stats = {"epoch": state.epoch, **stats, "seconds": time.perf_counter() - started}
        last = state.epoch == cfg.train.epochs
        every = cfg.train.eval_every
        evaluation = None
        if last or (every and state.epoch % every == 0):
            calibrate_normal_map(model, features, cfg)
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
