"""Ray Train: categories concurrently, storage on S3 (moto on loopback) and file://, resume
after a killed worker, a broken category failing alone, unreachable storage."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from memkd_ray.cli import main
from memkd_ray.data.synthetic import generate_benchmark
from memkd_ray.distributed import cluster, console, ray_compat
from memkd_ray.distributed.launcher import train_benchmark
from memkd_ray.distributed.worker import train_loop_per_worker
from memkd_ray.errors import UserInputError
from memkd_ray.eval_record import RECORD_FILES
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.storage import open_storage
from tests.conftest import CONFIGS, S3_SECRET, assert_no_secret, fast_config

pytestmark = pytest.mark.usefixtures("ray_cluster")
# The final checkpoint: weights, training state, metadata and the test evaluation record.
CHECKPOINT_FILES = {"model.safetensors", "checkpoint.json", "training_state.safetensors",
                    *(f"evaluation/{name}" for name in RECORD_FILES)}


def _config(root: Path, *extra: str):
    return fast_config(f"data.root={root}", "train.epochs=2", "train.num_threads=1",
                       "distributed.cpus_per_worker=0.5", *extra)


def test_two_categories_concurrently_stream_to_s3(synth_root, s3_endpoint):
    messages: list[str] = []
    cfg = _config(synth_root, "distributed.workers_per_category=2")
    summary = train_benchmark(cfg, ["all"], "s3://memkd-test/team-a", on_message=messages.append)
    assert [row["category"] for row in summary.rows] == ["mesh", "stripes"]
    assert "2 categories, 2 at a time, 2 workers each" in messages[0]

    listing = s3_endpoint.list_objects_v2(Bucket="memkd-test", Prefix="team-a/")
    keys = {obj["Key"] for obj in listing["Contents"]}
    run = f"team-a/runs/{summary.run_id}"
    assert summary.results_uri == f"s3://memkd-test/{run}/results.parquet"
    assert f"{run}/results.parquet" in keys
    for category in ("mesh", "stripes"):
        prefix = f"{run}/synthetic/{category}/checkpoint_epoch_0002/"
        files = {k.removeprefix(prefix) for k in keys
                 if k.startswith(prefix) and not k.endswith("/")}  # not directory markers
        assert files == CHECKPOINT_FILES

    body = s3_endpoint.get_object(Bucket="memkd-test", Key=f"{run}/results.parquet")["Body"]
    rows = pq.read_table(io.BytesIO(body.read())).to_pylist()
    # The stored pointers are relative to the store's root; read back, they are its URIs.
    assert [{**row, "checkpoint_uri": f"s3://memkd-test/team-a/{row['checkpoint_uri']}"}
            for row in rows] == summary.rows
    for row in summary.rows:
        assert row["status"] == "ok" and row["run_id"] == summary.run_id
        assert row["epochs"] == 2 and row["workers"] == 2
        assert all(0.0 <= row[key] <= 1.0 for key in METRIC_KEYS)
        assert row["checkpoint_uri"] == (f"s3://memkd-test/{run}/synthetic/{row['category']}/"
                                         "checkpoint_epoch_0002")
        assert row["config_hash"] == cfg.hash()
    # Both categories ran at the same time: their epoch lines interleave.
    order = [m.split()[0] for m in messages if " epoch " in m]
    assert order.index("stripes") < len(order) - 2 and order.index("mesh") < len(order) - 2
    # Credentials never reach what we store, Ray's logs or the console.
    assert assert_no_secret(s3_endpoint, "team-a/", messages) == len(keys)


def test_file_storage_queues_categories_beyond_the_cluster(tmp_path):
    root = tmp_path / "synth3"
    generate_benchmark(root, categories=3, size=64, train=12, test_good=4, defective_per_type=2)
    messages: list[str] = []
    cfg = _config(root, "data.image_size=64", "train.epochs=1",
                  "distributed.workers_per_category=2")
    store = tmp_path / "store"
    summary = train_benchmark(cfg, ["all"], f"file://{store}", on_message=messages.append)
    # 3 categories x 2 workers x 0.5 CPU on a 2-CPU cluster: two at a time, the third queues.
    assert "3 categories, 2 at a time" in messages[0]
    assert [row["status"] for row in summary.rows] == ["ok", "ok", "ok"]
    run_dir = store / "runs" / summary.run_id
    assert pq.read_table(run_dir / "results.parquet").num_rows == 3
    for row in summary.rows:
        checkpoint = run_dir / "synthetic" / row["category"] / "checkpoint_epoch_0001"
        assert {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                if p.is_file()} == CHECKPOINT_FILES
        assert row["checkpoint_uri"] == checkpoint.as_uri()


def dies_in_epoch_2(loop_config: dict) -> object:
    """The production worker loop, whose rank 0 dies hard (no exception, no cleanup) 5 s into
    epoch 2 of its first attempt, as a crashed node would. Ray Train's controller registers a
    reported checkpoint when it next polls the workers (every 2 s by default), so the delay
    lets epoch 1's checkpoint be registered first."""
    import os
    import time

    import ray.train

    report = ray.train.report
    first_attempt = ray.train.get_checkpoint() is None

    def report_then_die(metrics: dict, *args: object, **kwargs: object) -> None:
        report(metrics, *args, **kwargs)
        if (first_attempt and metrics["epoch"] == 1
                and ray.train.get_context().get_world_rank() == 0):
            time.sleep(5.0)
            os._exit(1)

    ray.train.report = report_then_die
    return train_loop_per_worker(loop_config)


