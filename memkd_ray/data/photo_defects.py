"""The four defects of the real-photo benchmark (photos.py), painted into a test image.

Defective test images carry one of four defects, rendered unlike the validation split's
(data/validation.py: straight scratches, round stains, rectangular same-category cut-paste),
so that selecting on validation does not select for the test defects:

- `scratch`: a thin curved stroke, darker on bright surfaces and brighter on dark ones;
- `stain`: an irregular, semi-transparent tinted blob;
- `patch`: an irregular polygon of foreign material, cut from a *different* photo;
- `hole`: a dark pit with a lit and a shaded rim.

Masks are exact: the pixels the defect changed by at least half its strength.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFECTS = ("scratch", "stain", "patch", "hole")


def to_image(pixels: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode)


def _supersampled(size: int, draw: Callable[[ImageDraw.ImageDraw, int], None]) -> np.ndarray:
    """An anti-aliased coverage map in [0, 1]: drawn at 4x and averaged down."""
    scale = 4
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw(ImageDraw.Draw(canvas), scale)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255


def _blend(base: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] if base.ndim == 3 else alpha
    return base * (1 - a) + target * a


def _local_luminance(base: np.ndarray, alpha: np.ndarray) -> float:
    lum = base.mean(axis=2) if base.ndim == 3 else base
    weights = (alpha > 0).astype(np.float32)
    return float((lum * weights).sum() / max(weights.sum(), 1.0))


def _centre(rng: np.random.Generator, size: int, margin: float) -> np.ndarray:
    return rng.uniform(margin * size, (1 - margin) * size, size=2)


def scratch(rng: np.random.Generator, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved stroke (quadratic Bezier), in contrast to the surface under it."""
    size = base.shape[0]
    s = size / 256
    start = _centre(rng, size, 0.15)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(45, 100) * s
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    end = end.clip(0.08 * size, 0.92 * size)
    bend = (start + end) / 2 + rng.uniform(-0.25, 0.25, size=2) * length
    t = np.linspace(0, 1, 48)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
    width = rng.uniform(1.8, 3.5) * s

    def draw(pen: ImageDraw.ImageDraw, k: int) -> None:
        pen.line([tuple(p * k) for p in curve], fill=255, width=max(1, round(width * k)),
                 joint="curve")

    alpha = _supersampled(size, draw)
    lum = _local_luminance(base, alpha)
    strength = rng.uniform(0.75, 0.95)
    target = np.full_like(base, 0.35 * lum if lum > 100 else lum + 110)
    return _blend(base, target, alpha * strength), (alpha >= 0.5).astype(np.uint8)


def stain(rng: np.random.Generator, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An irregular semi-transparent blob: a darker tinted spot on bright surfaces, a dull
    lighter one on dark surfaces."""
    size = base.shape[0]
    s = size / 256
    radius = rng.uniform(12, 26) * s
    cy, cx = _centre(rng, size, 0.15)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    noise = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8))
    noise = noise.filter(ImageFilter.GaussianBlur(max(1.0, radius / 4)))
    wobble = np.asarray(noise, dtype=np.float32) / 255 - 0.5  # irregular outline
    distance = np.hypot(yy - cy, xx - cx) / radius
    shape = _largest_component(((1 - distance + 6 * wobble) > 0).astype(np.uint8))
    soft = Image.fromarray(shape * 255).filter(ImageFilter.GaussianBlur(1.2 * s))
    alpha = np.asarray(soft, dtype=np.float32) / 255
    lum = _local_luminance(base, alpha)
    tone = rng.uniform(0.4, 0.6) * lum if lum > 70 else lum + rng.uniform(50, 80)
    target = np.full_like(base, tone)
    if base.ndim == 3:  # a colour cast around the tone: brown, olive, grey-blue, ...
        target = target * rng.uniform(0.6, 1.4, size=3)
    strength = rng.uniform(0.7, 0.9)
    return _blend(base, target, alpha * strength), (alpha >= 0.5).astype(np.uint8)


def _largest_component(shape: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(shape)
    if count <= 1:
        return shape
    sizes = ndimage.sum(shape, labels, range(1, count + 1))
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def foreign_patch(
    rng: np.random.Generator, base: np.ndarray, donor: Image.Image
) -> tuple[np.ndarray, np.ndarray]:
    """An irregular polygon of another photograph's content: foreign material."""
    size = base.shape[0]
    s = size / 256
    radius = rng.uniform(14, 30) * s
    centre = _centre(rng, size, 0.15)
    corners = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.6, 1.0, corners)
    polygon = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]

    def draw(pen: ImageDraw.ImageDraw, k: int) -> None:
        pen.polygon([tuple(p * k) for p in polygon], fill=255)

    alpha = _supersampled(size, draw)
    donor = donor.convert("L" if base.ndim == 2 else "RGB")
    dw, dh = donor.size
    side = int(min(dw, dh) * rng.uniform(0.3, 0.6))
    x, y = int(rng.integers(0, dw - side + 1)), int(rng.integers(0, dh - side + 1))
    material = np.asarray(donor.crop((x, y, x + side, y + side)).resize((size, size),
                          Image.BICUBIC), dtype=np.float32)
    return _blend(base, material, alpha), (alpha >= 0.5).astype(np.uint8)


def hole(rng: np.random.Generator, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A dark elliptical pit whose rim is lit on one side and shaded on the other."""
    size = base.shape[0]
    s = size / 256
    ry = rng.uniform(6, 14) * s
    rx = ry * rng.uniform(0.7, 1.3)
    cy, cx = _centre(rng, size, 0.12)
    rim = max(1.5, 2.0 * s)

    def ellipse(grow: float) -> Callable[[ImageDraw.ImageDraw, int], None]:
        def draw(pen: ImageDraw.ImageDraw, k: int) -> None:
            pen.ellipse(((cx - rx - grow) * k, (cy - ry - grow) * k,
                         (cx + rx + grow) * k, (cy + ry + grow) * k), fill=255)
        return draw

    inner = _supersampled(size, ellipse(0.0))
    outer = _supersampled(size, ellipse(rim))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = np.clip(-((xx - cx) + (yy - cy)) / (rx + ry), -1, 1)  # lit from the top left
    lum = _local_luminance(base, outer)
    # On a dark surface the lit half of the rim is what shows.
    rim_target = np.clip(lum + 90 * light + (60 if lum < 70 else 0), 0, 255)
    if base.ndim == 3:
        rim_target = rim_target[..., None]
    pixels = _blend(base, np.broadcast_to(rim_target, base.shape), (outer - inner) * 0.85)
    pit = np.full_like(base, 0.12 * lum + 6)
    return _blend(pixels, pit, inner), (outer >= 0.5).astype(np.uint8)


def paint_defect(
    rng: np.random.Generator, image: Image.Image, defect: str, donor: Image.Image
) -> tuple[Image.Image, np.ndarray]:
    base = np.asarray(image, dtype=np.float32)
    if defect == "patch":
        pixels, mask = foreign_patch(rng, base, donor)
    else:
        pixels, mask = {"scratch": scratch, "stain": stain, "hole": hole}[defect](rng, base)
    return to_image(pixels, image.mode), mask
