"""A two-node Ray cluster on one machine, driven only through the jobs/ scripts.

A head (`ray start --head`, dashboard on loopback) and a second node (`ray start --address`,
its own `--num-cpus` and a custom resource) run with token authentication, as a user's cluster
would. jobs/submit_benchmark.py submits a 2-category, 1-epoch run against the moto S3 endpoint
and waits for it. Each node has 1 CPU and each category's worker needs 1 CPU, so the two
categories can only succeed by running on different nodes; Ray's state API then confirms where
each worker ran. The results, checkpoints and registry entries must be in the bucket, and
jobs/submit_eval.py re-evaluates the registered models on the same cluster.

The nodes run from a Python that has every dependency but not this package (as a stock Ray
image would), so the jobs can only run the code they ship in their working_dir.

Both nodes are stopped at the end, even on failure, by signalling the `ray start --block`
processes this module started (not `ray stop`, which would stop every Ray on the machine),
then killing whatever still carries this cluster's token path in its environment.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from memkd_ray.eval_record import RECORD_FILES
from memkd_ray.metrics import METRIC_KEYS
from tests.conftest import FAST_OVERRIDES, REPO, S3_SECRET

# A two-node cluster and two jobs: minutes; CI runs it (CI=true), `make test-all` anywhere.
pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
NODE_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 600
# The final checkpoint: weights, training state, metadata and the test evaluation record.
CHECKPOINT_FILES = {"model.safetensors", "checkpoint.json", "training_state.safetensors",
                    *(f"evaluation/{name}" for name in RECORD_FILES)}
# 1 epoch, 1 thread, and a whole CPU per worker: 2 categories need both nodes.
JOB_OVERRIDES = [
    *(o for o in FAST_OVERRIDES if not o.startswith(("train.epochs", "train.num_threads"))),
    "train.epochs=1", "train.num_threads=1", "distributed.cpus_per_worker=1",
]


@dataclass
class Cluster:
    dashboard: str
    client_env: dict[str, str]
    """What a client of this cluster sets: RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH."""
    token_path: Path
    root: Path
    """Holds the nodes' Ray temp directories, head/ and second/ (session logs)."""
    gcs: str
    node_env: dict[str, str]
    python: Path
    """The Python the nodes run: every dependency, not this package."""

    def state(self, resource: str, *filters: str) -> list[dict]:
        """`ray list RESOURCE` through the dashboard, authenticated like any client."""
        args = [str(RAY), "list", resource, "--address", self.dashboard, "--format", "json",
                "--detail", "--limit", "1000", *(f for flt in filters for f in ("--filter", flt))]
        result = subprocess.run(args, env={**os.environ, **self.client_env}, capture_output=True,
                                text=True, timeout=120, check=True)
        return json.loads(result.stdout)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def python_without_this_package(root: Path) -> Path:
    """A Python with every dependency of this package but not the package, as a stock Ray
    image has: a venv whose site-packages links every entry of the test environment's but the
    package's own (its editable-install hook and metadata)."""
    env = root / "node-python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (site,) = env.glob("lib/python*/site-packages")
    (source,) = (Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()
                 and Path(sys.prefix) in Path(p).parents)
    for entry in source.iterdir():
        if not entry.name.lower().startswith(("memkd_ray", "__editable__")):
            (site / entry.name).symlink_to(entry)
    python = env / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import memkd_ray"], cwd=root,
                           capture_output=True, text=True, check=False)
    assert "No module named 'memkd_ray'" in probe.stderr, probe.stderr
    return python


