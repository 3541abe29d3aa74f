"""Every use of a Ray internal, each guarded by the Ray versions it was written and tested for.

Ray's public API has no switch for these behaviours, so each reaches into Ray's own modules.
Outside the tested versions (pyproject.toml pins the same range) each refuses with one line
instead of misbehaving silently: a Ray upgrade shows up as a clear error naming the internal.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from memkd_ray.errors import UserInputError

TESTED_RAY = SpecifierSet(">=2.60,<2.61")
"""The Ray versions the internals below were written and tested for."""

# The raylet's warning that a node runs more Python workers than it has CPUs: every category's
# worker group, its controller and our small actors are processes, so a cluster running
# several categories per node passes that mark by design. Nothing a user can act on; it stays
# in the node's raylet.out.
WORKER_POOL_WARNING = "worker processes have been started on node"
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
CREDENTIAL_VARIABLES = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


class RayVersionError(UserInputError):
    """The installed Ray is outside the versions an internal was tested with."""


def check_ray_version(what: str = "use of Ray internals") -> None:
    """Refuse, in one line, a Ray outside the tested versions; `connect` calls it before a run
    writes anything, and every internal below before it is used."""
    installed = Version(ray.__version__)
    if installed not in TESTED_RAY:
        raise RayVersionError(
            f"ray {installed}: memkd-ray's {what} relies on Ray internals tested with ray "
            f"{TESTED_RAY}; install that (pip install 'ray[default,train,tune]{TESTED_RAY}')")


def _internal(what: str, module: str, attribute: str) -> Any:
    """Ray's `module`, which must hold `attribute`, if this Ray is one `what` was tested with."""
    check_ray_version(what)
    target = importlib.import_module(module)
    if not hasattr(target, attribute):
        raise RayVersionError(f"ray {ray.__version__}: {module}.{attribute} is gone; "
                              f"memkd-ray's {what} needs ray {TESTED_RAY}")
    return target


def route_raylet_messages() -> None:
    """Ray's driver prints every message the raylet pushes on stdout, whether or not worker
    logs go to the driver (`ray._private.worker.listen_error_messages`); our stdout is for
    results (tables, JSON). Raylet messages go to stderr instead, the worker-pool size warning
    not at all. Ray's printer is wrapped (it is looked up at each message, hence effective
    for the listener thread `ray.init` starts)."""
    worker = _internal("console routing", "ray._private.worker", "print_to_stdstream")
    original = worker.print_to_stdstream
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
    worker.print_to_stdstream = print_to_stdstream


def quiet_local_token_notice() -> None:
    """Every local `ray.init` logs "Token authentication is enabled for this Ray cluster..."
    (ray._private.authentication): advice for a cluster's operator, not for a command that
    starts its own single-machine cluster and stops it at the end. Joined clusters keep it."""
    setup = _internal("local console", "ray._private.authentication."
                      "authentication_token_setup", "logger")
    setup.logger.setLevel(logging.ERROR)


def keep_credentials_out_of_trials() -> None:
    """Ray Tune copies the driver's AWS key variables into every trainable's `runtime_env`
    (`ray.tune.execution.class_cache`), which Ray keeps and its runtime-env agent logs in clear
    text. Every process here finds credentials itself (storage/s3.py), so they are dropped."""
    cache = _internal("credential hygiene", "ray.tune.execution.class_cache",
                      "ENV_VARS_TO_PROPAGATE")
    cache.ENV_VARS_TO_PROPAGATE = cache.ENV_VARS_TO_PROPAGATE - CREDENTIAL_VARIABLES


@contextmanager
def worker_group_start_timeout(seconds: float) -> Iterator[None]:
    """Ray Train gives up starting a worker group after the timeout it reads from the
    environment of the process calling `fit()` (propagated to its controller, and by Tune to
    trials); 0 leaves Ray's default. Set for the duration of the block only: the caller's
    environment is restored afterwards."""
    _internal("placement timeout", "ray.train.v2._internal.constants",
              "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR")
    previous = os.environ.get(WORKER_GROUP_START_TIMEOUT)
    if seconds:
        os.environ[WORKER_GROUP_START_TIMEOUT] = f"{seconds:g}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(WORKER_GROUP_START_TIMEOUT, None)
        else:
            os.environ[WORKER_GROUP_START_TIMEOUT] = previous


@contextmanager
def sigterm_stops_tune() -> Iterator[None]:
    """Ray Tune saves its state and stops on SIGINT or SIGUSR1 (handlers it installs in the
    main thread, ray/tune/tune.py); SIGTERM (`kill`, a batch scheduler, Kubernetes) is made to
    do the same instead of killing the driver with the search state unsaved."""
    _internal("SIGTERM handling of tune", "ray.tune.tune", "run")
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
