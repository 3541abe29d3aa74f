"""`memkd-ray serve`: checks everything it can before Ray starts, then serves until Ctrl+C."""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from memkd_ray.errors import UserInputError

# Stopping takes seconds; it has hung past two minutes inside Ray's shutdown on a loaded
# machine. After this long the process ends anyway: a local Ray's processes share its fate.
STOP_TIMEOUT_S = 30.0


def serve(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("ray.serve") is None or importlib.util.find_spec(
            "starlette") is None:
        raise UserInputError("serve needs Ray Serve: pip install 'memkd-ray[serve]'")
    if args.backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise UserInputError("--backend onnx needs onnxruntime: pip install "
                             "'memkd-ray[export]' (or --backend torch)")
    _check_options(args)
    if args.address is None:
        # Before anything imports Ray Serve, which reads them once (so does every process
        # of the local Ray started below).
        from memkd_ray.serving.environment import use_throughput_settings

        use_throughput_settings()
    from memkd_ray.serving.app import ServeOptions, registered_models

    options = ServeOptions(
        storage=args.storage, benchmark=args.benchmark, categories=tuple(args.category),
        backend=args.backend, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
        models_per_replica=args.models_per_replica, max_batch_size=args.max_batch,
        refresh_s=args.refresh, token_env=args.token_env)
    served = registered_models(options)
    if not served:
        selection = " ".join(filter(None, [args.benchmark, *args.category])) or "any category"
        raise UserInputError(f"{args.storage}: no model registered for {selection} "
                             "(memkd-ray models list)")
    return _run(options, args, len(served))


def _check_options(args: argparse.Namespace) -> None:
    checks = [
        (1 <= args.port <= 65535, f"--port {args.port}: must be 1 to 65535"),
        (args.replicas >= 1, f"--replicas {args.replicas}: must be at least 1"),
        (math.isfinite(args.cpus_per_replica) and args.cpus_per_replica >= 0,
         f"--cpus-per-replica {args.cpus_per_replica}: must be a number >= 0"),
        (args.models_per_replica >= 1,
         f"--models-per-replica {args.models_per_replica}: must be at least 1"),
        (args.max_batch >= 1, f"--max-batch {args.max_batch}: must be at least 1"),
        (math.isfinite(args.refresh) and args.refresh >= 1,
         f"--refresh {args.refresh}: must be at least 1 second"),
        (not args.token_env or bool(os.environ.get(args.token_env)),
         f"--token-env {args.token_env}: the variable is not set"),
    ]
    for ok, reason in checks:
        if not ok:
            raise UserInputError(reason)


def _run(options: object, args: argparse.Namespace, count: int) -> int:
    from memkd_ray.distributed.cluster import connect
    from memkd_ray.serving.app import start_service, stop_service

    connect(args.address)
    # SIGTERM (a container stopping) ends the service like Ctrl+C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Serve's own INFO lines (started, deploying, ready) say less than the one line below.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        start_service(options, args.host, args.port)
        print(f"serving {count} model(s) from {args.storage} at http://{args.host}:{args.port} "
              f"(backend {args.backend}); Ctrl+C stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("memkd-ray: stopping the service", file=sys.stderr, flush=True)
    finally:
        joined = args.address is not None
        stop_within(lambda: stop_service(joined=joined), STOP_TIMEOUT_S, joined)
    return 0


def stop_within(stop: Callable[[], None], timeout_s: float, joined: bool) -> None:
    """Run `stop`; should the process not have ended `timeout_s` later (in `stop` or in the
    interpreter's exit after it), end it from a watchdog thread: exit 0, or 1 when `stop` did
    not finish on a joined cluster, where the application may be left running."""
    stopped = threading.Event()

    def end_now() -> None:
        left = joined and not stopped.is_set()
        what = ("the application may still run on the cluster: serve shutdown removes it"
                if left else "what it started ends with it")
        print(f"memkd-ray: the service did not stop within {timeout_s:g} s; exiting ({what}). "
              "Where it waited, for a bug report:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(sys.stderr)
        os._exit(1 if left else 0)

    watchdog = threading.Timer(timeout_s, end_now)
    watchdog.daemon = True
    watchdog.start()
    stop()
    stopped.set()
