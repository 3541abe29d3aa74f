"""Shared fixtures: a small synthetic benchmark and a fast CPU configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memkd_ray.config import MemKDConfig, load_config
from memkd_ray.data.synthetic import generate_benchmark

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The demo's offline teacher at 128 px with one block per decoder stage: minutes, not hours.
FAST_OVERRIDES = [
    "data.image_size=128",
    "student.bottleneck_blocks=1",
    "student.decoder_blocks=[1,1,1]",
    "train.epochs=6",
    "train.num_threads=2",
]


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_benchmark(root, categories=2, seed=0, size=128)
    return root


def fast_config(*extra: str) -> MemKDConfig:
    return load_config(CONFIGS / "demo.yaml", [*FAST_OVERRIDES, *extra])
