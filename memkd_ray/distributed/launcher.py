"""Every category of a benchmark at once: one Ray Train `TorchTrainer` per category.

Each trainer is started from its own driver thread (`TorchTrainer.fit` blocks); as many run
together as the cluster's CPUs/GPUs hold and the others queue. Rank 0 of every category sends
one progress message per epoch through a Ray queue, printed here as one line, instead of Ray's
worker logs. One category failing does not stop the others; results.parquet gets one row per
category either way.

Ray Train stops a run on Ctrl+C only when `fit()` runs in the main thread, so the driver takes
SIGINT and SIGTERM itself: the first asks every category's workers to stop at their next step
(a flag actor they poll), categories not started are not started, and after a grace period the
driver stops waiting; unfinished categories are recorded as `interrupted`. The request is saved
with the run (`train_spec.json`), so `train --resume RUN_ID` continues from the checkpoints in
storage: Ray Train restores each category's last checkpoint, finished categories are kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.exceptions
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from memkd_ray.config import MemKDConfig, from_dict
from memkd_ray.data import read_configured_category, resolve_categories
from memkd_ray.distributed.train_loop import STOPPED, train_loop_per_worker
from memkd_ray.engine import format_epoch
from memkd_ray.errors import DataError, UserInputError
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.model.teacher import check_teacher
from memkd_ray.storage.layout import RunLayout, read_results, write_results
from memkd_ray.storage.uri import Storage, open_storage, plain_name

log = logging.getLogger(__name__)


WAIT_NOTICE_S = 15.0
"""A category whose workers have not started after this long says what it waits for."""
SPEC_FILE = "train_spec.json"
STOP_GRACE_S = 25.0
"""After a stop request, how long the driver waits for categories to reach a step boundary."""


@dataclass
class RunSummary:
    run_id: str
    results_uri: str
    rows: list[dict]
    signal: str = ""
    """The signal that interrupted the run (SIGINT, SIGTERM), or empty."""

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "failed"]

    @property
    def interrupted(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "interrupted"]


class PlacementError(RuntimeError):
    """A category's worker group found no room in the cluster within the placement timeout."""


@ray.remote(num_cpus=0)
class StopFlag:
    """Set once by the driver on Ctrl+C; every worker polls it (train_loop.StopPolling)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class Interruption:
    """SIGINT/SIGTERM while a run is under way: the first asks for a stop, a second forces it.

    The handlers only set events (no I/O: a handler may run while the main thread holds the
    logging lock); the waiting loop reports them.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.forced = threading.Event()
        self.signal = ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            self.forced.set()
        else:
            self.signal = signal.Signals(signum).name
            self.requested.set()

    @contextmanager
    def handlers(self) -> Iterator[Interruption]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def connect(address: str | None = None, storage: Storage | None = None) -> None:
    """Join a cluster (`auto`, `ray://...`, `host:port`) or start a local one (no address).
    Joined, a `file://` `storage` must be one filesystem for every node (see
    `check_storage_reaches_every_node`).

    Worker logs stay in Ray's log files: progress comes through our own queue.
    """
    if address is not None:
        _check_reachable(address)
    if not ray.is_initialized():
        _route_raylet_messages()
        try:
            with warnings.catch_warnings():  # our one line below says it, without Ray's advice
                warnings.filterwarnings("ignore", "Ray Client connection timed out")
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, TimeoutError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserInputError(f"--address {address}: cannot join the cluster "
                                 f"({reason})") from None
    if address is not None and storage is not None:
        check_storage_reaches_every_node(storage)


# Ray's client retries an unreachable `ray://` address for about 40 s; a plain TCP connect
# tells within this many seconds whether anything listens there.
ADDRESS_PROBE_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001


