"""Quality on real photographs (the development benchmark of `memkd-ray data photos`).

The synthetic benchmark is too easy to catch a regression in detection quality; these runs
train the offline configuration on two real-photo categories, a texture and the scene, with
a smaller step budget than configs/offline.yaml so that they take a few minutes.
"""

from pathlib import Path

import pytest
import torch

from memkd_ray.config import load_config
from memkd_ray.data import read_category
from memkd_ray.data.photos import DEVELOPMENT_SOURCES, generate_photo_benchmark
from memkd_ray.engine import TrainState, evaluate, fit, make_optimizer
from memkd_ray.model import create_memkd
from tests.conftest import CONFIGS

CPU = torch.device("cpu")
STEPS = 150
# Measured at this budget on the 2-core development machine: starfield 94.0 / 93.4,
# motorcycle 89.6 / 74.0 (I-AUROC / AU-PRO); the bounds leave about six points for noise
# between machines and library versions, and still fail a model near chance.
THRESHOLDS = {"starfield": {"image_auroc": 0.88, "pixel_aupro": 0.87},
              "motorcycle": {"image_auroc": 0.83, "pixel_aupro": 0.67}}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "photos"
    wanted = {"starfield", "motorcycle"}
    generate_photo_benchmark(root, tuple(s for s in DEVELOPMENT_SOURCES if s.name in wanted))
    return root


def _train(root: Path, category: str, *overrides: str):
    cfg = load_config(CONFIGS / "photos.yaml",
                      [f"data.root={root}", f"train.steps={STEPS}", "train.num_threads=2",
                       *overrides])
    data = read_category("photos", root, category)
    torch.manual_seed(cfg.train.seed)
    model = create_memkd(cfg)
    state = TrainState(model, make_optimizer(model, cfg),
                       torch.Generator().manual_seed(cfg.train.seed))
    evaluation = fit(state, data, cfg, CPU, progress=False)
    return cfg, data, state, evaluation


@pytest.mark.slow
@pytest.mark.parametrize("category", ["starfield", "motorcycle"])
def test_offline_config_finds_defects_in_real_photographs(photos: Path, category: str):
    cfg, data, state, evaluation = _train(photos, category)
    metrics = evaluation.metrics
    print(category, {k: round(100 * v, 1) for k, v in metrics.items()})
    assert state.history[-1]["kd"] < 0.6 * state.history[0]["kd"]
    assert metrics["image_auroc"] >= THRESHOLDS[category]["image_auroc"], metrics
    assert metrics["pixel_aupro"] >= THRESHOLDS[category]["pixel_aupro"], metrics
    if category == "motorcycle":
        # On the scene, the normal map is what lifts detection: the same weights without it
        # score clearly lower (the maximum then sits where the student is always worse).
        model = state.model
        saved = model.normal_map_mean.clone()
        model.normal_map_mean.zero_()
        uncalibrated = evaluate(model, data.test, cfg, CPU).metrics
        model.normal_map_mean.copy_(saved)
        assert metrics["image_auroc"] >= uncalibrated["image_auroc"] + 0.02, uncalibrated
