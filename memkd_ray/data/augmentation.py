"""Training-time augmentation of the training images, an option (the paper trains without).

Random crops, flips, quarter turns and small colour changes, drawn per image from the
training's own random generator (so a resumed run draws what an uninterrupted one would) and
applied to a batch on its device. The geometric operations are all affine maps of the
sampling grid, so a batch is resampled once whatever combination is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memkd_ray.config import TrainConfig

GEOMETRIC = frozenset(("crop", "hflip", "vflip", "rot90"))


@dataclass(frozen=True)
class Augmentation:
    operations: frozenset[str]
    """Names of config.AUGMENTATIONS."""
    crop: float
    """Smallest side of a crop, as a share of the image's side (`train.augment_crop`)."""
    jitter: float
    """Largest relative change of brightness, contrast and saturation
    (`train.augment_jitter`)."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Float images in [0, 1], (B, 3, H, W) with H == W, each with its own draw."""
        if self.operations & GEOMETRIC:
            theta = self._sampling_maps(len(images), generator)
            grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape),
                                 align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                                   align_corners=False)
        if "jitter" in self.operations:
            images = self._colour(images, generator)
        return images

    def _sampling_maps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 2, 3) maps from output to input coordinates, both in [-1, 1]."""
        scale = torch.ones(count)
        if "crop" in self.operations:
            scale = self.crop + (1 - self.crop) * torch.rand(count, generator=generator)
        # The crop's centre anywhere that keeps the crop inside the image.
        centre = (1 - scale)[:, None] * (2 * torch.rand(count, 2, generator=generator) - 1)
        mirror = torch.ones(count, 2)
        for axis, name in enumerate(("hflip", "vflip")):
            if name in self.operations:
                mirror[:, axis] = 1 - 2 * torch.randint(0, 2, (count,), generator=generator)
        turns = torch.zeros(count)
        if "rot90" in self.operations:
            turns = torch.randint(0, 4, (count,), generator=generator).float()
        # Exact multiples of 90 degrees: cos and sin of k * pi / 2 rounded to 0, +-1.
        cos, sin = torch.cos(turns * torch.pi / 2).round(), torch.sin(turns * torch.pi / 2).round()
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        linear = scale[:, None, None] * rotation * mirror[:, None, :]
        return torch.cat([linear, centre[:, :, None]], dim=2)

    def _colour(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = len(images)
        factors = 1 + self.jitter * (2 * torch.rand(count, 3, generator=generator) - 1)
        brightness, contrast, saturation = (factors[:, i, None, None, None].to(images)
                                            for i in range(3))
        images = images * brightness
        grey = _luma(images)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        images = (images - mean) * contrast + mean
        grey = _luma(images)
        images = grey + (images - grey) * saturation
        return images.clamp(0, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (B, 1, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return (images * weights[None, :, None, None]).sum(dim=1, keepdim=True)


def create_augmentation(train: TrainConfig) -> Augmentation | None:
    """The augmentation `train.augment` asks for (validated with the config); None for none."""
    if not train.augment:
        return None
    return Augmentation(frozenset(train.augment), train.augment_crop, train.augment_jitter)