def _check_reachable(address: str) -> None:
    """Fail in seconds on a `ray://host[:port]` or `host:port` where nothing listens
    (`auto` is Ray's to resolve)."""
    target = address.removeprefix("ray://")
    if address == "auto" or "://" in target:
        return
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit():  # no port: the Ray client's default
        if not address.startswith("ray://"):
            raise UserInputError(f"--address {address}: expected auto, ray://HOST[:PORT] "
                                 "or HOST:PORT")
        host, port = target, str(RAY_CLIENT_PORT)
    try:
        socket.create_connection((host.strip("[]"), int(port)),
                                 timeout=ADDRESS_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserInputError(f"--address {address}: nothing answers at {host}:{port} "
                             f"({reason})") from None


# The raylet's warning that a node runs more Python workers than it has CPUs: every category's
# worker group, its controller and our small actors are processes, so a cluster running
# several categories per node passes that mark by design. Nothing a user can act on; it stays
# in the node's raylet.out.
WORKER_POOL_WARNING = "worker processes have been started on node"
# How long the shared-storage check waits for a node's answer (a busy node starts a worker).
SHARED_CHECK_TIMEOUT_S = 60


def _route_raylet_messages() -> None:
    """Ray's driver prints every message the raylet pushes on stdout, whether or not worker
    logs go to the driver (`ray._private.worker.listen_error_messages`); our stdout is for
    results (tables, JSON). Raylet messages go to stderr instead, the worker-pool size warning
    not at all. Ray has no option for this, so its printer is wrapped (looked up at each
    message, hence effective for the listener thread `ray.init` starts)."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "routes_raylet_messages", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            lines = [line for line in data["lines"] if WORKER_POOL_WARNING not in line]
            if not lines:
                return
            data = {**data, "lines": lines, "is_err": True}
        original(data, ignore_prefix)

    print_to_stdstream.routes_raylet_messages = True
    ray_worker.print_to_stdstream = print_to_stdstream


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    """The marker's text as this node's filesystem shows it; None where it is absent."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_storage_reaches_every_node(storage: Storage) -> None:
    """On a joined cluster, a `file://` storage must be one filesystem for every node (NFS, a
    shared volume); on node-local disks each worker would write its checkpoints where no
    other process, the driver included, reads them. A marker written here is read on every
    live node; a node that does not see it refuses the run before anything is written.
    Nodes an autoscaler adds later are not checked."""
    if storage.scheme != "file":
        return
    root = Path(storage.root)
    created = next((p for p in [*reversed(root.parents), root] if not p.exists()), None)
    token = uuid.uuid4().hex
    marker = root / f".memkd-ray-shared-check-{token}"
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
    try:
        nodes = {
            _read_marker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node["NodeID"], soft=False)).remote(str(marker)): node
            for node in ray.nodes() if node["Alive"]
        }
        ready, late = ray.wait(list(nodes), num_returns=len(nodes),
                               timeout=SHARED_CHECK_TIMEOUT_S)
        blind = [nodes[ref] for ref in ready if ray.get(ref) != token]
    finally:
        marker.unlink()
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
    if blind:
        where = ", ".join(f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n in blind)
        raise UserInputError(
            f"--storage {storage.uri}: not visible from {where}: a node-local directory "
            "scatters checkpoints over the nodes; use s3:// or a filesystem every node "
            "mounts at this path")
    if late:
        log.warning("--storage %s: %d node(s) did not answer within %d s; not checked",
                    storage.uri, len(late), SHARED_CHECK_TIMEOUT_S)


def concurrent_categories(cfg: MemKDConfig, joined: bool = False) -> int:
    """How many category worker groups fit in the cluster at once.

    On a joined cluster (`--address`) that holds too little right now, one at a time: an
    autoscaling cluster starts with no GPU nodes and adds them when the trainers ask.
    """
    d = cfg.distributed
    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 0) / (d.workers_per_category * d.cpus_per_worker) + 1e-9)
    if d.gpus_per_worker:
        gpu_need = d.workers_per_category * d.gpus_per_worker
        slots = min(slots, math.floor(total.get("GPU", 0) / gpu_need + 1e-9))
    if slots < 1 and not joined:
        raise UserInputError(f"a category {_needs(cfg)}")
    if d.max_concurrent_categories:
        return d.max_concurrent_categories
    if slots < 1:
        log.info("the cluster has no room for a category yet; waiting for the autoscaler")
        return 1
    return slots


