"""Quality on real photographs (the development benchmark of `memkd-ray data photos`).

The synthetic benchmark is too easy to catch a regression in detection quality; this run
trains the offline configuration on two real-photo categories, a texture and the scene, with a
smaller step budget than configs/offline.yaml so that it takes a few minutes. It trains the way
`memkd-ray train` does: the launcher on a local Ray, both categories at once, each in a Ray
Train worker running the production epoch driver.
"""

import json
from pathlib import Path

import pytest
import torch

from memkd_ray.checkpoint import load_model
from memkd_ray.config import MEMORY_SITES, load_config
from memkd_ray.data import read_category
from memkd_ray.data.photos import DEVELOPMENT_SOURCES, generate_photo_benchmark
from memkd_ray.distributed.launcher import train_benchmark
from memkd_ray.engine import evaluate
from tests.conftest import CONFIGS

CPU = torch.device("cpu")
STEPS = 150
# Measured at this budget through the launcher on the 2-core development machine, I-AUROC /
# AU-PRO: starfield 91.6 / 92.4 and motorcycle 88.6 / 74.8 with the paper's memory, 89.4 / 92.2
# and 85.4 / 73.2 with today's (at 400 steps the two tie with seeds; one run at this budget
# moves by a few points). The bounds leave 4-6 points for that noise and for differences
# between machines and library versions, and still fail a model near chance.
THRESHOLDS = {"starfield": {"image_auroc": 0.85, "pixel_aupro": 0.87},
              "motorcycle": {"image_auroc": 0.80, "pixel_aupro": 0.67}}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "photos"
    generate_photo_benchmark(root, tuple(s for s in DEVELOPMENT_SOURCES if s.name in THRESHOLDS))
    return root


@pytest.fixture(scope="module")
def trained(photos: Path, ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both categories trained by `train_benchmark`, one worker of one CPU each: rows."""
    cfg = load_config(CONFIGS / "photos.yaml",
                      [f"data.root={photos}", f"train.steps={STEPS}", "train.num_threads=1",
                       "distributed.cpus_per_worker=1"])
    store = tmp_path_factory.mktemp("quality-store")
    summary = train_benchmark(cfg, list(THRESHOLDS), f"file://{store}")
    return {row["category"]: row for row in summary.rows}


@pytest.mark.slow
@pytest.mark.parametrize("category", list(THRESHOLDS))
def test_offline_config_finds_defects_in_real_photographs(photos: Path, trained: dict,
                                                          category: str):
    row = trained[category]
    print(category, {k: round(100 * row[k], 1) for k in THRESHOLDS[category]})
    assert row["status"] == "ok", row["error"]
    checkpoint = Path(row["checkpoint_uri"].removeprefix("file://"))
    history = json.loads((checkpoint / "checkpoint.json").read_text())["training_state"]
    assert history["history"][-1]["kd"] < 0.6 * history["history"][0]["kd"]
    for metric, bound in THRESHOLDS[category].items():
        assert row[metric] >= bound, (metric, row[metric])
    # The memory remembers: every memory rebuilds held-out normal features (Eq. 10) at under
    # 0.7x the error of their mean; the paper's memory at this budget does worse than the mean.
    for site in MEMORY_SITES:
        assert row[f"recall_error_{site}"] < 0.7 * row[f"recall_mean_{site}"], site
    if category == "motorcycle":
        # On the scene, the normal map is what lifts detection: the same weights without it
        # score clearly lower (the maximum then sits where the student is always worse).
        model, saved = load_model(checkpoint)
        model.normal_map_mean.zero_()
        data = read_category("photos", photos, category)
        uncalibrated = evaluate(model, data.test, saved.config, CPU).metrics
        assert row["image_auroc"] >= uncalibrated["image_auroc"] + 0.02, uncalibrated
