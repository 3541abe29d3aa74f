"""The Ray cluster a run uses: joining or starting it, what it holds, and whether a storage root
is one filesystem for all its nodes."""

from __future__ import annotations

import logging
import math
import re
import shutil
import socket
import uuid
import warnings
from pathlib import Path

import ray
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from memkd_ray.config import DistributedConfig
from memkd_ray.distributed.ray_compat import (
    check_ray_version,
    quiet_local_token_notice,
    route_raylet_messages,
)
from memkd_ray.errors import UserInputError
from memkd_ray.storage import Storage

log = logging.getLogger(__name__)

# Ray's client retries an unreachable `ray://` address for about 40 s; a plain TCP connect
# tells within this many seconds whether anything listens there.
ADDRESS_PROBE_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001
# How long the shared-storage check waits for a node's answer (a busy node starts a worker).
SHARED_CHECK_TIMEOUT_S = 60


def shown(address: str) -> str:
    """`address` as printed: a password in it (`ray://user:pw@host`) is never shown."""
    return re.sub(r"//[^/@]*@", "//***@", address)


def connect(address: str | None = None, storage: Storage | None = None) -> None:
    """Join a cluster (`auto`, `ray://...`, `host:port`) or start a local one (no address).
    Joined, a node-local `storage` must be one filesystem for every node (see
    `check_storage_reaches_every_node`).

    Worker logs stay in Ray's log files: progress comes through our own queue.
    """
    check_ray_version()
    if address is not None:
        _check_reachable(address)
    if not ray.is_initialized():
        route_raylet_messages()
        if address is None:
            quiet_local_token_notice()
        try:
            with warnings.catch_warnings():  # our one line below says it, without Ray's advice
                warnings.filterwarnings("ignore", "Ray Client connection timed out")
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, TimeoutError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserInputError(f"--address {shown(address)}: cannot join the cluster "
                                 f"({reason})") from None
    if address is not None and storage is not None:
        check_storage_reaches_every_node(storage)


def _check_reachable(address: str) -> None:
    """Fail in seconds on a `ray://host[:port]` or `host:port` where nothing listens
    (`auto` is Ray's to resolve)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://").rpartition("@")[2]
    host, colon, port = target.rpartition(":")
    if ("://" in address and not address.startswith("ray://")) or "/" in target or not (
            host or address.startswith("ray://")):
        raise UserInputError(f"--address {shown(address)}: expected auto, ray://HOST[:PORT] "
                             "or HOST:PORT")
    if not colon or not port.isdigit():  # no port: the Ray client's default
        if not address.startswith("ray://"):
            raise UserInputError(f"--address {shown(address)}: expected auto, ray://HOST[:PORT] "
                                 "or HOST:PORT")
        host, port = target, str(RAY_CLIENT_PORT)
    try:
        socket.create_connection((host.strip("[]"), int(port)),
                                 timeout=ADDRESS_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserInputError(f"--address {shown(address)}: nothing answers at {host}:{port} "
                             f"({reason})") from None


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    """The marker's text as this node's filesystem shows it; None where it is absent."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_storage_reaches_every_node(storage: Storage) -> None:
    """On a joined cluster, a node-local storage (a directory) must be one filesystem for
    every node (NFS, a shared volume); on node-local disks each worker would write its
    checkpoints where no other process, the driver included, reads them. A marker written here
    is read on every live node; a node that does not see it refuses the run before anything is
    written. Nodes an autoscaler adds later are not checked."""
    if not storage.node_local:
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


def worker_resources(d: DistributedConfig) -> dict[str, float]:
    """What each worker of a category's group asks Ray for."""
    return {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker
                                         else {})}


def concurrent_categories(d: DistributedConfig, joined: bool = False) -> int:
    """How many category worker groups fit in the cluster at once.

    On a joined cluster (`--address`) that holds too little right now, one at a time: an
    autoscaling cluster starts with no GPU nodes and adds them when the trainers ask.
    """
    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 0) / (d.workers_per_category * d.cpus_per_worker) + 1e-9)
    if d.gpus_per_worker:
        gpu_need = d.workers_per_category * d.gpus_per_worker
        slots = min(slots, math.floor(total.get("GPU", 0) / gpu_need + 1e-9))
    if slots < 1 and not joined:
        raise UserInputError(f"a category {needs(d)}")
    if d.max_concurrent_categories:
        return d.max_concurrent_categories
    if slots < 1:
        log.info("the cluster has no room for a category yet; waiting for the autoscaler")
        return 1
    return slots


def needs(d: DistributedConfig) -> str:
    """What a category's worker group asks for and what the cluster has, for the console."""
    total, free = ray.cluster_resources(), ray.available_resources()
    gpus = f" x {d.gpus_per_worker:g} GPU" if d.gpus_per_worker else ""
    return (f"needs {d.workers_per_category} workers x {d.cpus_per_worker:g} CPU{gpus}; the "
            f"cluster has {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU "
            f"({free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU free)")


def pending_worker_groups(d: DistributedConfig) -> int:
    """How many placement groups of a category's shape Ray has not been able to place yet:
    worker groups waiting for resources, not ones placed whose workers are starting."""
    bundle = worker_resources(d)
    return sum(
        1 for group in placement_group_table().values()
        if group["state"] in ("PENDING", "RESCHEDULING")
        and len(group["bundles"]) == d.workers_per_category
        and all(b == bundle for b in group["bundles"].values()))