def start_node(args: list[str], log: Path, env: dict[str, str], python: Path,
               stack: ExitStack, wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    """`ray start --block` in its own process group, its processes living as long as it does.

    Registered on `stack` to be stopped; one more try if Ray's own startup timeout (30 s for
    the raylet to register) expires on a busy machine. `python` runs the node and everything
    it starts; the working directory is the log's, outside the checkout. `wrapper` runs before
    the node and must `exec` it. Every process of the node inherits a marker naming its log,
    by which `stop_node` finds the ones outside the node's process group.
    """
    marker = f"MEMKD_TEST_NODE={log}"
    env = {**env, "MEMKD_TEST_NODE": str(log)}
    for _ in range(2):
        with log.open("w") as out:
            process = subprocess.Popen(
                [*wrapper, str(python), "-m", "ray.scripts.scripts", "start", "--block",
                 "--disable-usage-stats", *args], stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=log.parent, start_new_session=True)
        stack.callback(stop_node, process, marker)
        if wait_started(process, log):
            return process
        stop_node(process, marker)
    pytest.fail(f"ray start did not come up twice:\n{log.read_text()[-3000:]}")


def wait_started(process: subprocess.Popen, log: Path) -> bool:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if "Ray runtime started" in log.read_text():
            return True
        time.sleep(1)
    return False


def stop_node(process: subprocess.Popen, marker: str) -> None:
    """SIGTERM to the `ray start --block` group: it stops the processes it started. Whatever
    of the node outlives that (a dashboard or runtime-env agent left running on its own) is
    killed by its marker."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    kill_leftovers(marker)


def kill_leftovers(marker: str) -> None:
    """Kill the processes whose environment holds `marker` (this cluster's token path, or one
    node's marker): only ours."""
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.fixture(scope="module")
def cluster(s3_endpoint) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="mk2n-", dir="/tmp"))  # short: Ray's socket paths
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # The nodes hold S3 credentials of their own (as from a Kubernetes Secret or an instance
    # role) but not the endpoint: the job brings that setting by name, never the credentials.
    node_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_ENDPOINT", "RAY_ADDRESS", "RAY_API_SERVER"))}
    gcs, dashboard, client, *agent = free_ports(7)
    common = ["--num-gpus", "0", "--object-store-memory", str(200 * 2**20)]
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        stack.callback(kill_leftovers, str(token))
        # The nodes run a Python that has the dependencies but not this package: the jobs
        # can only run the code they ship (`python` on the nodes' PATH is that one).
        python = python_without_this_package(root)
        node_env.update(client_env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                        PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}")
        node_env.pop("PYTHONPATH", None)
        start_node([
            "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent[0]), "--metrics-export-port",
            str(agent[1]), "--min-worker-port", "23000", "--max-worker-port", "23499",
            "--num-cpus", "1", "--resources", '{"memkd_head": 1}', "--temp-dir",
            str(root / "head"), *common], root / "head.log", node_env, python, stack)
        # Stopped before the head: ExitStack unwinds in reverse.
        start_node([
            "--address", f"127.0.0.1:{gcs}", "--dashboard-agent-listen-port", str(agent[2]),
            "--metrics-export-port", str(agent[3]), "--min-worker-port", "23500",
            "--max-worker-port", "23999", "--num-cpus", "1",
            "--resources", '{"memkd_second_node": 1}', "--temp-dir", str(root / "second"),
            *common], root / "second.log", node_env, python, stack)
        yield Cluster(f"http://127.0.0.1:{dashboard}", client_env, token, root,
                      f"127.0.0.1:{gcs}", node_env, python)


