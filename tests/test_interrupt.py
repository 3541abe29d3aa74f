"""Ctrl+C and SIGTERM on `train`: every category stops at a step boundary within seconds,
results.parquet records them as interrupted, and `train --resume` finishes the run from its
checkpoints without repeating a finished epoch."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from memkd_ray.distributed import launcher
from memkd_ray.distributed.console import Interruption
from memkd_ray.metrics import METRIC_KEYS
from tests.conftest import CONFIGS, FAST_OVERRIDES

EPOCHS = 10


def test_first_signal_asks_the_second_forces_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    interruption = Interruption()
    with interruption.handlers():
        signal.raise_signal(signal.SIGTERM)
        assert interruption.requested.is_set() and not interruption.forced.is_set()
        assert interruption.signal == "SIGTERM"
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: ours handles it
        assert interruption.forced.is_set() and interruption.signal == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_stop_request_starts_no_more_categories_and_waits_a_bounded_time(monkeypatch):
    monkeypatch.setattr(launcher, "STOP_GRACE_S", 1.0)
    interruption = Interruption()
    started: list[str] = []
    stops: list[bool] = []
    b_started, release = threading.Event(), threading.Event()

    def run(name: str) -> dict:
        started.append(name)
        if name == "a":  # Ctrl+C while a and b run
            b_started.wait(10)
            interruption.signal = "SIGINT"
            interruption.requested.set()
        if name == "b":
            b_started.set()
            release.wait(60)  # a category that never reaches a step boundary in time
        return {"category": name}

    began = time.monotonic()
    rows = launcher.run_in_threads(["a", "b", "c", "d"], 2, interruption,
                                    lambda: stops.append(True), lambda _: None, run)
    release.set()
    assert time.monotonic() - began < 10
    assert sorted(started) == ["a", "b"] and list(rows) == ["a"]
    assert stops == [True]


def _train(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "memkd_ray.cli", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # two trainings in subprocesses: about 2.5 minutes
def test_ctrl_c_stops_every_category_and_resume_finishes_the_run(synth_root, tmp_path):
    store = tmp_path / "store"
    argv = ["--config", str(CONFIGS / "demo.yaml"), "--data-root", str(synth_root),
            "--storage", str(store), "--no-report"]
    for override in [*FAST_OVERRIDES, "data.image_size=64", f"train.epochs={EPOCHS}",
                     "train.num_threads=1", "train.checkpoint_every=1",
                     "distributed.cpus_per_worker=1"]:
        argv += ["--set", override]
    process = _train(*argv)
    lines: list[str] = []
    reached: set[str] = set()
    signalled = None
    for line in process.stdout:
        lines.append(line)
        match = re.match(r"(\w+) +epoch +(\d+):", line)
        if match and int(match.group(2)) >= 2:
            reached.add(match.group(1))
        if signalled is None and reached == {"mesh", "stripes"}:
            process.send_signal(signal.SIGINT)
            signalled = time.monotonic()
    code = process.wait(timeout=120)
    output = "".join(lines)
    assert signalled is not None, output[-3000:]
    assert time.monotonic() - signalled < 30, output[-3000:]
    assert code == 130, output[-3000:]

    (run_dir,) = (store / "runs").iterdir()
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert [(r["category"], r["status"]) for r in rows] == [
        ("mesh", "interrupted"), ("stripes", "interrupted")]
    assert f"continue with: memkd-ray train --resume {run_dir.name} --storage {store}" in output
    assert "SIGINT: stopping every category at its next step" in output
    assert not (store / "registry").exists()  # nothing unfinished is offered to the registry
    stopped = {c: int(n) for c, n in re.findall(r"^(\w+): stopped after epoch (\d+)$", output,
                                                re.MULTILINE)}
    assert set(stopped) == {"mesh", "stripes"} and min(stopped.values()) >= 2
    assert max(stopped.values()) < EPOCHS
    # Each category left the checkpoint of the last epoch it finished.
    for category, epoch in stopped.items():
        assert (run_dir / "synthetic" / category / f"checkpoint_epoch_{epoch:04d}").is_dir()

    # As a driver killed right after an upload leaves it: mesh's next checkpoint complete in
    # storage but never registered with Ray, and one after it cut short. Resume continues
    # from the newest complete one: no finished epoch is trained again.
    mesh = run_dir / "synthetic" / "mesh"
    _unregistered_checkpoint(mesh, stopped["mesh"])
    stopped["mesh"] += 1
    _unregistered_checkpoint(mesh, stopped["mesh"])
    weights = mesh / f"checkpoint_epoch_{stopped['mesh'] + 1:04d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    resumed = _train("--resume", run_dir.name, "--storage", str(store), "--no-report")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    for category, epoch in stopped.items():
        assert f"{category}: resumed from the checkpoint of epoch {epoch}" in output
        epochs = [int(n) for n in re.findall(rf"^{category} +epoch +(\d+):", output,
                                              re.MULTILINE)]
        assert epochs == list(range(epoch + 1, EPOCHS + 1)), output[-3000:]
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert [(r["category"], r["status"], r["epochs"]) for r in rows] == [
        ("mesh", "ok", EPOCHS), ("stripes", "ok", EPOCHS)]
    assert all(0.0 <= row[key] <= 1.0 for row in rows for key in METRIC_KEYS)
    assert rows[1]["image_auroc"] > 0.8  # stripes is learned at 64 px in 10 epochs
    assert re.search(r"^mean .* 2 ok$", output, re.MULTILINE)
    assert sorted(p.name for p in (store / "registry" / "synthetic").iterdir()) == [
        "mesh", "stripes"]


def _unregistered_checkpoint(run_dir: Path, epoch: int) -> None:
    """A copy of the checkpoint of `epoch` as the checkpoint of the next epoch (a complete,
    consistent upload that Ray's own records do not know)."""
    target = run_dir / f"checkpoint_epoch_{epoch + 1:04d}"
    shutil.copytree(run_dir / f"checkpoint_epoch_{epoch:04d}", target)
    meta = json.loads((target / "checkpoint.json").read_text())
    history = meta["training_state"]["history"]
    meta["epoch"] = epoch + 1
    history.append({**history[-1], "epoch": epoch + 1})
    (target / "checkpoint.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("argv", "message"), [
    (["--resume", "20990101-000000-abcdef"], "--resume 20990101-000000-abcdef: no such train run"),
    (["--resume", "x", "--config", "c.yaml"], "--config cannot change it"),
    (["--resume", "x", "--category", "mesh"], "--category cannot change it"),
    ([], "--config is required (or --resume RUN_ID)"),
])
def test_resume_refuses_what_it_cannot_do(argv, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "memkd_ray.cli", "train", *argv,
                             "--storage", str(tmp_path / "store")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("memkd-ray: error: ") and message in line
    assert not any((tmp_path / "store").rglob("*"))