def test_killed_worker_resumes_from_its_last_checkpoint(synth_root, tmp_path):
    messages: list[str] = []
    cfg = _config(synth_root, "train.epochs=3", "train.checkpoint_every=1",
                  "distributed.workers_per_category=2")
    summary = train_benchmark(cfg, ["stripes"], str(tmp_path / "store"),
                              train_loop=dies_in_epoch_2, on_message=messages.append)
    (row,) = summary.rows
    assert row["status"] == "ok" and row["epochs"] == 3
    checkpoint = Path(row["checkpoint_uri"].removeprefix("file://"))
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    assert meta["epoch"] == 3
    assert [h["epoch"] for h in meta["training_state"]["history"]] == [1, 2, 3]
    epochs = [int(m.split()[2].rstrip(":")) for m in messages if m.startswith("stripes epoch")]
    # Epoch 2's first attempt died before reporting; the restart began after epoch 1's
    # checkpoint, not from scratch: epoch 1 ran once.
    assert "stripes: resumed from the checkpoint of epoch 1" in messages
    assert epochs == [1, 2, 3]


def test_broken_category_fails_alone(synth_root, tmp_path, capsys):
    root = tmp_path / "bench"
    shutil.copytree(synth_root, root)
    (root / "mesh" / "test" / "good" / "002.png").write_bytes(b"garbage")
    store = tmp_path / "store"
    argv = ["train", "--config", str(CONFIGS / "demo.yaml"), "--data-root",
            str(root), "--storage", str(store), "--workers-per-category", "1"]
    for override in ("data.image_size=64", "student.bottleneck_blocks=1",
                     "student.decoder_blocks=[1,1,1]", "train.epochs=1",
                     "distributed.cpus_per_worker=0.5"):
        argv += ["--set", override]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert re.search(r"mesh .* failed", captured.out)
    assert re.search(r"stripes .* ok", captured.out)
    assert "FAILED mesh:" in captured.err and "002.png: unreadable image" in captured.err
    (run_dir,) = (store / "runs").iterdir()
    rows = {r["category"]: r for r in pq.read_table(run_dir / "results.parquet").to_pylist()}
    assert rows["mesh"]["status"] == "failed" and "002.png" in rows["mesh"]["error"]
    assert rows["stripes"]["status"] == "ok"
    # The report still comes: the failed category with its reason and no figures.
    report = run_dir / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "index.html", "stripes_curves.png", "stripes_examples.png", "stripes_losses.png"]
    page = (report / "index.html").read_text()
    assert '<td class="failed">failed: ' in page and "002.png: unreadable image" in page
    assert "<td>mean of 1</td>" in page


@pytest.mark.parametrize(
    ("storage", "endpoint", "message"),
    [
        ("s3://memkd-test/x", "http://127.0.0.1:9", "cannot reach the bucket"),
        # Accepts connections (the kernel's backlog) and never answers.
        ("s3://memkd-test/x", "silent", "cannot reach the bucket"),
        ("s3://no-such-bucket/x", None, "bucket no-such-bucket not found"),
        # botocore's reason spans lines; all of it is kept, on one line.
        ("s3://Bad_Bucket!!/x", None, 'Invalid bucket name "Bad_Bucket!!"'),
    ],
)
def test_unusable_s3_storage_is_a_quick_one_line_error(storage, endpoint, message, s3_endpoint,
                                                       synth_root, monkeypatch, capsys):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    if endpoint == "silent":
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    began = time.monotonic()
    code = main(["train", "--config", str(CONFIGS / "demo.yaml"), "--data-root",
                 str(synth_root), "--storage", storage])
    elapsed = time.monotonic() - began
    silent.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert elapsed < 10, elapsed
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert S3_SECRET not in err[0]


