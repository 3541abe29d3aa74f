"""Seeded development benchmark cut from real photographs that installed packages ship.

The synthetic benchmark (synthetic.py) is drawn by this project and is too easy to tell a good
model from a bad one. This one starts from real photographs (scikit-image's and
scikit-learn's sample images): their noise, texture statistics, lighting and colour are
nobody's choice here. Per category:

- `texture` sources (a surface whose statistics do not depend on the place): the photo is
  split into two disjoint regions, 60 % / 40 % along its longer side; training crops come
  from the first, test crops from the second, each at a random position and a slightly
  jittered scale, with small brightness/contrast changes and sensor noise. No flips or
  rotations: lighting has a direction (the moon's craters).
- `array` sources (distinct objects of one kind in random arrangement, such as coins, each
  one different): crops as for textures, but train and test crops alike from the whole
  photo. Split by region, the normal test images would show objects no training image
  shows: a shift of the normal distribution, not an anomaly, which no method can tell apart
  from a defect (both MemKD and anomalib's PatchCore scored 85 image AUROC on such a split).
- `scene` sources: the whole view, as MVTec's object categories: every image is the same
  scene with a small random shift, scale, rotation, brightness change and sensor noise.

Defective test images carry one of four defects, rendered unlike the validation split's
(data/validation.py: straight scratches, round stains, rectangular same-category cut-paste),
so that selecting on validation does not select for the test defects:

- `scratch`: a thin curved stroke, darker on bright surfaces and brighter on dark ones;
- `stain`: an irregular, semi-transparent tinted blob;
- `patch`: an irregular polygon of foreign material, cut from a *different* photo;
- `hole`: a dark pit with a lit and a shaded rim.

Masks are exact: the pixels the defect changed by at least half its strength. The same seed,
size and sources always give byte-identical files. scikit-image's brick, grass, gravel and
immunohistochemistry images and scikit-learn's china.jpg are held back for an independent
check and are never used here (`--source` can point the generator at them, or at any photo).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from memkd_ray.errors import UserInputError

KINDS = ("texture", "array", "scene")
DEFECTS = ("scratch", "stain", "patch", "hole")


@dataclass(frozen=True)
class PhotoSource:
    """A photograph and how to cut a category from it.

    `path` is a file path, or `package:<module>/<file>` for a file shipped inside an installed
    package. `crop` is a texture crop's side as a fraction of the photo's shorter side;
    `region` (left, top, right, bottom, fractions) limits the usable part of the photo.
    """

    name: str
    path: str
    kind: str = "texture"
    crop: float = 0.32
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


# The development set: three textures, a tissue photograph and a scene. Never add scikit-image's
# brick, grass, gravel or ihc, nor scikit-learn's china.jpg: they are the independent check.
DEVELOPMENT_SOURCES = (
    PhotoSource("moon", "package:skimage.data/moon.png", crop=0.3),
    PhotoSource("starfield", "package:skimage.data/hubble_deep_field.jpg", crop=0.22),
    PhotoSource("coins", "package:skimage.data/coins.png", kind="array", crop=0.42),
    # Inside the fundus disc only: the black surround is not tissue.
    PhotoSource("fundus", "package:skimage.data/retina.jpg", crop=0.2,
                region=(0.17, 0.17, 0.83, 0.83)),
    PhotoSource("motorcycle", "package:skimage.data/motorcycle_left.png", kind="scene"),
)
# Foreign material for the `patch` defect: photos that are no category's source.
DONOR_SOURCES = (
    "package:skimage.data/astronaut.png",
    "package:skimage.data/coffee.png",
    "package:skimage.data/chelsea.png",
    "package:sklearn.datasets.images/flower.jpg",
    "package:skimage.data/rocket.jpg",
)
RESERVED = ("brick", "grass", "gravel", "ihc", "china")
TRAIN_SHARE = 0.6


def parse_source(text: str) -> PhotoSource:
    """`NAME=PATH[:texture|:array|:scene]` (a command-line `--source`)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise UserInputError(f"--source {text!r}: expected NAME=PATH[:texture|:array|:scene]")
    path, kind = rest, "texture"
    head, _, tail = rest.rpartition(":")
    if tail in KINDS and head:
        path, kind = head, tail
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserInputError(f"--source {text!r}: the name must be letters, digits, - or _")
    return PhotoSource(name, path, kind)


