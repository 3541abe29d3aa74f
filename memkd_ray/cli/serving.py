"""`memkd-ray serve`: checks everything it can before Ray starts, then serves until Ctrl+C."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import signal
import sys
import time

from memkd_ray.errors import UserInputError


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
        stop_service(joined=args.address is not None)
    return 0