def submit(script: str, cluster: Cluster, *args: str,
           env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a jobs/ script as a user would; `env` entries set to None are unset."""
    merged = {**os.environ, **cluster.client_env, **(env or {})}
    environment = {key: value for key, value in merged.items() if value is not None}
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), "--address", cluster.dashboard, *args],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
        check=False)


@pytest.fixture(scope="module")
def benchmark_job(cluster: Cluster, synth_root: Path, s3_endpoint) -> dict:
    prefix = f"multinode-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = submit("submit_benchmark.py", cluster, "--benchmark", "configs/demo.yaml",
                    str(synth_root), "--storage", f"s3://memkd-test/{prefix}",
                    "--workers-per-category", "1", *(f"--set={o}" for o in JOB_OVERRIDES),
                    "--entrypoint-num-cpus", "0", "--wait")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    print(f"benchmark job: {time.monotonic() - started:.0f}s")
    return {"prefix": prefix, "stdout": result.stdout, "output": output}


def test_benchmark_job_succeeds_and_says_how_to_follow_it(benchmark_job, cluster):
    stdout = benchmark_job["stdout"]
    job_id = re.search(r"^submitted job (\S+) to ", stdout, re.MULTILINE).group(1)
    assert f"ray job logs --address {cluster.dashboard} --follow {job_id}" in stdout
    assert "variables passed by name: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION\n" in stdout
    assert re.search(rf"^job {job_id}: SUCCEEDED$", stdout, re.MULTILINE)
    # The job's own output came back: the per-category results table.
    assert re.search(r"^mean .* 2 ok$", stdout, re.MULTILINE)
    assert S3_SECRET not in benchmark_job["output"]


def test_no_credential_reaches_the_bucket_or_the_nodes_logs(benchmark_job, cluster, s3_endpoint):
    paginator = s3_endpoint.get_paginator("list_objects_v2")
    keys = [obj["Key"] for page in paginator.paginate(
        Bucket="memkd-test", Prefix=f"{benchmark_job['prefix']}/") for obj in page["Contents"]]
    assert any(key.endswith("/model.safetensors") for key in keys)
    for key in keys:
        body = s3_endpoint.get_object(Bucket="memkd-test", Key=key)["Body"].read()
        assert S3_SECRET.encode() not in body, key
    # Everything the nodes wrote but the code the job shipped (whose tests hold the secret).
    logs = [p for node in ("head", "second") for p in (cluster.root / node).rglob("*")
            if p.is_file() and not p.is_symlink() and "runtime_resources" not in p.parts]
    assert any(p.name.startswith("runtime_env_agent") for p in logs)
    for path in logs:
        assert S3_SECRET.encode() not in path.read_bytes(), path


def test_the_categories_ran_on_both_nodes(benchmark_job, cluster):
    nodes = {node["node_id"]: node for node in cluster.state("nodes")}
    assert len(nodes) == 2 and all(node["state"] == "ALIVE" for node in nodes.values())
    workers = cluster.state("actors", "class_name=RayTrainWorker")
    assert len(workers) == 2, workers
    custom = {name for worker in workers
              for name in nodes[worker["node_id"]]["resources_total"]
              if name.startswith("memkd_")}
    assert custom == {"memkd_head", "memkd_second_node"}


def test_results_checkpoints_and_registry_are_in_the_bucket(benchmark_job, s3_endpoint):
    prefix = benchmark_job["prefix"]
    listing = s3_endpoint.list_objects_v2(Bucket="memkd-test", Prefix=f"{prefix}/")
    keys = {obj["Key"] for obj in listing["Contents"]}
    (results,) = [k for k in keys if k.endswith("/results.parquet")]
    run_id = results.split("/")[-2]
    assert results == f"{prefix}/runs/{run_id}/results.parquet"
    assert f"run {run_id}: s3://memkd-test/{results}" in benchmark_job["stdout"]
    body = s3_endpoint.get_object(Bucket="memkd-test", Key=results)["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    assert sorted(row["category"] for row in rows) == ["mesh", "stripes"]
    for row in rows:
        assert row["status"] == "ok" and row["epochs"] == 1 and row["workers"] == 1
        assert all(0.0 <= row[key] <= 1.0 for key in METRIC_KEYS)
        checkpoint = f"{prefix}/runs/{run_id}/synthetic/{row['category']}/checkpoint_epoch_0001/"
        assert {k.removeprefix(checkpoint) for k in keys
                if k.startswith(checkpoint) and not k.endswith("/")} == CHECKPOINT_FILES
        assert f"{prefix}/registry/synthetic/{row['category']}/best.json" in keys
        assert f"{prefix}/runs/{run_id}/report/{row['category']}_curves.png" in keys
    assert f"{prefix}/runs/{run_id}/report/index.html" in keys


def test_eval_job_reevaluates_the_registered_models(benchmark_job, cluster, synth_root):
    result = submit("submit_eval.py", cluster, "--benchmark", "synthetic", "--data-root",
                    str(synth_root), "--storage", f"s3://memkd-test/{benchmark_job['prefix']}",
                    "--wait")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for category in ("mesh", "stripes"):
        assert re.search(rf"^{category}: I-AUROC \d+\.\d$", result.stdout, re.MULTILINE)
    assert re.search(r"^job \S+: SUCCEEDED$", result.stdout, re.MULTILINE)


@pytest.mark.parametrize(("env", "message"), [
    ({"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN_PATH": None}, "requires a token"),
    ({"RAY_AUTH_TOKEN": "0" * 64}, "rejected the token"),
])
def test_the_cluster_refuses_clients_without_its_token(cluster, env, message):
    result = submit("submit_eval.py", cluster, "--benchmark", "b", "--data-root", "/d",
                    "--storage", "/s", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_file_storage_a_node_cannot_see_is_refused(cluster, synth_root):
    """A third node sees its own empty tmpfs at the storage path (its own mount namespace), as
    a node with a local disk there would: the job is refused, naming that node, before it
    writes anything; the check found no fault with the head's and the second node's view."""
    store = cluster.root / "store"
    store.mkdir()
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, check=False)
    assert probe.returncode == 0, f"this test needs mount namespaces (root): {probe.stderr}"
    own_tmpfs = ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(store))
    agent, metrics = free_ports(2)
    with ExitStack() as stack:
        start_node(["--address", cluster.gcs, "--dashboard-agent-listen-port", str(agent),
                    "--metrics-export-port", str(metrics), "--min-worker-port", "24000",
                    "--max-worker-port", "24499", "--num-cpus", "1", "--num-gpus", "0",
                    "--object-store-memory", str(200 * 2**20), "--resources",
                    '{"memkd_third_node": 1}', "--temp-dir",
                    str(cluster.root / "third")], cluster.root / "third.log", cluster.node_env,
                   cluster.python, stack, wrapper=own_tmpfs)
        third = next(node["node_id"] for node in cluster.state("nodes", "state=ALIVE")
                     if "memkd_third_node" in node["resources_total"])
        result = submit("submit_benchmark.py", cluster, "--benchmark", "configs/demo.yaml",
                        str(synth_root), "--storage", f"file://{store}",
                        "--workers-per-category", "1", *(f"--set={o}" for o in JOB_OVERRIDES),
                        "--entrypoint-num-cpus", "0", "--wait")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    (line,) = [line for line in output.splitlines() if "not visible from" in line]
    # Only the third node is named: the head's and the second node's views are the driver's.
    assert re.search(rf"--storage file://{store}: not visible from [\d.]+ \(node {third[:8]}\):",
                     line) and line.count("(node ") == 1, line
    assert list(store.iterdir()) == []
