"""The one sample type every benchmark reader produces, and safe image/mask loading."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from memkd_ray.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".PNG")


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark: where it is, its label, defect type and ground-truth mask.

    `label` is 0 for normal, 1 for anomalous; `mask_path` is None for normal images (their
    mask is all zeros) and for anomalous images of benchmarks without pixel annotations.
    """

    image_path: Path
    label: int
    defect: str
    mask_path: Path | None = None

    @property
    def id(self) -> str:
        """Stable identifier within a category split, e.g. `scratch_003`."""
        return f"{self.defect}_{self.image_path.stem}"

    def load_image(self, size: int | None = None) -> np.ndarray:
        """RGB uint8 array (H, W, 3); grayscale and palette images become RGB."""
        image = _open(self.image_path, decode=True).convert("RGB")
        if size is not None:
            image = image.resize((size, size), Image.BILINEAR)
        return np.array(image)

    def load_mask(self, size: int | None = None) -> np.ndarray:
        """Binary uint8 mask (H, W) with 1 on anomalous pixels; zeros without a mask file."""
        if self.mask_path is None:
            width, height = image_size(self.image_path)
            shape = (size, size) if size is not None else (height, width)
            return np.zeros(shape, dtype=np.uint8)
        mask = _open(self.mask_path, decode=True)
        if size is not None:
            mask = mask.resize((size, size), Image.NEAREST)
        return binarise_mask(mask)


def binarise_mask(mask: Image.Image) -> np.ndarray:
    """1 where a ground-truth mask is non-zero, as uint8.

    Single-band masks are read as stored, not through their colours: VisA's masks hold class
    ids (1, 2, 3, ...) and a palette PNG's colours are arbitrary (a class-id palette may map
    every id to black), so the index or value is what marks a defect, as VisA's own
    `prepare_data.py` binarises (`!= 0`). Colour masks count a pixel when any channel is set.
    """
    if len(mask.getbands()) > 1:
        mask = mask.convert("RGB")
    values = np.array(mask)
    if values.ndim == 3:
        values = values.max(axis=2)
    return (values != 0).astype(np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with _open(path) as image:
        return image.size


def validate_samples(samples: Iterable[Sample]) -> None:
    """Open every image and mask header: fail fast, naming the file, before any training."""
    for sample in samples:
        size = image_size(sample.image_path)
        if sample.mask_path is not None:
            mask_size = image_size(sample.mask_path)
            if mask_size != size:
                raise DataError(
                    f"{sample.mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image "
                    f"{sample.image_path} is {size[0]}x{size[1]}"
                )


def _open(path: Path, decode: bool = False) -> Image.Image:
    """Open an image (header only unless `decode`); any failure is a DataError naming it."""
    try:
        image = Image.open(path)
        if decode:
            image.load()
        return image
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__})") from None


def list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)
