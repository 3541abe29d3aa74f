"""The frozen teacher's features of a category's training images, computed once or per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from memkd_ray.config import MemKDConfig
from memkd_ray.data.augmentation import Augmentation
from memkd_ray.data.datasets import to_float
from memkd_ray.engine.devices import autocast, resolve_precision, teacher_device
from memkd_ray.model.teacher import FEATURE_STRIDES, Teacher

# Where TrainingFeatures keeps the teacher features: on the training device, in host memory
# (copied to the device per batch), or nowhere (recomputed per batch).
CACHE_PLACEMENTS = ("device", "host", "off")


class TrainingFeatures:
    """Teacher features of a category's training images, looked up by index.

    The teacher is frozen, so its features of the training images as they are never change:
    with a cache they are computed once (the main training speed lever), otherwise recomputed
    for every batch and every exemplar set. Augmented images (`augmented`) are new at every
    step, so their features are always computed. `cache` is a placement of
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

    def _compute(self, images: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
        inputs = to_float(images.to(self.device))
        if transform is not None:
            inputs = transform(inputs)
        with autocast(self.device, self.precision):
            return self.teacher(inputs)

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

    def augmented(self, indices: torch.Tensor, augmentation: Augmentation,
                  generator: torch.Generator) -> list[torch.Tensor]:
        """Features of the images at `indices`, each augmented by its own draw."""
        images = self.images[indices.to(self.images.device)]
        return self._compute(images, lambda inputs: augmentation(inputs, generator))


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


