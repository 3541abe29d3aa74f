"""The speed options change speed, not results.

The same tiny synthetic run is trained with and without each option that runs on CPU in
float32; image AUROC must agree within half a point and the first epoch's losses (before
rounding differences compound over the steps) must agree closely. bfloat16 autocast, whose
rounding is the point, is checked for float32 losses and maps and for the same AUROC.
torch.compile is left to `benchmarks/speed.py --compile`: compiling the training step takes
minutes on a 2-core CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from memkd_ray.config import load_config
from memkd_ray.data import read_category
from memkd_ray.data.datasets import load_training_images
from memkd_ray.engine import (
    Evaluation,
    TrainingFeatures,
    TrainState,
    autocast,
    evaluate,
    feature_cache_bytes,
    fit,
    place_model,
    resolve_precision,
    training_features,
    use_channels_last,
    use_feature_cache,
)
from memkd_ray.errors import ConfigError
from memkd_ray.model import create_memkd
from tests.conftest import fast_config

# stripes reaches a stable image AUROC within 8 epochs at 128 px; fewer epochs leave it where
# a different seed alone moves it by a point or more.
EPOCHS = 8
CATEGORY = "stripes"
AUROC_TOLERANCE = 0.005
CPU = torch.device("cpu")


def _train(synth_root, *overrides: str) -> tuple[TrainState, Evaluation]:
    """A category trained by the epoch driver that every `memkd-ray train` worker runs, on
    all 60 training images (no decision hold-out: the tolerances below were measured on
    them; 54 images put channels_last's first-epoch L_KD 3e-4 from the reference)."""
    cfg = fast_config(f"train.epochs={EPOCHS}", "decision.holdout_fraction=0", *overrides)
    training = fit(cfg, read_category("synthetic", synth_root, CATEGORY), CPU)
    return training.state, training.evaluation


@pytest.fixture(scope="module")
def reference(synth_root) -> tuple[TrainState, Evaluation]:
    """The default run: float32, contiguous layout, cache in (host = device) memory."""
    return _train(synth_root)


def _assert_same_training(run, reference, first_epoch_rtol: float) -> None:
    (state, evaluation), (ref_state, ref_evaluation) = run, reference
    for key in ("loss", "kd", "nm", "orth"):
        expected = ref_state.history[0][key]
        assert state.history[0][key] == pytest.approx(expected, rel=first_epoch_rtol), key
    auroc, ref_auroc = evaluation.metrics["image_auroc"], ref_evaluation.metrics["image_auroc"]
    assert abs(auroc - ref_auroc) <= AUROC_TOLERANCE, (auroc, ref_auroc)


@pytest.mark.parametrize(
    ("overrides", "log_text"),
    [
        (["train.channels_last=on"], None),
        (["train.feature_cache=off"], "teacher feature cache off"),
        (["train.feature_cache=host"], "teacher feature cache host"),
        (["train.loader_workers=2"], None),
    ],
)
def test_option_keeps_accuracy(synth_root, reference, caplog, overrides, log_text):
    caplog.set_level(logging.INFO, logger="memkd_ray.engine")
    run = _train(synth_root, *overrides)
    _assert_same_training(run, reference, first_epoch_rtol=1e-4)
    if log_text is not None:
        assert log_text in caplog.text
    if overrides == ["train.channels_last=on"]:
        weight = run[0].model.student.decoder[0][0].body[0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_on_cpu_gives_float32_losses_and_maps_and_the_same_auroc(
    synth_root, reference
):
    state, evaluation = _train(synth_root, "train.precision=bf16", "eval.precision=bf16")
    for epoch in state.history:
        assert all(np.isfinite(epoch[key]) for key in ("loss", "kd", "nm", "orth"))
    assert evaluation.maps.dtype == np.float32 and np.isfinite(evaluation.maps).all()
    # bfloat16 keeps 8 significant bits: the first epoch agrees to about 1e-3, not 1e-6.
    _assert_same_training((state, evaluation), reference, first_epoch_rtol=1e-2)


def test_bf16_evaluation_of_the_same_weights_agrees_with_float32(synth_root, reference):
    state, ref_evaluation = reference
    data = read_category("synthetic", synth_root, CATEGORY)
    evaluation = evaluate(state.model, data.test, fast_config("eval.precision=bf16"), CPU)
    assert evaluation.maps.dtype == np.float32
    assert abs(evaluation.metrics["image_auroc"] - ref_evaluation.metrics["image_auroc"]) <= (
        AUROC_TOLERANCE)
    relative = np.abs(evaluation.maps - ref_evaluation.maps).mean() / ref_evaluation.maps.mean()
    assert 0 < relative < 0.02  # bfloat16 really ran, and only rounded


def test_bf16_forward_with_float32_losses_and_a_bf16_cache(synth_root):
    cfg = fast_config("train.precision=bf16")
    torch.manual_seed(0)
    model = create_memkd(cfg)
    images = load_training_images(read_category("synthetic", synth_root, CATEGORY).train[:8], 128)
    features = training_features(cfg, model.teacher, images, CPU)
    assert features.placement == "device" and features.cached is not None
    assert all(stage.dtype == torch.bfloat16 for stage in features.cached)
    batch = features(torch.arange(4))
    with autocast(CPU, torch.bfloat16):
        assert all(f.dtype == torch.bfloat16 for f in model.student_forward(batch))
        terms = model.losses(batch, features(torch.arange(4, 8)), 0.1, 0.1)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())


def test_parallel_decoding_gives_the_same_pixels(synth_root):
    samples = read_category("synthetic", synth_root, CATEGORY).train
    assert torch.equal(load_training_images(samples, 64, workers=2),
                       load_training_images(samples, 64))


def test_cache_placements_give_the_same_features(synth_root):
    cfg = fast_config()
    model = create_memkd(cfg)
    images = load_training_images(read_category("synthetic", synth_root, CATEGORY).train[:6], 64)
    indices = torch.tensor([5, 0, 3])
    looked_up = [TrainingFeatures(model.teacher, images, CPU, cache)(indices)
                 for cache in ("device", "host", "off", True)]
    for features in looked_up[1:]:
        for stage, expected in zip(features, looked_up[0], strict=True):
            torch.testing.assert_close(stage, expected, rtol=1e-4, atol=1e-5)


def test_defaults_keep_cpu_runs_in_float32_and_contiguous():
    cfg = load_config(None)
    assert resolve_precision(cfg.train.precision, CPU) == torch.float32
    assert resolve_precision(cfg.eval.precision, CPU) == torch.float32
    assert not use_channels_last(cfg.train.channels_last, CPU)
    assert cfg.train.loader_workers == 0 and cfg.train.compile is False


def test_speed_keys_parse_yaml_switches_and_reject_unknown_values():
    cfg = load_config(None, ["train.feature_cache=off", "train.channels_last=true",
                             "train.precision=bf16"])
    assert (cfg.train.feature_cache, cfg.train.channels_last) == ("off", "on")
    assert resolve_precision(cfg.train.precision, CPU) == torch.bfloat16
    for override, key in [("train.precision=fp16", "train.precision"),
                          ("eval.precision=half", "eval.precision"),
                          ("train.feature_cache=gpu", "train.feature_cache"),
                          ("train.loader_workers=-1", "train.loader_workers"),
                          ("train.feature_cache_device_share=0", "feature_cache_device_share")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


@pytest.mark.parametrize(
    ("setting", "budget", "free", "expected"),  # budget and free memory in cache sizes
    [
        ("auto", 2.0, 4.0, "device"),  # fits the budget and half the free GPU memory
        ("auto", 2.0, 1.5, "host"),    # fits the budget, not half the GPU
        ("auto", 0.5, 4.0, "off"),     # over the budget: recompute
        ("on", 0.5, 1.5, "host"),      # `on` ignores the budget
        ("device", 0.5, 1.5, "device"),
    ],
)
def test_cache_placement_on_cuda_follows_free_memory(monkeypatch, setting, budget, free,
                                                     expected):
    import memkd_ray.engine.features as engine

    teacher = create_memkd(fast_config()).teacher
    # The cache of 60 images at 128 px in bfloat16 (auto precision on a bf16 GPU).
    needed = feature_cache_bytes(teacher, 60, 128, element_size=2)
    cfg = fast_config(f"train.feature_cache={setting}",
                      f"train.feature_cache_max_gb={budget * needed / 2**30}")
    monkeypatch.setattr(engine, "teacher_device", lambda _: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _: (int(free * needed), 2**40))
    assert use_feature_cache(cfg, teacher, 60) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_placements_match_cpu_features(synth_root):
    cfg = fast_config()
    model = create_memkd(cfg)
    images = load_training_images(read_category("synthetic", synth_root, CATEGORY).train[:6], 64)
    indices = torch.tensor([5, 0, 3])
    expected = TrainingFeatures(model.teacher, images, CPU, "device")(indices)
    cuda = torch.device("cuda")
    place_model(model, cfg, cuda)  # as training does: IEEE float32, not cuDNN's default TF32
    for cache in ("device", "host", "off"):
        features = TrainingFeatures(model.teacher, images, cuda, cache)(indices)
        for stage, reference in zip(features, expected, strict=True):
            assert stage.device.type == "cuda"
            torch.testing.assert_close(stage.cpu(), reference, rtol=1e-3, atol=1e-3)
