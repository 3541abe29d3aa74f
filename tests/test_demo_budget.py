"""The demo's promise: every synthetic category reaches image AUROC >= 0.90 within the demo
config's budget (about three minutes on 2 CPU cores)."""

import pytest

from memkd_ray.config import load_config
from memkd_ray.data.synthetic import generate_benchmark
from memkd_ray.distributed.launcher import train_benchmark
from tests.conftest import CONFIGS


@pytest.mark.slow
def test_demo_config_detects_every_synthetic_category(tmp_path, ray_cluster):
    categories = generate_benchmark(tmp_path / "synth")
    cfg = load_config(CONFIGS / "demo.yaml", [f"data.root={tmp_path / 'synth'}"])
    summary = train_benchmark(cfg, ["all"], str(tmp_path / "store"))
    assert sorted(row["category"] for row in summary.rows) == sorted(categories)
    for row in summary.rows:
        assert row["status"] == "ok", row
        print(row["category"], {k: round(row[k], 3) for k in ("image_auroc", "pixel_auroc")})
        assert row["image_auroc"] >= 0.90, row
        assert row["pixel_auroc"] >= 0.90, row
