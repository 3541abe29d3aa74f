"""A validation set built from training images only, for choosing hyper-parameters.

Anomalies are not available at training time, and selecting on the test split would leak it
into the reported numbers. So a seeded share of the normal training images is held out as is,
and another share gets synthetic defects with exact masks: cut-paste patches from other
training images, scratches and stains. Held-out images are not trained on. The same seed
always gives the same split and the same defects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from memkd_ray.data.sample import Sample
from memkd_ray.data.synthetic import draw_defect
from memkd_ray.errors import DataError

DEFECT_KINDS = ("cutpaste", "scratch", "stain")


@dataclass
class ValidationSplit:
    train: list[Sample]
    """The training samples left for training."""
    sources: list[Sample]
    """The held-out training samples the validation images were made from."""
    images: np.ndarray
    """(N, size, size, 3) uint8."""
    masks: np.ndarray
    """(N, size, size) uint8, 1 on the synthetic defects."""
    labels: np.ndarray
    """(N,) 0 normal, 1 with a synthetic defect."""


def make_validation_split(
    train: list[Sample], size: int, seed: int, normal_fraction: float = 0.1,
    defect_fraction: float = 0.1,
) -> ValidationSplit:
    rng = np.random.default_rng([seed, 20230901])
    count = len(train)
    normal = max(2, round(normal_fraction * count))
    defective = max(2, round(defect_fraction * count))
    if count - normal - defective < 2:
        raise DataError(f"{train[0].image_path.parent}: {count} training images are too few to "
                        f"hold out {normal} normal and {defective} defective validation images")
    order = rng.permutation(count)
    normal_idx, defect_idx = order[:normal], order[normal : normal + defective]
    keep = sorted(order[normal + defective :].tolist())
    images, masks = [], []
    for i in normal_idx:
        images.append(train[i].load_image(size))
        masks.append(np.zeros((size, size), np.uint8))
    defective_images, defect_masks = with_synthetic_defects(
        [train[i].load_image(size) for i in defect_idx], [train[i] for i in keep], rng)
    images += defective_images
    masks += defect_masks
    return ValidationSplit(
        train=[train[i] for i in keep],
        sources=[train[i] for i in (*normal_idx, *defect_idx)],
        images=np.stack(images),
        masks=np.stack(masks),
        labels=np.array([0] * normal + [1] * defective),
    )


def with_synthetic_defects(
    images: list[np.ndarray], donors: list[Sample], rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images, masks): each uint8 (S, S, 3) image with one synthetic defect, the kinds of
    DEFECT_KINDS in turn; cut-paste patches come from random `donors`."""
    defective, masks = [], []
    for n, image in enumerate(images):
        size = image.shape[0]
        kind = DEFECT_KINDS[n % len(DEFECT_KINDS)]
        if kind == "cutpaste":
            donor = donors[rng.integers(len(donors))].load_image(size)
            image, mask = cut_paste(rng, image, donor)
        else:
            everywhere = Image.new("L", (size, size), 255)
            drawn, mask = draw_defect(rng, Image.fromarray(image), everywhere, kind)
            image = np.asarray(drawn)
        defective.append(image)
        masks.append(mask)
    return defective, masks


def hold_out_normals(
    train: list[Sample], seed: int, fraction: float, min_count: int
) -> tuple[list[Sample], list[Sample]]:
    """(training samples left, held-out samples): a seeded `fraction` of the training images,
    at least `min_count`, kept from training to fit the decision threshold on. Nothing is
    held out when `fraction` is 0 or when fewer images than held out would be left to train
    on; the same seed always holds out the same images (a resumed run trains on the same set).
    """
    count = len(train)
    held = max(min_count, round(fraction * count))
    if fraction == 0 or count - held < held:
        return train, []
    order = np.random.default_rng([seed, 20261207]).permutation(count)
    kept = set(order[held:].tolist())
    return ([s for i, s in enumerate(train) if i in kept],
            [s for i, s in enumerate(train) if i not in kept])


def cut_paste(
    rng: np.random.Generator, image: np.ndarray, donor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a rotated patch of another normal image at a random place: a local anomaly whose
    texture is plausible but whose position is wrong. Returns (image, mask)."""
    size = image.shape[0]
    h, w = (rng.uniform(0.1, 0.25, size=2) * size).astype(int).clip(4)
    sy, sx = rng.integers(0, size - h), rng.integers(0, size - w)
    patch = np.rot90(donor[sy : sy + h, sx : sx + w], k=int(rng.integers(1, 4)))
    ph, pw = patch.shape[:2]
    dy, dx = rng.integers(0, size - ph), rng.integers(0, size - pw)
    result = image.copy()
    result[dy : dy + ph, dx : dx + pw] = patch
    mask = np.zeros((size, size), np.uint8)
    mask[dy : dy + ph, dx : dx + pw] = 1
    return result, mask
