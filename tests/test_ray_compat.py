"""Every Ray internal the package uses refuses an untested Ray in one line, before anything runs."""

from __future__ import annotations

import os

import pytest
import ray

from memkd_ray.cli import main
from memkd_ray.distributed import ray_compat
from memkd_ray.distributed.ray_compat import RayVersionError
from tests.conftest import CONFIGS


def _uses() -> dict:
    return {
        "console routing": ray_compat.route_raylet_messages,
        "local console": ray_compat.quiet_local_token_notice,
        "credential hygiene": ray_compat.keep_credentials_out_of_trials,
        "placement timeout": lambda: ray_compat.worker_group_start_timeout(5).__enter__(),
        "SIGTERM handling": lambda: ray_compat.sigterm_stops_tune().__enter__(),
    }


def test_the_installed_ray_is_the_tested_one():
    # pyproject.toml pins the range: a fresh install gets a Ray every internal accepts.
    ray_compat.check_ray_version()


@pytest.mark.parametrize("use", list(_uses()))
def test_each_internal_refuses_an_untested_ray_in_one_line(monkeypatch, use):
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(RayVersionError) as error:
        _uses()[use]()
    message = str(error.value)
    assert message.startswith(f"ray 2.61.0: memkd-ray's {use}") and "\n" not in message
    assert "tested with ray" in message and "2.60" in message


def test_an_internal_gone_from_ray_is_named(monkeypatch):
    import ray.tune.execution.class_cache as cache

    monkeypatch.delattr(cache, "ENV_VARS_TO_PROPAGATE")
    with pytest.raises(RayVersionError, match=r"class_cache\.ENV_VARS_TO_PROPAGATE is gone"):
        ray_compat.keep_credentials_out_of_trials()


def test_the_placement_timeout_is_scoped_to_its_block(monkeypatch):
    monkeypatch.setenv(ray_compat.WORKER_GROUP_START_TIMEOUT, "77")
    with ray_compat.worker_group_start_timeout(5):
        assert os.environ[ray_compat.WORKER_GROUP_START_TIMEOUT] == "5"
    assert os.environ[ray_compat.WORKER_GROUP_START_TIMEOUT] == "77"
    monkeypatch.delenv(ray_compat.WORKER_GROUP_START_TIMEOUT)
    with ray_compat.worker_group_start_timeout(5):
        pass
    assert ray_compat.WORKER_GROUP_START_TIMEOUT not in os.environ


def test_train_on_an_untested_ray_stops_before_anything_is_written(monkeypatch, synth_root,
                                                                   tmp_path, capsys):
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    store = tmp_path / "store"
    code = main(["train", "--config", str(CONFIGS / "demo.yaml"), "--data-root",
                 str(synth_root), "--storage", str(store)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ray 2.61.0" in err[0], err
    assert not store.exists()
