"""The single-category training loop."""

import itertools

import torch

from memkd_ray.data import read_category
from memkd_ray.data.datasets import load_training_images
from memkd_ray.engine import TrainingFeatures, epoch_bound, make_optimizer, train_one_epoch
from memkd_ray.engine.optimization import (
    epoch_batches,
    exemplar_indices,
    learning_rate,
    start_epoch,
    steps_per_epoch,
    with_training_budget,
)
from memkd_ray.model import create_memkd
from tests.conftest import fast_config


def _epoch_losses(synth_root, cache: bool, epochs: int = 2) -> list[dict]:
    cfg = fast_config()
    torch.manual_seed(0)
    model = create_memkd(cfg)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(0)
    images = load_training_images(read_category("synthetic", synth_root, "stripes").train, 128)
    features = TrainingFeatures(model.teacher, images, torch.device("cpu"), cache=cache)
    return [
        train_one_epoch(model, features, epoch_batches(len(images), 16, 0, epoch), optimizer,
                        cfg, generator)
        for epoch in range(epochs)
    ]


def test_feature_cache_changes_speed_not_results(synth_root):
    cached, recomputed = _epoch_losses(synth_root, True), _epoch_losses(synth_root, False)
    for a, b in zip(cached, recomputed, strict=True):
        for key in ("loss", "kd", "nm", "orth"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), key


def test_batches_cover_the_epoch_and_exemplars_are_redrawn():
    batches = epoch_batches(61, 16, seed=0, epoch=0)
    assert sorted(torch.cat(batches).tolist()) == list(range(61))
    assert [len(b) for b in batches] == [16, 16, 16, 13]
    # Every epoch its own order, a function of (seed, epoch) alone: a resumed run draws the
    # same batches as an uninterrupted one.
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(61, 16, 0, 1)))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(61, 16, 0, 0),
                                                 strict=True))
    # A trailing batch of one is dropped: BatchNorm needs two samples.
    assert [len(b) for b in epoch_batches(33, 16, 0, 0)] == [16, 16]
    # Two workers share each epoch: disjoint halves of equal length (the sampler pads).
    halves = [torch.cat(epoch_batches(60, 8, 0, 3, rank, 2)) for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 30
    assert sorted(torch.cat(halves).tolist()) == list(range(60))
    generator = torch.Generator().manual_seed(0)
    draws = [exemplar_indices(60, 16, generator) for _ in range(3)]
    assert all(len(d) == 16 and len(set(d.tolist())) == 16 and d.max() < 60 for d in draws)
    assert not torch.equal(draws[0], draws[1])
    assert sorted(exemplar_indices(5, 16, generator).tolist()) == [0, 1, 2, 3, 4]


def test_a_step_budget_sets_the_epochs_from_the_training_set_size():
    for count in (1, 2, 15, 16, 17, 33, 61, 80):
        assert steps_per_epoch(count, 16) == len(epoch_batches(count, 16, 0, 0))
    cfg = fast_config("train.steps=600", "train.epochs=3")
    assert with_training_budget(cfg, 80).train.epochs == 120  # 5 steps per epoch
    assert with_training_budget(cfg, 300).train.epochs == 32  # ceil(600 / 19)
    assert with_training_budget(cfg, 2000).train.epochs == 5  # ceil(600 / 125)
    assert with_training_budget(fast_config("train.epochs=3"), 80).train.epochs == 3
    assert epoch_bound(cfg) == 600 and epoch_bound(fast_config("train.epochs=3")) == 3


def test_cosine_schedule_is_a_function_of_the_epoch():
    cfg = fast_config("train.lr_schedule=cosine", "train.epochs=10", "train.lr=0.004")
    rates = [learning_rate(cfg, epoch) for epoch in range(10)]
    assert rates[0] == 0.004 and abs(rates[5] - 0.002) < 1e-12
    assert all(a > b > 0 for a, b in itertools.pairwise(rates))
    model = create_memkd(cfg)
    optimizer = make_optimizer(model, cfg)
    start_epoch(optimizer, cfg, 7)  # as a run resumed at epoch 7 does
    assert all(group["lr"] == rates[7] for group in optimizer.param_groups)
    assert learning_rate(fast_config("train.lr=0.004"), 7) == 0.004  # constant: the paper's
