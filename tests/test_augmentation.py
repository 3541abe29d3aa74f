"""Training-time augmentation (`train.augment`): what each operation does to an image, checked
against images whose transforms are known by hand, and a training run that uses it."""

import pytest
import torch

from memkd_ray.config import load_config
from memkd_ray.data import read_category
from memkd_ray.data.augmentation import Augmentation, create_augmentation
from memkd_ray.engine import fit
from memkd_ray.errors import ConfigError
from tests.conftest import fast_config

SIZE = 32
CROP, JITTER = 0.8, 0.1  # the config's defaults, which the bounds below are worked out for


def _augment(operations: set[str], images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return Augmentation(frozenset(operations), CROP, JITTER)(images,
                                                             torch.Generator().manual_seed(seed))


def _dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 mirror images and quarter turns of a (3, H, W) image."""
    turns = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
    return turns + [torch.flip(t, dims=(2,)) for t in turns]


def test_flips_and_turns_move_pixels_exactly():
    images = torch.rand(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    out = _augment({"hflip", "vflip", "rot90"}, images)
    seen = set()
    for image, augmented in zip(images, out, strict=True):
        errors = [float((augmented - t).abs().max()) for t in _dihedral(image)]
        assert min(errors) < 1e-5  # no interpolation: a permutation of the pixels
        seen.add(errors.index(min(errors)))
    assert seen == set(range(8))  # every one of the 8 occurs in 64 draws
    # hflip alone: the image or its mirror, nothing else.
    for image, augmented in zip(images, _augment({"hflip"}, images), strict=True):
        assert min(float((augmented - image).abs().max()),
                   float((augmented - torch.flip(image, dims=(2,))).abs().max())) < 1e-5


def test_a_crop_flattens_a_ramp_by_the_crop_share():
    # A horizontal ramp stays a ramp after a square crop resized back (bilinear sampling of a
    # linear function is exact); stretched to the full width, it rises by the crop's side
    # share of its range: between 0.8 and 1 of the original slope.
    ramp = torch.linspace(0, 1, SIZE).expand(16, 3, SIZE, SIZE).clone()
    out = _augment({"crop"}, ramp)
    slopes = []
    for image in out:
        inner = image[:, :, 2:-2]  # the outermost columns may touch the reflected border
        steps = inner[:, :, 1:] - inner[:, :, :-1]
        assert float((steps - steps.mean()).abs().max()) < 1e-5  # still linear
        assert float((inner - inner[:, :1]).abs().max()) < 1e-5  # constant down each column
        slopes.append(float(steps.mean()) * (SIZE - 1))
    assert all(0.8 - 1e-4 <= s <= 1 + 1e-4 for s in slopes), slopes
    assert max(slopes) - min(slopes) > 0.05  # each image its own crop


def test_jitter_scales_a_grey_image_within_the_bound_and_keeps_it_grey():
    grey = torch.full((32, 3, SIZE, SIZE), 0.5)
    out = _augment({"jitter"}, grey)
    # Contrast and saturation leave a flat grey image as it is; brightness scales it by a
    # factor within 1 +- 0.1.
    assert float((out - out[:, :1, :1, :1]).abs().max()) < 1e-6
    levels = out[:, 0, 0, 0]
    assert float(levels.min()) >= 0.45 - 1e-6 and float(levels.max()) <= 0.55 + 1e-6
    assert float(levels.max() - levels.min()) > 0.04
    colour = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    assert 0 <= float(_augment({"jitter"}, colour).min()) <= float(
        _augment({"jitter"}, colour).max()) <= 1


def test_draws_follow_the_generator():
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    every = {"crop", "hflip", "vflip", "rot90", "jitter"}
    assert torch.equal(_augment(every, images, 5), _augment(every, images, 5))
    assert not torch.equal(_augment(every, images, 5), _augment(every, images, 6))
    generator = torch.Generator().manual_seed(5)
    augmentation = Augmentation(frozenset(every), CROP, JITTER)
    assert not torch.equal(augmentation(images, generator), augmentation(images, generator))


def test_config_keys_and_their_errors():
    assert create_augmentation(fast_config().train) is None  # the paper trains without
    train = fast_config().train
    assert (train.augment_crop, train.augment_jitter) == (CROP, JITTER)
    made = create_augmentation(fast_config("train.augment=[crop,jitter]",
                                           "train.augment_crop=0.9").train)
    assert made == Augmentation(frozenset({"crop", "jitter"}), 0.9, 0.1)
    for override, key in [("train.augment=[crop,shear]", "train.augment"),
                          ("train.augment_crop=0", "train.augment_crop"),
                          ("train.augment_crop=1.5", "train.augment_crop"),
                          ("train.augment_jitter=1", "train.augment_jitter")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_an_augmented_run_trains_and_detects(synth_root, caplog):
    data = read_category("synthetic", synth_root, "stripes")
    caplog.set_level("INFO", logger="memkd_ray.engine.driver")
    plain = fit(fast_config("train.epochs=3"), data, torch.device("cpu"))
    augmented = fit(fast_config("train.epochs=3", "train.augment=[crop,vflip,jitter]"), data,
                    torch.device("cpu"))
    assert "augmented steps: crop, vflip, jitter" in caplog.text
    history = augmented.state.history
    assert history[-1]["kd"] < history[0]["kd"]
    # The student meets new images at every step, so its losses are not the plain run's ...
    assert history[0]["kd"] != pytest.approx(plain.state.history[0]["kd"], rel=1e-3)
    # ... and it still detects this category's defects far above chance.
    assert augmented.evaluation.metrics["image_auroc"] > 0.9
