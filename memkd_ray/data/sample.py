"""The one sample type every benchmark reader produces, and safe image/mask loading."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from memkd_ray.errors import DataError, ImageTooLargeError, UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Image files by suffix, in any case (`.PNG`, `.Jpg`)."""


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
        return rgb_pixels(open_image(self.image_path, decode=True), size)

    def load_mask(self, size: int | None = None) -> np.ndarray:
        """Binary uint8 mask (H, W) with 1 on anomalous pixels; zeros without a mask file."""
        if self.mask_path is None:
            width, height = image_size(self.image_path)
            shape = (size, size) if size is not None else (height, width)
            return np.zeros(shape, dtype=np.uint8)
        mask = open_image(self.mask_path, decode=True)
        if size is not None:
            mask = mask.resize((size, size), Image.NEAREST)
        return binarise_mask(mask)


def rgb_pixels(image: Image.Image, size: int | None = None) -> np.ndarray:
    """A decoded image as RGB uint8 (H, W, 3), resized bilinearly to `size` x `size` if given:
    how every image the models see is made, from a file or from bytes (serving)."""
    if image.mode.startswith("I"):
        # 16-bit grey (PIL reads such PNGs and TIFFs as I;16 or I): scaled to 8 bits;
        # PIL's convert() would clip every value above 255 to white.
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.rint(grey).clip(0, 255).astype(np.uint8), "L")
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.BILINEAR)
    return np.array(image)


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


MAX_IMAGE_PIXELS = 8192 * 8192
"""The largest accepted image (64 Mpx, ~200 MB decoded as RGB). The model sees at most a few
hundred pixels a side; the largest benchmark images are ~1.5 Mpx (VisA). Anything far larger
is a mistake or a decompression bomb, and only costs memory."""
_too_large = (f"larger than the largest accepted image ({MAX_IMAGE_PIXELS // 2**20} Mpx, e.g. "
              "8192x8192): resize it")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with open_image(path) as image:
        return image.size


def validate_samples(samples: Iterable[Sample], decode: bool = False) -> None:
    """Open every image and mask: fail fast, naming the file, before any training.

    Headers only by default (sizes, formats); `decode` also decodes every pixel, which finds
    truncated files, with a few threads (decoders release the GIL)."""
    samples = list(samples)
    if not decode:
        for sample in samples:
            _check_sample(sample, decode=False)
        return
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(lambda sample: _check_sample(sample, decode=True), samples):
            pass


def _check_sample(sample: Sample, decode: bool) -> None:
    with open_image(sample.image_path, decode) as image:
        size = image.size
    if sample.mask_path is not None:
        with open_image(sample.mask_path, decode) as mask:
            mask_size = mask.size
        if mask_size != size:
            raise DataError(
                f"{sample.mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image "
                f"{sample.image_path} is {size[0]}x{size[1]}"
            )


def check_generated_side(size: int) -> int:
    """`--size` of a generated benchmark: at least 32 px (its defects are drawn tens of pixels
    wide), at most an image this package accepts (MAX_IMAGE_PIXELS)."""
    largest = math.isqrt(MAX_IMAGE_PIXELS)
    if not 32 <= size <= largest:
        raise UserInputError(f"--size {size}: must be between 32 and {largest}")
    return size


def open_image(source: Path | BinaryIO, decode: bool = False,
               name: str | None = None) -> Image.Image:
    """Open an image file, or a binary stream called `name` (header only unless `decode`);
    any failure is a DataError naming it.

    Images above MAX_IMAGE_PIXELS are refused from the header, before any decoding: PIL alone
    would decode anything up to twice its own bomb limit (178 Mpx) with just a warning."""
    path = source if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"{path}: {_too_large}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__})") from None
    width, height = image.size
    if image.mode == "F":  # nothing says which range of floats is black and which white
        image.close()
        raise DataError(f"{path}: 32-bit float pixels are not read; save it with 8 or 16 bits")
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageTooLargeError(f"{path}: {width}x{height} pixels: {_too_large}")
    if decode:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
            image.close()
            raise DataError(f"{path}: unreadable image ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:120]})") from None
    return image


def list_images(directory: Path) -> list[Path]:
    try:
        # Not `is_file()`: a dangling link named *.png is a missing image, not no image.
        return sorted(p for p in directory.iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    except OSError as exc:
        raise DataError(f"{directory}: cannot list ({exc.strerror or type(exc).__name__})"
                        ) from None