def test_a_category_the_cluster_cannot_place_fails_after_the_timeout(synth_root, tmp_path,
                                                                     monkeypatch):
    # Joined to a cluster (which may be autoscaling), a GPU category on CPU-only nodes waits,
    # says what for, and fails once distributed.placement_timeout_s has passed.
    monkeypatch.setattr(console, "WAIT_NOTICE_S", 1.0)
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    cfg = _config(synth_root, "distributed.gpus_per_worker=1",
                  "distributed.placement_timeout_s=5", "train.epochs=1")
    messages: list[str] = []
    began = time.monotonic()
    summary = train_benchmark(cfg, ["mesh"], f"file://{tmp_path / 'store'}", address="auto",
                              on_message=messages.append)
    assert time.monotonic() - began < 90
    (row,) = summary.rows
    assert row["status"] == "failed"
    assert "no room in the cluster after 5 s (distributed.placement_timeout_s)" in row["error"]
    needs = "needs 1 workers x 0.5 CPU x 1 GPU; the cluster has 2 CPU, 0 GPU"
    assert needs in row["error"]
    assert any(m.startswith(f"mesh: waiting for resources: {needs}") for m in messages)
    # The same request on a local cluster (no --address) is refused before anything starts.
    with pytest.raises(UserInputError, match=f"a category {needs}"):
        train_benchmark(cfg, ["mesh"], f"file://{tmp_path / 'local'}")
    assert not (tmp_path / "local").exists()


def starts_slowly(loop_config: dict) -> object:
    """The production worker loop, 4 s late: workers placed but still starting up (importing,
    loading), as on a busy 2-core machine."""
    import time

    time.sleep(4.0)
    return train_loop_per_worker(loop_config)


def test_placed_workers_that_start_slowly_are_not_waiting_for_resources(synth_root, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(console, "WAIT_NOTICE_S", 1.0)
    messages: list[str] = []
    summary = train_benchmark(_config(synth_root, "train.epochs=1"), ["mesh"],
                              f"file://{tmp_path / 'store'}", train_loop=starts_slowly,
                              on_message=messages.append)
    assert [row["status"] for row in summary.rows] == ["ok"]
    assert not any("waiting for resources" in m for m in messages), messages


RAYLET_NOISE = """
import sys, ray
from memkd_ray.distributed.cluster import connect
connect()
@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1
actors = [Idle.remote() for _ in range(32)]
ray.get([actor.ping.remote() for actor in actors])
print(ray._private.worker._global_node.get_session_dir_path(), file=sys.stderr)
ray.shutdown()
print("result")
"""


def test_raylet_messages_stay_off_stdout():
    # 32 processes on a 2-CPU node: the raylet warns about the worker pool's size (in its log,
    # asserted below so that this test cannot pass on a run where nothing was pushed).
    result = subprocess.run([sys.executable, "-c", RAYLET_NOISE], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "result\n"
    assert ray_compat.WORKER_POOL_WARNING not in result.stderr
    session = Path(result.stderr.strip().splitlines()[-1])
    assert ray_compat.WORKER_POOL_WARNING in (session / "logs" / "raylet.out").read_text()


def test_a_shared_storage_check_leaves_nothing_behind(tmp_path):
    # Every node of this cluster sees the driver's disk: accepted, and the directories the
    # check had to create for its marker are gone again.
    cluster.check_storage_reaches_every_node(open_storage(str(tmp_path / "new" / "store")))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "store").mkdir()
    cluster.check_storage_reaches_every_node(open_storage(str(tmp_path / "store")))
    assert list((tmp_path / "store").iterdir()) == []


def test_training_outlives_its_progress_queue(synth_root, tmp_path, monkeypatch):
    # The queue actor that carries the console lines is killed after the first epoch line:
    # the category still trains every epoch and ends ok, and the console says what was lost.
    from ray.util.state import list_actors

    make_queue = console.Queue
    queues: list[console.Queue] = []

    def recorded_queue(**options: dict) -> console.Queue:
        queues.append(make_queue(**options))
        return queues[-1]

    monkeypatch.setattr(console, "Queue", recorded_queue)
    messages: list[str] = []

    def kill_the_queue_once(message: str) -> None:
        messages.append(message)
        if message.startswith("stripes epoch 1:"):
            # This run's queue by its actor id: an earlier test's queue may still be listed
            # as alive while its kill is on the way.
            (queue,) = queues
            (actor,) = list_actors(filters=[("actor_id", "=", queue.actor._actor_id.hex())],
                                   detail=True)
            os.kill(actor.pid, signal.SIGKILL)

    cfg = _config(synth_root, "train.epochs=3", "train.checkpoint_every=1")
    summary = train_benchmark(cfg, ["stripes"], str(tmp_path / "store"),
                              on_message=kill_the_queue_once)
    (row,) = summary.rows
    assert row["status"] == "ok" and row["epochs"] == 3, row
    assert any(m.startswith("progress lines lost (") for m in messages), messages
    assert not any(m.startswith(("stripes epoch 2:", "stripes epoch 3:")) for m in messages)
    meta = json.loads((Path(row["checkpoint_uri"].removeprefix("file://"))
                       / "checkpoint.json").read_text())
    assert [h["epoch"] for h in meta["training_state"]["history"]] == [1, 2, 3]
