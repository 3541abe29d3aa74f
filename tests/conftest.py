"""Shared fixtures: a small synthetic benchmark and a fast CPU configuration."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.fixture(autouse=True, scope="session")
def _checkpoint_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Downloaded checkpoints go to a per-session cache, not the user's ~/.cache."""
    import os

    os.environ["MEMKD_RAY_CACHE"] = str(tmp_path_factory.mktemp("checkpoint-cache"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_benchmark(root, categories=2, seed=0, size=128)
    return root


# `memkd-ray ...` in a Python where importing torch, torchvision or timm fails: a line PC
# with ONNX Runtime and no deep-learning framework, or a laptop that only browses a registry.
WITHOUT_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(name + " is not installed here")
sys.meta_path.insert(0, NoTorch())
from memkd_ray.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def fast_config(*extra: str) -> MemKDConfig:
    return load_config(CONFIGS / "demo.yaml", [*FAST_OVERRIDES, *extra])


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A local Ray with 2 logical CPUs, shared by the tests that need one, stopped at the end.

    Started after the S3 variables are set: its workers find credentials as a node of a real
    cluster does, in their own environment (nothing secret travels with the tasks).
    """
    import ray

    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


S3_SECRET = "memkd-test-secret-7f3a9c"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback (moto server), with a bucket `memkd-test`.

    The code under test reaches it only through the standard AWS variables.
    """
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "memkd-test-key",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        # No instance-metadata probing: these credentials are the only ones.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket="memkd-test")
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def assert_no_secret(client, prefix: str, outputs: list[str] = ()) -> int:
    """Search every object under `prefix` in the test bucket, every file of this Ray session
    and `outputs` for the secret access key; return how many objects were searched."""
    import ray

    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket="memkd-test", Prefix=prefix) for obj in page.get("Contents", [])]
    for key in keys:
        body = client.get_object(Bucket="memkd-test", Key=key)["Body"].read()
        assert S3_SECRET.encode() not in body, key
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix in (".out", ".err", ".log") for p in logs), session
    for path in logs:
        assert S3_SECRET.encode() not in path.read_bytes(), path
    for text in outputs:
        assert S3_SECRET not in text
    return len(keys)


@pytest.fixture(scope="session")
def trained_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """`memkd-ray train` of both synthetic categories into a file store: (run dir, process)."""
    store = tmp_path_factory.mktemp("store")
    argv = ["train", "--config", str(CONFIGS / "demo.yaml"), "--data-root", str(synth_root),
            "--category", "all", "--storage", f"file://{store}"]
    for override in FAST_OVERRIDES:
        argv += ["--set", override]
    result = subprocess.run([sys.executable, "-m", "memkd_ray.cli", *argv], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (store / "runs").iterdir()
    return run_dir, result
