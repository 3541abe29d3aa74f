"""Torch views of a category's samples: all training images in memory, test images lazily."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from memkd_ray.data.sample import Sample


def load_training_images(samples: Sequence[Sample], size: int) -> torch.Tensor:
    """All training images as one uint8 tensor (N, 3, size, size).

    Without augmentation every epoch sees the same pixels, so decoding them once is cheaper
    than a loader; at 256 px even VisA's largest category takes under 200 MB.
    """
    images = np.stack([s.load_image(size) for s in samples])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float in [0, 1]."""
    return images.float().div_(255)


class TestImages(Dataset):
    """Test images in [0, 1] with their binary masks, resized to the metric resolution."""

    def __init__(self, samples: Sequence[Sample], size: int) -> None:
        self.samples = list(samples)
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image = torch.from_numpy(sample.load_image(self.size)).permute(2, 0, 1)
        mask = torch.from_numpy(sample.load_mask(self.size))
        return to_float(image), mask


class ArrayImages(Dataset):
    """Images and masks already in memory (the validation split), as TestImages yields them."""

    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.masks = torch.from_numpy(masks)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.images[index]), self.masks[index]
