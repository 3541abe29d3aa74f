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

Defective test images carry one of four defects (photo_defects.py). The same seed,
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
from PIL import Image

from memkd_ray.data.photo_defects import DEFECTS, paint_defect, to_image
from memkd_ray.data.sample import check_generated_side, open_image
from memkd_ray.errors import UserInputError

KINDS = ("texture", "array", "scene")


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
# The confirmation set: categories of the kinds the development set lacks (cells under a
# microscope, a grey-level scene), kept out of every tuning decision: a change is chosen on the
# development set and then confirmed here (`data photos --collection confirmation`).
CONFIRMATION_SOURCES = (
    PhotoSource("cells", "package:skimage.data/cell.png", crop=0.3),
    PhotoSource("cameraman", "package:skimage.data/camera.png", kind="scene"),
)
COLLECTIONS = {"development": DEVELOPMENT_SOURCES, "confirmation": CONFIRMATION_SOURCES,
               "all": DEVELOPMENT_SOURCES + CONFIRMATION_SOURCES}
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
    with open_image(_resolve(path), decode=True) as image:
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
    return to_image(pixels, view.mode)


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
    check_generated_side(size)
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