def train_benchmark(
    cfg: MemKDConfig | None,
    categories: list[str],
    storage_uri: str,
    address: str | None = None,
    fault: dict[str, Any] | None = None,
    on_message: Callable[[str], None] | None = None,
    resume_run: str | None = None,
    data_root: str | None = None,
) -> RunSummary:
    """Train `categories` (or `["all"]`) concurrently; write results.parquet; return rows.

    Bad input that concerns the whole run (config, storage, every category's data) raises a
    UserInputError before anything is written. `resume_run` continues a run from its saved
    request and checkpoints (`cfg` and `categories` are then ignored; `data_root`, if given,
    replaces the saved one). `fault` is a test hook passed to the workers.
    """
    storage = open_storage(storage_uri)
    storage.check_writable()
    finished: dict[str, dict] = {}
    if resume_run:
        layout, cfg, categories, finished = _saved_run(storage, resume_run, data_root)
    cfg, names, broken = _check_data(cfg, categories)
    connect(address, storage)
    say = on_message or log.info
    slots = concurrent_categories(cfg, joined=address is not None)
    if not resume_run:
        layout = RunLayout.create(storage)
        spec = {"config": cfg.to_dict(), "categories": names}
        storage.write_bytes(f"{layout.run_dir}/{SPEC_FILE}", json.dumps(spec).encode())
    todo = [name for name in names if name not in broken and name not in finished]
    say(f"run {layout.run_id}: {len(names)} categories, {slots} at a time, "
        f"{cfg.distributed.workers_per_category} workers each -> {storage.uri_for(layout.run_dir)}"
        + (f" (resumed: {len(todo)} to continue)" if resume_run else ""))
    progress = Queue(actor_options={"num_cpus": 0})
    flag = StopFlag.remote()
    stop = threading.Event()
    started = {name: threading.Event() for name in todo}
    printer = threading.Thread(target=_print_progress, args=(progress, stop, say, started),
                               daemon=True)
    printer.start()
    interruption = Interruption()

    def train(name: str) -> dict:
        return _collect(cfg, name, layout, say, interruption, lambda: _train_category(
            cfg, name, layout, progress, flag, fault, started[name], say))

    try:
        with interruption.handlers():
            done = _run_categories(todo, slots, interruption, flag.set.remote, say, train)
    finally:
        stop.set()
        printer.join(timeout=5)
        for actor in (progress.actor, flag):
            ray.kill(actor)
    rows = [finished.get(name) or done.get(name)
            or (_failed_row(cfg, layout, name, broken[name]) if name in broken
                else _interrupted_row(cfg, layout, name))
            for name in names]
    results_uri = write_results(layout, rows)
    return RunSummary(layout.run_id, results_uri, read_results(layout), interruption.signal)


def _saved_run(
    storage: Storage, run_id: str, data_root: str | None
) -> tuple[RunLayout, MemKDConfig, list[str], dict[str, dict]]:
    """The request of a run started earlier and the categories it finished."""
    layout = RunLayout(storage, run_id)
    spec_path = f"{layout.run_dir}/{SPEC_FILE}"
    if not storage.exists(spec_path):
        raise UserInputError(f"--resume {run_id}: no such train run in {storage.uri}")
    spec = json.loads(storage.read_bytes(spec_path))
    cfg = from_dict(spec["config"])
    if data_root:
        cfg = replace(cfg, data=replace(cfg.data, root=data_root))
    finished = {}
    if storage.exists(layout.results_path):
        finished = {row["category"]: row for row in read_results(layout)
                    if row["status"] == "ok"}
    return layout, cfg, list(spec["categories"]), finished


