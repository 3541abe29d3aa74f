"""The normal-map calibration and the stage weights of the anomaly map."""

from pathlib import Path

import torch
import torch.nn.functional as F

from memkd_ray.checkpoint import load_model, save_checkpoint
from memkd_ray.data import read_category
from memkd_ray.data.datasets import load_training_images, to_float
from memkd_ray.engine import TrainingFeatures, calibrate_normal_map, predict_maps
from memkd_ray.model import anomaly_map, create_memkd, gaussian_filter
from tests.conftest import fast_config

CPU = torch.device("cpu")


def _model_and_images(synth_root: Path, *overrides: str):
    cfg = fast_config(*overrides)
    torch.manual_seed(0)
    model = create_memkd(cfg).eval()
    images = load_training_images(read_category("synthetic", synth_root, "mesh").train[:12], 128)
    return cfg, model, images


def test_stage_weights_weigh_each_stage_of_the_map():
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, c, s, s, generator=gen) for c, s in ((4, 32), (6, 16), (8, 8))]
    student = [t + 0.5 * torch.randn(t.shape, generator=gen) for t in teacher]
    per_stage = [
        F.interpolate((1 - F.cosine_similarity(s, t, dim=1)).unsqueeze(1), size=(64, 64),
                      mode="bilinear", align_corners=True).squeeze(1)
        for s, t in zip(student, teacher, strict=True)
    ]
    by_hand = gaussian_filter(2.0 * per_stage[1] + per_stage[2], 4.0)
    weighted = anomaly_map(student, teacher, 64, 4.0, stage_weights=(0.0, 2.0, 1.0))
    torch.testing.assert_close(weighted, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(anomaly_map(student, teacher, 64, 4.0),
                               gaussian_filter(sum(per_stage), 4.0), rtol=1e-5, atol=1e-6)


def test_normal_map_is_the_mean_map_of_the_training_images(synth_root: Path):
    cfg, model, images = _model_and_images(synth_root, "eval.normal_map=mean",
                                           "eval.stage_weights=[0.5,1,1]")
    raw, _ = predict_maps(model, to_float(images), cfg)  # computed from the images, uncalibrated
    features = TrainingFeatures(model.teacher, images, CPU, cache=True)
    calibrate_normal_map(model, features, cfg)  # computed from the cached teacher features
    torch.testing.assert_close(model.normal_map_mean, raw.mean(dim=0), rtol=1e-5, atol=1e-5)
    calibrated, scores = predict_maps(model, to_float(images), cfg)
    torch.testing.assert_close(calibrated, raw - raw.mean(dim=0), rtol=1e-5, atol=1e-5)
    assert calibrated.mean(dim=0).abs().max() < 1e-5  # on average, a normal pixel scores 0
    torch.testing.assert_close(scores, calibrated.flatten(1).amax(dim=1))
    # The border, where zero padding disturbs the features, is what the normal map lifts most.
    border = torch.ones(128, 128, dtype=torch.bool)
    border[8:-8, 8:-8] = False
    assert model.normal_map_mean[border].mean() > model.normal_map_mean[~border].mean()

    cfg_none, model_none, _ = _model_and_images(synth_root)
    calibrate_normal_map(model_none, features, cfg_none)
    assert not model_none.normal_map_mean.any()  # the paper's map: nothing subtracted


def test_normal_map_travels_with_the_checkpoint(synth_root: Path, tmp_path: Path):
    cfg, model, images = _model_and_images(synth_root, "eval.normal_map=mean")
    calibrate_normal_map(model, TrainingFeatures(model.teacher, images, CPU, cache=True), cfg)
    save_checkpoint(tmp_path / "ckpt", model, cfg, epoch=1, metrics={})
    loaded, _ = load_model(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.normal_map_mean, model.normal_map_mean)
    state = model.trainable_state_dict()
    del state["normal_map_mean"]  # a checkpoint from before the calibration existed
    older = create_memkd(cfg)
    older.load_trainable_state_dict(state)
    assert not older.normal_map_mean.any()