def read_photo(path: str) -> Image.Image:
    """The RGB or L image at `path` or `package:<module>/<file>`."""
    file = _resolve(path)
    try:
        with Image.open(file) as image:
            image.load()
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{file}: unreadable image ({exc.__class__.__name__})") from None
    return image.convert("L" if image.mode in ("L", "I", "I;16", "1") else "RGB")


def _resolve(path: str) -> Path:
    if path.startswith("package:"):
        module, _, name = path.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(module) if module else None
        if spec is None or not spec.submodule_search_locations:
            raise UserInputError(f"{path}: package {module} is not installed "
                                 f"(pip install 'memkd-ray[photos]')")
        file = Path(next(iter(spec.submodule_search_locations))) / name
    else:
        file = Path(path).expanduser()
    if not file.is_file():
        raise UserInputError(f"{file}: photo not found")
    return file


def _sha256(path: str) -> str:
    return hashlib.sha256(_resolve(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- normal views


def _region(photo: Image.Image, fractions: tuple[float, ...]) -> tuple[int, int, int, int]:
    w, h = photo.size
    left, top, right, bottom = fractions
    return round(left * w), round(top * h), round(right * w), round(bottom * h)


def texture_split(source: PhotoSource, photo: Image.Image) -> tuple[tuple, tuple]:
    """The disjoint train and test boxes of a texture photo: 60 % / 40 % of the usable region
    along its longer side."""
    left, top, right, bottom = _region(photo, source.region)
    if right - left >= bottom - top:
        cut = left + round(TRAIN_SHARE * (right - left))
        return (left, top, cut, bottom), (cut, top, right, bottom)
    cut = top + round(TRAIN_SHARE * (bottom - top))
    return (left, top, right, cut), (left, cut, right, bottom)


def texture_view(
    rng: np.random.Generator, photo: Image.Image, box: tuple, side: int, size: int
) -> Image.Image:
    """A square crop of about `side` source pixels inside `box`, resized to `size`."""
    left, top, right, bottom = box
    side = min(round(side * rng.uniform(0.92, 1.08)), right - left, bottom - top)
    x = int(rng.integers(left, right - side + 1))
    y = int(rng.integers(top, bottom - side + 1))
    view = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    return _photometric(rng, view)


def scene_view(rng: np.random.Generator, photo: Image.Image, size: int) -> Image.Image:
    """The central square of the scene with a small random shift, scale and rotation."""
    w, h = photo.size
    side = min(w, h) * 0.9 * rng.uniform(0.97, 1.03)
    cx = w / 2 + rng.uniform(-0.03, 0.03) * side
    cy = h / 2 + rng.uniform(-0.03, 0.03) * side
    rotated = photo.rotate(float(rng.uniform(-2, 2)), resample=Image.BICUBIC, center=(cx, cy))
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    view = rotated.resize((size, size), Image.BICUBIC, box=box)
    return _photometric(rng, view)


def _photometric(rng: np.random.Generator, view: Image.Image) -> Image.Image:
    pixels = np.asarray(view, dtype=np.float32)
    mean = pixels.mean()
    contrast, brightness = rng.uniform(0.96, 1.04), rng.uniform(-6, 6)
    pixels = (pixels - mean) * contrast + mean + brightness
    pixels = pixels + rng.normal(0, 2.0, pixels.shape)  # sensor noise
    return _to_image(pixels, view.mode)


def _to_image(pixels: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode)


# --------------------------------------------------------------------------------------- defects


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
    return _to_image(pixels, image.mode), mask


# ------------------------------------------------------------------------------------- benchmark


def generate_photo_benchmark(
    out: str | Path,
    sources: tuple[PhotoSource, ...] = DEVELOPMENT_SOURCES,
    seed: int = 0,
    size: int = 256,
    train: int = 80,
    test_good: int = 20,
    defective_per_type: int = 10,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Write an MVTec-layout benchmark under `out` (plus `sources.json`: every photo's path
    and sha256); returns the category names. Same arguments, same photos: same bytes.

    The tree is written beside `out` and renamed into place when complete, so a failure or
    an interrupt leaves nothing at `out`.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"--out {out}: exists and is not an empty directory")
    if size < 32:
        raise UserInputError(f"--size {size}: must be at least 32")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UserInputError(f"source names must be unique, got {', '.join(names)}")
    for source in sources:
        if source.kind not in KINDS:
            raise UserInputError(f"source {source.name}: kind must be one of {KINDS}")
        if any(part in Path(source.path).stem.lower() for part in RESERVED):
            raise UserInputError(f"source {source.name}: {source.path} is held back for the "
                                 f"independent check")
    photos = {s.name: read_photo(s.path) for s in sources}
    donors = [read_photo(p) for p in DONOR_SOURCES if _available(p)]
    if not donors:
        raise UserInputError("no donor photo for the patch defect is installed "
                             "(pip install 'memkd-ray[photos]')")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise UserInputError(f"--out {out}: cannot write there ({exc.strerror})") from None
    try:
        for source in sources:
            _write_category(staging / source.name, source, photos[source.name], donors,
                            np.random.default_rng([seed, zlib.crc32(source.name.encode())]),
                            size, train, test_good, defective_per_type)
            if progress is not None:
                progress(f"{source.name}: {train} train, {test_good} good, "
                         f"{len(DEFECTS) * defective_per_type} defective test images")
        manifest = {
            "seed": seed, "size": size,
            "sources": [{"name": s.name, "path": s.path, "kind": s.kind, "crop": s.crop,
                         "region": list(s.region), "sha256": _sha256(s.path)} for s in sources],
            "donors": [{"path": p, "sha256": _sha256(p)} for p in DONOR_SOURCES
                       if _available(p)],
        }
        (staging / "sources.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return names


def _write_category(
    base: Path, source: PhotoSource, photo: Image.Image, donors: list[Image.Image],
    rng: np.random.Generator, size: int, train: int, test_good: int, defective_per_type: int,
) -> None:
    side = round(source.crop * min(photo.size))
    if source.kind == "texture":
        train_box, test_box = texture_split(source, photo)

        def train_view() -> Image.Image:
            return texture_view(rng, photo, train_box, side, size)

        def test_view() -> Image.Image:
            return texture_view(rng, photo, test_box, side, size)
    elif source.kind == "array":
        whole = _region(photo, source.region)

        def train_view() -> Image.Image:
            return texture_view(rng, photo, whole, side, size)

        test_view = train_view
    else:
        def train_view() -> Image.Image:
            return scene_view(rng, photo, size)

        test_view = train_view
    for i in range(train):
        _save(train_view(), base / "train" / "good" / f"{i:03d}.png")
    for i in range(test_good):
        _save(test_view(), base / "test" / "good" / f"{i:03d}.png")
    for defect in DEFECTS:
        for i in range(defective_per_type):
            donor = donors[int(rng.integers(len(donors)))]
            image, mask = paint_defect(rng, test_view(), defect, donor)
            _save(image, base / "test" / defect / f"{i:03d}.png")
            _save(Image.fromarray(mask * 255), base / "ground_truth" / defect / f"{i:03d}_mask.png")


def _available(path: str) -> bool:
    try:
        _resolve(path)
    except UserInputError:
        return False
    return True


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
