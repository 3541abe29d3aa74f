"""Torch views of a category's samples: all training images in memory, test images lazily."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from memkd_ray.data.sample import Sample

# Images per decoding task: large enough to amortise a worker round trip, small enough that
# every worker gets several.
DECODE_BATCH = 16


def load_training_images(samples: Sequence[Sample], size: int, workers: int = 0) -> torch.Tensor:
    """All training images as one uint8 tensor (N, 3, size, size), decoded by `workers`
    processes (0: in this one).

    Every epoch starts from the same pixels (augmentation works on this tensor), so decoding
    them once is cheaper than a loader per epoch; at 256 px even VisA's largest category
    takes under 200 MB.
    """
    loader = DataLoader(DecodedImages(samples, size), batch_size=DECODE_BATCH,
                        num_workers=workers)
    return torch.cat(list(loader))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float in [0, 1]."""
    return images.float().div_(255)


def _decode_image(sample: Sample, size: int) -> torch.Tensor:
    """A sample's image as uint8 (3, size, size)."""
    return torch.from_numpy(sample.load_image(size)).permute(2, 0, 1)


class SampleDataset(Dataset):
    """Samples decoded lazily at one size, so that loader workers can decode in parallel."""

    def __init__(self, samples: Sequence[Sample], size: int) -> None:
        self.samples = list(samples)
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)


class DecodedImages(SampleDataset):
    """Samples' images as uint8 (3, size, size)."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return _decode_image(self.samples[index], self.size)


class TestImages(SampleDataset):
    """Test images in [0, 1] with their binary masks, resized to the metric resolution."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        mask = torch.from_numpy(sample.load_mask(self.size))
        return to_float(_decode_image(sample, self.size)), mask


class ArrayImages(Dataset):
    """Images and masks already in memory (the validation split), as TestImages yields them."""

    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.masks = torch.from_numpy(masks)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.images[index]), self.masks[index]
