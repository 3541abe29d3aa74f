"""`memkd-ray serve`: the registry's best model of every category behind one Ray Serve app.

One deployment, `ModelServer` (`replicas` replicas), does the whole request: routes, the bearer
token, image checks, the model, the decision and the identity of every answer. Models are
loaded on first use through Serve's model multiplexing (at most `models_per_replica` per
replica, least recently used unloaded first) and score concurrent requests in dynamic batches.
It is one deployment, not an HTTP gateway in front of a model pool, because on CPU every hop
between Ray processes costs time the model needs: folding the gateway in took served ONNX on
2 cores from 44 to 50 requests a second.

Every replica reads the registry at start and every `refresh_s`; when a category's best model
moves, it loads (and so verifies) the new one before switching, so no request fails during
the switch and a model whose files fail verification is never served (the old one stays, the
error is logged). With the ONNX backend it exports every served checkpoint in the background
from its start (once per checkpoint, kept in the local cache), so that loading on first use
is quick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from memkd_ray.checkpoint_format import META_FILE, checkpoint_decision, parse_checkpoint_meta
from memkd_ray.distributed.console import one_line_reason
from memkd_ray.serving.requests import (
    MAX_BODY_BYTES,
    RequestError,
    Served,
    check_token,
    map_png,
    request_image,
    score_answer,
    score_route,
)
from memkd_ray.storage import open_storage
from memkd_ray.storage.registry import Registry

log = logging.getLogger("memkd_ray.serve")
APP_NAME = "memkd-ray"
GRACE_S = 5.0
"""How long a replica being replaced or stopped may finish its requests (single images)."""
MAX_ONGOING_REQUESTS = 256
"""Requests a replica accepts at once: most wait a few milliseconds for their batch, and a bad
request or a health probe must never queue behind them."""


@dataclass(frozen=True)
class ServeOptions:
    storage: str
    benchmark: str | None = None
    categories: tuple[str, ...] = ()
    backend: str = "onnx"
    replicas: int = 1
    cpus_per_replica: float = 1.0
    models_per_replica: int = 4
    max_batch_size: int = 8
    batch_wait_s: float = 0.005
    concurrent_batches: int = 2
    """Batches a replica scores at once, each on `threads_per_batch` threads: on CPU two
    single-threaded ONNX Runtime calls side by side do more per second than one call on two
    threads (the runtime's default), and a batch never waits for the one before."""
    threads_per_batch: int = 1
    refresh_s: float = 10.0
    token_env: str | None = None
    """Name of the environment variable holding the bearer token (never the token itself:
    deployment arguments are stored by Ray)."""


def registered_models(options: ServeOptions, known: dict[tuple[str, str], Served] | None = None
                      ) -> dict[tuple[str, str], Served]:
    """The registry's best model of every selected category, with its decision and size.
    Entries of `known` whose checkpoint is still the best are kept as they are: a refresh
    reads the cards, and a checkpoint.json only for a category whose best model moved."""
    registry = Registry(open_storage(options.storage))
    served = {}
    for card in registry.list(options.benchmark):
        if options.categories and card["category"] not in options.categories:
            continue
        key = (card["benchmark"], card["category"])
        if known and key in known and known[key].checkpoint_uri == card["checkpoint_uri"]:
            served[key] = known[key]
            continue
        base = registry.storage.path_of(card["checkpoint_uri"])
        where = f"{card['checkpoint_uri']}/{META_FILE}"
        meta = parse_checkpoint_meta(registry.read(f"{base}/{META_FILE}"), where)
        identity = {"benchmark": card["benchmark"], "category": card["category"],
                    "run_id": card["run_id"], "epoch": card["epoch"], "sha256": card["sha256"]}
        served[key] = Served(
            card["checkpoint_uri"], identity, checkpoint_decision(meta, where),
            int(meta["config"]["data"]["image_size"]))
    return served


def build_application(options: ServeOptions) -> Any:
    """The Serve application (one bound deployment) for `options`."""

    @serve.deployment(name="ModelServer", num_replicas=options.replicas,
                      max_ongoing_requests=MAX_ONGOING_REQUESTS,
                      graceful_shutdown_timeout_s=GRACE_S,
                      ray_actor_options={"num_cpus": options.cpus_per_replica})
    class ModelServer:
        def __init__(self) -> None:
            from memkd_ray.storage.registry import cache_root

            self.token = None
            if options.token_env:
                self.token = os.environ.get(options.token_env)
                if not self.token:
                    raise RuntimeError(f"{options.token_env} is not set on this node")
            self.served = registered_models(options)
            self.cache = cache_root()
            self.following: asyncio.Task | None = None
            if options.backend == "onnx":
                # Exports take seconds per model: made in the background from the start, so
                # that a category's first request finds its export ready.
                threading.Thread(target=self._prepare_exports,
                                 args=(list(self.served.values()),), daemon=True).start()

        async def __call__(self, request: Request) -> Response:
            if self.following is None:
                self.following = asyncio.get_running_loop().create_task(self._follow())
            try:
                return await self._answer(request)
            except RequestError as exc:
                return JSONResponse({"error": exc.reason}, exc.status)
            except Exception as exc:  # a model that failed to load or score: 503, go on
                reason = one_line_reason(exc)
                log.error("%s %s: %s", request.method, request.url.path, reason)
                return JSONResponse({"error": reason}, 503)

        async def _answer(self, request: Request) -> Response:
            path = request.url.path
            if path == "/healthz":
                return JSONResponse({"status": "ok", "models": len(self.served)})
            check_token(request.headers.get("authorization"), self.token)
            if path == "/v1/models":
                _method(request, "GET")
                return JSONResponse({"models": [s.describe() for _, s in
                                                sorted(self.served.items())]})
            key = score_route(path)
            _method(request, "POST")
            served = self.served.get(key)
            if served is None:
                raise RequestError(404, f"{key[0]}/{key[1]}: no model served under that "
                                        f"name ({len(self.served)} served: GET /v1/models)")
            want_map = _map_wanted(request)
            body = await _read_body(request)
            pixels = await asyncio.to_thread(request_image, body,
                                             request.headers.get("content-type"),
                                             served.image_size)
            score, anomaly_map, failure = await self._batched(
                (served.checkpoint_uri, pixels, want_map))
            if failure:
                raise RuntimeError(failure)
            answer = score_answer(score, served)
            if want_map:
                headers = {"X-Score": repr(answer["score"]),
                           "X-Anomalous": str(answer["anomalous"]).lower()}
                return Response(map_png(anomaly_map, served.decision), 200, headers,
                                media_type="image/png")
            return JSONResponse(answer)

        @serve.multiplexed(max_num_models_per_replica=options.models_per_replica)
        async def model(self, checkpoint_uri: str) -> Any:
            return await asyncio.to_thread(self._load, checkpoint_uri)

        def _load(self, checkpoint_uri: str) -> Any:
            from memkd_ray.serving.models import load_served_model
            from memkd_ray.storage.registry import fetch_checkpoint

            directory = fetch_checkpoint(checkpoint_uri, options.storage)  # sha256 checked
            return load_served_model(directory, options.backend, self.cache,
                                     options.threads_per_batch)

        @serve.batch(max_batch_size=options.max_batch_size,
                     batch_wait_timeout_s=options.batch_wait_s,
                     max_concurrent_batches=options.concurrent_batches)
        async def _batched(self, items: list[tuple[str, np.ndarray, bool]]
                           ) -> list[tuple[float, Any, str]]:
            # A batch may mix categories: one forward pass per model, and a model that fails
            # to load fails its own requests only.
            by_model: dict[str, list[int]] = defaultdict(list)
            for index, (uri, _, _) in enumerate(items):
                by_model[uri].append(index)
            answers: list[tuple[float, Any, str]] = [(math.nan, None, "")] * len(items)
            for uri, indices in by_model.items():
                try:
                    model = await self.model(uri)
                    images = np.stack([items[i][1] for i in indices])
                    maps, scores = await asyncio.to_thread(model.score, images)
                except Exception as exc:
                    for i in indices:
                        answers[i] = (math.nan, None, one_line_reason(exc))
                    continue
                for row, i in enumerate(indices):
                    answers[i] = (float(scores[row]), maps[row] if items[i][2] else None, "")
            return answers

        def _prepare_exports(self, models: list[Served]) -> None:
            from memkd_ray.serving.models import onnx_export
            from memkd_ray.storage.registry import fetch_checkpoint

            for served in models:
                try:
                    onnx_export(fetch_checkpoint(served.checkpoint_uri, options.storage),
                                self.cache)
                except Exception as exc:  # reported again, to the request, if it is asked for
                    log.error("%s: not exported ahead (%s)", served.checkpoint_uri,
                              one_line_reason(exc))

        async def _follow(self) -> None:
            """Every `refresh_s`: switch each category whose best model moved, once this
            replica has loaded (and so verified) the new one."""
            while True:
                await asyncio.sleep(options.refresh_s)
                try:
                    latest = await asyncio.to_thread(registered_models, options, self.served)
                except Exception as exc:  # the store unreachable for a while: keep serving
                    log.error("registry not read: %s", one_line_reason(exc))
                    continue
                for key, candidate in latest.items():
                    current = self.served.get(key)
                    if current is not None and current.checkpoint_uri == candidate.checkpoint_uri:
                        continue
                    try:
                        await self.model(candidate.checkpoint_uri)
                    except Exception as exc:
                        log.error("%s/%s: the new best model %s is not served (%s)", *key,
                                  candidate.checkpoint_uri, one_line_reason(exc))
                        continue
                    log.info("%s/%s: now serving run %s", *key, candidate.identity["run_id"])
                    self.served[key] = candidate

    return ModelServer.bind()


def app_builder(args: dict[str, Any]) -> Any:
    """The application from a Serve config's `args` (a KubeRay RayService, `serve run`): the
    fields of ServeOptions, `categories` as a list."""
    return build_application(ServeOptions(**{**args,
                                             "categories": tuple(args.get("categories", ()))}))


def _method(request: Request, wanted: str) -> None:
    if request.method != wanted:
        raise RequestError(405, f"{request.method} {request.url.path}: use {wanted}")


def _map_wanted(request: Request) -> bool:
    value = request.query_params.get("map")
    if value not in (None, "png"):
        raise RequestError(400, f"map={value[:40]!r}: the only map format is png")
    return value == "png"


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it is known to exceed MAX_BODY_BYTES."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"body of {declared} bytes: at most {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def start_service(options: ServeOptions, host: str, port: int) -> None:
    """Deploy the application on the connected Ray cluster, listening on host:port; returns
    once every replica is up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(options), name=APP_NAME, route_prefix="/")


def stop_service(joined: bool) -> None:
    """On a cluster this process joined, delete the application (Serve itself stays for the
    cluster's other applications); a local Ray started for the service goes down whole, which
    is much quicker than Serve's own shutdown."""
    import ray

    if joined:
        serve.delete(APP_NAME)
    else:
        ray.shutdown()