def _run_categories(
    names: list[str], slots: int, interruption: Interruption, stop_workers: Callable[[], Any],
    say: Callable[[str], None], run: Callable[[str], dict],
) -> dict[str, dict]:
    """Run `run(name)` for every name, `slots` at a time, in daemon threads; on a stop request
    start no more, call `stop_workers` and wait at most STOP_GRACE_S (a second signal: not at
    all). Returns the rows of the categories that ended; a thread still running when we stop
    waiting is abandoned (daemon: the process may exit; Ray ends its actors with us)."""
    queue = list(reversed(names))
    rows: dict[str, dict] = {}
    lock = threading.Lock()

    def worker() -> None:
        while not interruption.requested.is_set():
            with lock:
                if not queue:
                    return
                name = queue.pop()
            rows[name] = run(name)

    threads = [threading.Thread(target=worker, name=f"category-{i}", daemon=True)
               for i in range(min(slots, len(names)))]
    for thread in threads:
        thread.start()
    deadline = math.inf
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.2)
        if interruption.requested.is_set() and deadline == math.inf:
            say(f"{interruption.signal}: stopping every category at its next step "
                f"(waiting up to {STOP_GRACE_S:.0f}s; press Ctrl+C again to stop now)")
            stop_workers()
            deadline = time.monotonic() + STOP_GRACE_S
        if interruption.forced.is_set() or time.monotonic() > deadline:
            break
    return dict(rows)


def check_worker_split(cfg: MemKDConfig) -> None:
    """The workers of a category split each global batch evenly: any other split would make
    the batch (and so BatchNorm's statistics and the steps per epoch) depend on their number."""
    workers, batch = cfg.distributed.workers_per_category, cfg.train.batch_size
    if batch % workers:
        raise UserInputError(f"distributed.workers_per_category {workers} must divide "
                             f"train.batch_size {batch}")


def _check_data(
    cfg: MemKDConfig, categories: list[str]
) -> tuple[MemKDConfig, list[str], dict[str, str]]:
    """Read every category where this machine sees the data: broken ones fail alone, before
    any worker starts; if all are broken the run stops here."""
    if not cfg.data.root:
        raise UserInputError("data.root is not set (pass --data-root)")
    check_teacher(cfg.teacher.name, cfg.teacher.weights)  # here, not in every worker
    check_worker_split(cfg)
    # Category names become storage paths (runs/<id>/<benchmark>/<category>, registry/...).
    for name in [*categories, *cfg.data.categories]:
        plain_name("category", name)
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        if categories == ["all"] and not cfg.data.categories:
            raise DataError(f"{root}: data root not found")
        log.info("%s is not visible here: the workers read it on their nodes", root)
        names = categories if categories != ["all"] else cfg.data.categories
        return cfg, names, {}
    # Workers may start in another directory: ship an absolute data root.
    cfg = replace(cfg, data=replace(cfg.data, root=str(root.resolve())))
    names = resolve_categories(cfg.data.benchmark, root, categories, cfg.data.categories)
    broken = {}
    for name in names:
        try:
            read_configured_category(cfg.data, name, decode=True)
        except DataError as exc:
            broken[name] = str(exc)
    if len(broken) == len(names):
        raise DataError(broken[names[0]])
    return cfg, names, broken


def worker_group_configs(cfg: MemKDConfig) -> tuple[ScalingConfig, FailureConfig]:
    """A category's worker group as Ray Train wants it (`train` and every `tune` trial)."""
    d = cfg.distributed
    resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker
                                               else {})}
    if d.placement_timeout_s:
        # Ray Train reads its worker-group start timeout from the environment of the process
        # calling fit(); with no controller retries, running out of it fails the category.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{d.placement_timeout_s:g}"
    return (
        ScalingConfig(num_workers=d.workers_per_category, use_gpu=d.gpus_per_worker > 0,
                      resources_per_worker=resources),
        FailureConfig(max_failures=d.max_failures,
                      controller_failure_limit=0 if d.placement_timeout_s else -1),
    )


