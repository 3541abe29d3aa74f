"""Anomaly maps and image scores (MemKD Eq. 3-4), computed on the model's device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memkd_ray.model.precision import in_float32


@in_float32
def anomaly_map(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    size: int,
    sigma: float = 4.0,
    stage_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Eq. 3-4: per stage per-pixel 1 - cosine over channels, bilinear up-sampling to the input
    size, summed over stages (Eq. 4's sum; `stage_weights` may weigh or drop a stage), then a
    Gaussian filter. Returns float32 (B, size, size), also for bfloat16 features."""
    weights = stage_weights if stage_weights is not None else [1.0] * len(student_features)
    total = None
    for student, teacher, weight in zip(student_features, teacher_features, weights,
                                        strict=True):
        if weight == 0:
            continue
        distance = weight * (1 - F.cosine_similarity(student, teacher, dim=1).unsqueeze(1))
        # align_corners=True as in RD's reference evaluation.
        upsampled = F.interpolate(distance, size=(size, size), mode="bilinear", align_corners=True)
        total = upsampled if total is None else total + upsampled
    return gaussian_filter(total.squeeze(1), sigma)


def image_scores(maps: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """The image-level anomaly score: the mean of the `top_k` largest values of its map;
    1 is the map's maximum, the paper's score."""
    flat = maps.flatten(1)
    if top_k == 1:
        return flat.amax(dim=1)
    return flat.topk(min(top_k, flat.shape[1]), dim=1).values.mean(dim=1)


def gaussian_filter(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """2-D Gaussian filter of (B, H, W) maps, equal to scipy.ndimage.gaussian_filter with its
    defaults (mode='reflect', truncate=4) applied per map, but batched on any device."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)
    for dim in (2, 3):
        x = x.index_select(dim, _symmetric_indices(x.shape[dim], radius, maps.device))
        weight = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        x = F.conv2d(x, weight)
    return x.squeeze(1)


def _symmetric_indices(length: int, radius: int, device: torch.device) -> torch.Tensor:
    # scipy's 'reflect' repeats the edge sample (d c b a | a b c d | d c b a), period 2n.
    positions = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(positions >= length, 2 * length - 1 - positions, positions)
