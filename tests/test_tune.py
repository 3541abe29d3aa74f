"""Ray Tune: a small ASHA search on one synthetic category against S3 (moto on loopback),
selection without the test split, and resume after an interruption."""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from memkd_ray.cli import main
from memkd_ray.data import read_category
from memkd_ray.data.validation import make_validation_split
from memkd_ray.distributed.search_space import load_search_space
from memkd_ray.distributed.tune import SearchInterrupted, mark_selected, tune_benchmark
from memkd_ray.distributed.worker import train_loop_per_worker
from memkd_ray.errors import ConfigError
from memkd_ray.metrics import METRIC_KEYS, percent
from memkd_ray.report import write_report
from memkd_ray.storage import open_storage
from tests.conftest import CONFIGS, assert_no_secret, fast_config

pytestmark = pytest.mark.usefixtures("ray_cluster")
SPACE = load_search_space(str(CONFIGS / "tune" / "default.yaml"))


def _config(root: Path):
    return fast_config(f"data.root={root}", "train.epochs=2", "train.num_threads=1",
                       "distributed.cpus_per_worker=0.5")


@pytest.fixture
def one_category(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    shutil.copytree(synth_root / "mesh", root / "mesh")
    return root


def test_validation_split_is_seeded_and_built_from_training_images_only(synth_root):
    data = read_category("synthetic", synth_root, "mesh")
    a = make_validation_split(data.train, 64, seed=3)
    b = make_validation_split(data.train, 64, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(make_validation_split(data.train, 64, seed=4).images, a.images)
    assert set(a.sources) <= set(data.train) and not set(a.sources) & set(a.train)
    assert not {s.image_path for s in a.sources} & {s.image_path for s in data.test}
    assert len(a.train) + len(a.sources) == len(data.train)
    assert list(a.labels) == [0] * 6 + [1] * 6
    defective = a.masks[a.labels == 1].reshape(6, -1).sum(1)
    assert (defective > 0).all() and a.masks[a.labels == 0].sum() == 0


def test_a_trial_that_failed_after_its_checkpoint_is_never_selected():
    def trial(status: str, value: float, checkpoint: str = "s3://b/c") -> dict:
        return {"status": status, "selection_value": value, "selection_tiebreak": 0.5,
                "checkpoint_uri": checkpoint, "selected": False}

    rows = [trial("error", 0.99), trial("ok", 0.80), trial("ok", 0.95, checkpoint=""),
            trial("ok", 0.70)]
    mark_selected(rows)
    assert [r["selected"] for r in rows] == [False, True, False, False]
    errored_only = [trial("error", 0.99)]
    mark_selected(errored_only)
    assert not errored_only[0]["selected"]


def test_search_space_keys_are_checked_against_the_config(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("memory.itemz.0: {choice: [0, 10]}\n")
    with pytest.raises(ConfigError, match=r"memory\.itemz\.0: not a config key"):
        load_search_space(str(bad))
    bad.write_text("loss.lambda_nm: {gaussian: [0, 1]}\n")
    with pytest.raises(ConfigError, match="needs one of choice"):
        load_search_space(str(bad))


def _reads_of(root: Path) -> tuple[str, ...]:
    return (str(root / "test"), str(root / "ground_truth"))


def _test_split_access(hidden: tuple[str, ...], event: str, args: tuple) -> bool:
    """Whether an audit event opens or lists something under `hidden`."""
    if event not in ("open", "os.listdir", "os.scandir") or not args:
        return False
    path = args[0]
    return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(hidden)


def never_reads_the_test_split(loop_config: dict) -> object:
    """The production worker loop in a process where opening or listing anything under the
    category's test split raises: a trial that looked at it would fail."""
    import sys

    from memkd_ray.config import from_dict

    root = Path(from_dict(loop_config["config"]).data.root) / loop_config["category"]
    hidden = _reads_of(root)

    def refuse(event: str, args: tuple) -> None:
        if _test_split_access(hidden, event, args):
            raise PermissionError(f"{event} {args[0]}: the test split during a search")

    sys.addaudithook(refuse)
    return train_loop_per_worker(loop_config)


def test_asha_search_on_s3_selects_without_reading_the_test_split(one_category, s3_endpoint):
    # Trials run where any read of the test split raises; in this process, every read of it
    # is timed, and none may come before the last trial finished (selection needs none).
    hidden = _reads_of(one_category.resolve() / "mesh")
    reads: list[float] = []
    watching = [True]
    sys.addaudithook(lambda event, args: watching[0] and _test_split_access(
        hidden, event, args) and reads.append(time.monotonic()))
    timed: list[tuple[float, str]] = []
    try:
        summary = tune_benchmark(_config(one_category), ["mesh"], "s3://memkd-test/tune",
                                 SPACE, samples=4, scheduler="asha", max_concurrent=2,
                                 on_message=lambda m: timed.append((time.monotonic(), m)),
                                 train_loop=never_reads_the_test_split)
    finally:
        watching[0] = False
    messages = [m for _, m in timed]
    last_trial = max(t for t, m in timed if m.endswith(" finished"))
    assert reads and min(reads) > last_trial

    key = f"tune/runs/{summary.run_id}/tune_results.parquet"
    body = s3_endpoint.get_object(Bucket="memkd-test", Key=key)["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    for row in rows:
        assert row["status"] == "ok" and row["selected_on"] == "validation"
        assert row["selection_metric"] == "val_image_auroc"
        assert 0.0 <= row["selection_value"] <= 1.0
        assert row["param.memory.items.0"] in (0, 10, 25, 50, 100)
        assert 0.01 <= row["param.loss.lambda_nm"] <= 1.0
        assert 0.05 <= row["param.memory.temperature"] <= 1.0
        assert 1 <= row["epochs"] <= 2
    (best,) = [r for r in rows if r["selected"]]
    assert best["selection_value"] == max(r["selection_value"] for r in rows
                                          if r["checkpoint_uri"])
    assert all(0.0 <= best[f"test_{k}"] <= 1.0 for k in METRIC_KEYS)
    # Trial 0 is the configured default, kept as the baseline of the comparison; test
    # metrics exist only for the selected and the default trial, computed after selection.
    (default,) = [r for r in rows if r["is_default"]]
    assert default["param.memory.items.0"] == 50 and default["param.loss.lambda_nm"] == 0.1
    for row in rows:
        if not (row["selected"] or row["is_default"]):
            assert all(math.isnan(row[f"test_{k}"]) for k in METRIC_KEYS)
    # Stored relative to the store's root; the summary holds the bucket's URIs.
    assert best["checkpoint_uri"].startswith(f"runs/{summary.run_id}/")
    (selected,) = summary.selected
    assert selected["checkpoint_uri"] == f"s3://memkd-test/tune/{best['checkpoint_uri']}"
    assert any("finished" in m for m in messages)

    # The report of the search lands in the bucket: the selected trial's test metrics, its
    # curves and examples from the record the one test evaluation left beside its checkpoint.
    page_uri = write_report(open_storage("s3://memkd-test/tune"), summary.run_id)
    prefix = f"tune/runs/{summary.run_id}/report/"
    assert page_uri == f"s3://memkd-test/{prefix}index.html"
    listed = s3_endpoint.list_objects_v2(Bucket="memkd-test", Prefix=prefix)["Contents"]
    assert sorted(o["Key"].removeprefix(prefix) for o in listed) == [
        "index.html", "mesh_curves.png", "mesh_examples.png", "mesh_losses.png"]
    page = s3_endpoint.get_object(Bucket="memkd-test", Key=f"{prefix}index.html")["Body"]
    html = page.read().decode()
    assert (f'data-category="mesh" data-metric="image_auroc">'
            f'{percent(best["test_image_auroc"])}<') in html
    assert f"<td>mesh</td><td>{best['trial_id']}</td>" in html
    # Ray Tune pickles its run configuration, storage filesystem included, into the bucket:
    # the filesystem carries no credentials, so neither do tuner.pkl and the search state.
    run_keys = [o["Key"] for page in s3_endpoint.get_paginator("list_objects_v2").paginate(
        Bucket="memkd-test", Prefix=f"tune/runs/{summary.run_id}/") for o in page["Contents"]]
    assert any(k.endswith("/tuner.pkl") for k in run_keys), run_keys
    assert any("basic-variant-state" in k for k in run_keys), run_keys
    assert assert_no_secret(s3_endpoint, "tune/", messages) >= len(run_keys)


@pytest.mark.slow  # about 150 s: a search stopped by SIGTERM, then resumed
def test_interrupted_search_resumes_only_the_remaining_trials(one_category, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    finished: list[str] = []

    def interrupt_after_two(message: str) -> None:
        if message.endswith("finished"):
            finished.append(message.split()[2])
            if len(finished) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or Kubernetes would

    with pytest.raises(SearchInterrupted, match=r"--resume \S+"):
        tune_benchmark(_config(one_category), ["mesh"], store, SPACE, samples=4,
                       scheduler="fifo", max_concurrent=1, on_message=interrupt_after_two)
    (run_id,) = [p.name for p in (tmp_path / "store" / "runs").iterdir()]
    # As for train: the results say the category is unfinished.
    results = tmp_path / "store" / "runs" / run_id / "tune_results.parquet"
    rows = pq.read_table(results).to_pylist()
    assert [(r["category"], r["status"], r["selected"]) for r in rows] == [
        ("mesh", "interrupted", False)]
    assert main(["-q", "report", run_id, "--storage", store]) == 0
    page = (tmp_path / "store" / "runs" / run_id / "report" / "index.html").read_text()
    assert "<td>mesh</td>" in page and ">interrupted</td>" in page
    train_runs = tmp_path / "store" / "runs" / run_id / "synthetic" / "mesh-train"
    before = {str(p): p.stat().st_mtime for p in train_runs.rglob("checkpoint.json")
              if any(t in str(p) for t in finished)}
    assert len(before) >= 2

    resumed: list[str] = []
    summary = tune_benchmark(None, [], store, resume_run=run_id, on_message=resumed.append)
    assert summary.run_id == run_id and len(summary.rows) == 4
    # A trial that trains reports epoch 1 first; finished trials at most hand back their
    # final result from storage.
    trained_again = {m.split()[2] for m in resumed if " epoch 1:" in m}
    assert not trained_again & set(finished), "finished trials were trained again"
    assert len(trained_again) == 2
    after = {str(p): p.stat().st_mtime for p in train_runs.rglob("checkpoint.json")
             if any(t in str(p) for t in finished)}
    assert after == before
    assert sum(r["selected"] for r in summary.rows) == 1
    assert [r["status"] for r in pq.read_table(results).to_pylist()] == ["ok"] * 4