def _train_category(
    cfg: MemKDConfig, category: str, layout: RunLayout, progress: Queue, flag: Any,
    fault: dict[str, Any] | None, started: threading.Event, say: Callable[[str], None],
) -> dict:
    d = cfg.distributed
    scaling, failure = worker_group_configs(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "category": category, "progress": progress,
                           "stop_flag": flag, "fault": fault},
        scaling_config=scaling,
        run_config=RunConfig(
            name=category,
            storage_path=layout.benchmark_dir(cfg.data.benchmark),
            storage_filesystem=layout.storage.filesystem,
            failure_config=failure,
            checkpoint_config=CheckpointConfig(num_to_keep=d.checkpoints_to_keep),
        ),
    )
    began = time.perf_counter()
    notice = threading.Timer(WAIT_NOTICE_S, lambda: started.is_set() or say(
        f"{category}: waiting for resources: {_needs(cfg)}"))
    notice.daemon = True
    notice.start()
    try:
        result = trainer.fit()
    except ray.train.ControllerError:
        if started.is_set():
            raise
        raise PlacementError(f"no room in the cluster after {d.placement_timeout_s:g} s "
                             f"(distributed.placement_timeout_s): {_needs(cfg)}") from None
    finally:
        notice.cancel()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    return {
        **_base_row(cfg, layout, category),
        "status": "interrupted" if result.return_value == STOPPED else "ok",
        "error": "",
        **{key: float(metrics.get(key, math.nan)) for key in METRIC_KEYS},
        "epochs": int(metrics.get("epoch", 0)),
        "workers": int(metrics.get("workers", 0)),
        "wall_seconds": time.perf_counter() - began,
        "checkpoint_uri": (layout.storage.uri_for(result.checkpoint.path)
                           if result.checkpoint else ""),
    }


def _needs(cfg: MemKDConfig) -> str:
    """What a category's worker group asks for and what the cluster has, for the console."""
    d = cfg.distributed
    total, free = ray.cluster_resources(), ray.available_resources()
    gpus = f" x {d.gpus_per_worker:g} GPU" if d.gpus_per_worker else ""
    return (f"needs {d.workers_per_category} workers x {d.cpus_per_worker:g} CPU{gpus}; the "
            f"cluster has {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU "
            f"({free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU free)")


def _collect(cfg: MemKDConfig, category: str, layout: RunLayout, say: Callable[[str], None],
             interruption: Interruption, train: Callable[[], dict]) -> dict:
    try:
        row = train()
    except Exception as exc:
        if interruption.requested.is_set():
            return _interrupted_row(cfg, layout, category)
        reason = one_line_reason(exc)
        say(f"{category}: FAILED: {reason}")
        return _failed_row(cfg, layout, category, reason)
    if row["status"] == "interrupted":
        say(f"{category}: stopped after epoch {row['epochs']}")
    else:
        say(f"{category}: done in {row['wall_seconds']:.0f}s, I-AUROC {row['image_auroc']:.3f}")
    return row


def _base_row(cfg: MemKDConfig, layout: RunLayout, category: str) -> dict:
    return {"run_id": layout.run_id, "benchmark": cfg.data.benchmark, "category": category,
            "config_hash": cfg.hash()}


def _failed_row(cfg: MemKDConfig, layout: RunLayout, category: str, reason: str,
                status: str = "failed") -> dict:
    return {**_base_row(cfg, layout, category), "status": status, "error": reason,
            **dict.fromkeys(METRIC_KEYS, math.nan), "epochs": 0, "workers": 0,
            "wall_seconds": 0.0,
            "checkpoint_uri": ""}


def _interrupted_row(cfg: MemKDConfig, layout: RunLayout, category: str) -> dict:
    return _failed_row(cfg, layout, category, "", status="interrupted")


def one_line_reason(exc: BaseException) -> str:
    """The innermost error's `Type: message` line, not Ray's wall of tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def _print_progress(queue: Queue, stop: threading.Event, say: Callable[[str], None],
                    started: dict[str, threading.Event]) -> None:
    while True:
        try:
            if stop.is_set() and queue.empty():
                return
            message = queue.get(timeout=0.5)
        except Empty:
            continue
        except ray.exceptions.RayError as exc:
            # The queue's actor died (its node was lost): only the console lines are lost;
            # results come through Ray Train. No category is left looking unplaced.
            say(f"progress lines lost ({type(exc).__name__}); training goes on, results at "
                "the end")
            for event in started.values():
                event.set()
            return
        category = message["category"]
        if message["event"] == "started":
            started[category].set()
        elif message["event"] == "resumed":
            say(f"{category}: resumed from the checkpoint of epoch {message['epoch']}")
        else:
            say(format_epoch(category, message))
