"""Seeded generator of a small MVTec-layout benchmark: textures and objects with scratches,
holes, stains and missing parts, plus their binary masks. Used by the demo and the tests."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from memkd_ray.data.sample import check_generated_side
from memkd_ray.errors import UserInputError

Painter = Callable[[np.random.Generator, int], tuple[Image.Image, Image.Image]]
"""Draws a normal image of the given size: (RGB image, L mask of where the object is)."""


@dataclass(frozen=True)
class SyntheticCategory:
    name: str
    paint: Painter
    defects: tuple[str, ...]
    grayscale: bool = False


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    return rng.normal(0, sigma, (size, size, 1))


def _finish(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def paint_stripes(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin((xx + yy) * 2 * np.pi / 16 + phase)
    low, high = np.array([60, 90, 140]), np.array([150, 180, 220])
    pixels = low + wave[..., None] * (high - low) + _noise(rng, size, 6)
    return _finish(pixels), Image.new("L", (size, size), 255)


def paint_mesh(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    yy, xx = np.mgrid[0:size, 0:size]
    offset = rng.integers(0, 12, size=2)
    lines = ((xx + offset[0]) % 12 < 3) | ((yy + offset[1]) % 12 < 3)
    pixels = np.where(lines, 190.0, 70.0)[..., None] + _noise(rng, size, 8)
    return _finish(np.repeat(pixels, 3, axis=2)), Image.new("L", (size, size), 255)


def paint_disc(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    image = Image.new("RGB", (size, size), (35, 35, 40))
    shape = Image.new("L", (size, size), 0)
    cx, cy = size / 2 + rng.uniform(-6, 6, size=2)
    outer, inner = 0.36 * size, 0.16 * size
    for draw, fill in ((ImageDraw.Draw(image), (200, 160, 60)), (ImageDraw.Draw(shape), 255)):
        draw.ellipse((cx - outer, cy - outer, cx + outer, cy + outer), fill=fill)
    ImageDraw.Draw(image).ellipse(
        (cx - inner, cy - inner, cx + inner, cy + inner), fill=(150, 110, 40), outline=(90, 60, 20),
        width=4,
    )
    pixels = np.asarray(image, dtype=np.float32) + _noise(rng, size, 5)
    return _finish(pixels), shape


def paint_plate(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    image = Image.new("RGB", (size, size), (20, 45, 30))
    shape = Image.new("L", (size, size), 0)
    dx, dy = rng.uniform(-5, 5, size=2)
    box = (0.18 * size + dx, 0.25 * size + dy, 0.82 * size + dx, 0.75 * size + dy)
    ImageDraw.Draw(image).rectangle(box, fill=(170, 170, 180))
    ImageDraw.Draw(shape).rectangle(box, fill=255)
    r = 0.04 * size
    for x in (box[0] + 3 * r, box[2] - 3 * r):
        for y in (box[1] + 3 * r, box[3] - 3 * r):
            ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=(20, 45, 30))
            ImageDraw.Draw(shape).ellipse((x - r, y - r, x + r, y + r), fill=0)
    pixels = np.asarray(image, dtype=np.float32) + _noise(rng, size, 5)
    return _finish(pixels), shape


def paint_weave(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    yy, xx = np.mgrid[0:size, 0:size]
    ox, oy = rng.integers(0, 16, size=2)
    cell = (((xx + ox) // 8) + ((yy + oy) // 8)) % 2
    warp = np.sin((xx + ox) * np.pi / 8) ** 2
    weft = np.sin((yy + oy) * np.pi / 8) ** 2
    shade = np.where(cell == 0, warp, weft)
    low, high = np.array([110, 70, 60]), np.array([200, 150, 120])
    pixels = low + shade[..., None] * (high - low) + _noise(rng, size, 6)
    return _finish(pixels), Image.new("L", (size, size), 255)


CATEGORIES = (
    SyntheticCategory("stripes", paint_stripes, ("scratch", "stain", "hole")),
    SyntheticCategory("mesh", paint_mesh, ("scratch", "hole", "missing"), grayscale=True),
    SyntheticCategory("disc", paint_disc, ("missing", "stain", "scratch")),
    SyntheticCategory("plate", paint_plate, ("hole", "missing", "scratch")),
    SyntheticCategory("weave", paint_weave, ("stain", "hole", "missing")),
)


def _defect_centre(rng: np.random.Generator, shape: Image.Image, margin: int) -> tuple[int, int]:
    # Defects land on the object (or anywhere on a texture), away from the border.
    inside = np.argwhere(np.asarray(shape)[margin:-margin, margin:-margin] > 0)
    y, x = inside[rng.integers(len(inside))]
    return int(x) + margin, int(y) + margin


def draw_defect(
    rng: np.random.Generator, image: Image.Image, shape: Image.Image, defect: str
) -> tuple[Image.Image, np.ndarray]:
    """Paint one defect onto a normal image; returns (defective image, binary mask)."""
    size = image.size[0]
    s = size / 256  # defect geometry is specified for 256 px images
    cx, cy = _defect_centre(rng, shape, int(40 * s))
    region = Image.new("L", image.size, 0)
    pen = ImageDraw.Draw(region)
    base = np.asarray(image, dtype=np.float32)
    if defect == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(50, 90) * s
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        pen.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=max(2, int(5 * s)))
        # Dark on bright surfaces, bright on dark ones, so the scratch always shows.
        luminance = base.reshape(-1, 3).mean()
        colour = np.full(3, 25.0 if luminance > 100 else 235.0)
    elif defect == "hole":
        r = rng.uniform(9, 16) * s
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        colour = np.array([15.0, 12.0, 10.0])
    elif defect == "stain":
        for _ in range(4):
            ox, oy = rng.uniform(-12, 12, size=2) * s
            r = rng.uniform(8, 15) * s
            pen.ellipse((cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r), fill=255)
        colour = np.array([rng.uniform(100, 255), rng.uniform(0, 60), rng.uniform(100, 255)])
    elif defect == "missing":
        half = rng.uniform(16, 26) * s
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=255)
        # A missing part shows what is behind the object; on a texture, a flat bald patch.
        is_texture = np.asarray(shape).min() > 0
        colour = base.reshape(-1, 3).mean(axis=0) if is_texture else base[2, 2]
        region = Image.fromarray(np.minimum(np.asarray(region), np.asarray(shape)))
    else:
        raise ValueError(f"unknown defect {defect!r}")
    alpha = np.asarray(region.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)[..., None]
    alpha = alpha / 255.0
    texture = rng.normal(0, 6, base.shape)
    pixels = base * (1 - alpha) + (colour + texture) * alpha
    mask = (np.asarray(region) > 127).astype(np.uint8)
    return _finish(pixels), mask


def generate_benchmark(
    out: str | Path,
    categories: int = 4,
    seed: int = 0,
    size: int = 256,
    train: int = 60,
    test_good: int = 20,
    defective_per_type: int = 10,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Write an MVTec-layout benchmark under `out`; returns the category names.

    The same arguments always give byte-identical files.
    """
    if not 1 <= categories <= len(CATEGORIES):
        raise UserInputError(f"--categories must be between 1 and {len(CATEGORIES)}")
    check_generated_side(size)
    out = Path(out)
    names = []
    for spec in CATEGORIES[:categories]:
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        base = out / spec.name

        def save(image: Image.Image, path: Path, spec: SyntheticCategory = spec) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            (image.convert("L") if spec.grayscale else image).save(path)

        for i in range(train):
            save(spec.paint(rng, size)[0], base / "train" / "good" / f"{i:03d}.png")
        for i in range(test_good):
            save(spec.paint(rng, size)[0], base / "test" / "good" / f"{i:03d}.png")
        for defect in spec.defects:
            for i in range(defective_per_type):
                image, shape = spec.paint(rng, size)
                image, mask = draw_defect(rng, image, shape, defect)
                save(image, base / "test" / defect / f"{i:03d}.png")
                mask_path = base / "ground_truth" / defect / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask * 255).save(mask_path)
        if progress is not None:
            progress(f"{spec.name}: {train} train, {test_good} good, "
                     f"{len(spec.defects) * defective_per_type} defective test images")
        names.append(spec.name)
    return names
