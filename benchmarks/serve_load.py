"""Load on `memkd-ray serve` over loopback, next to ONNX Runtime in-process on the same model.

Builds a store of `--categories` registered models (the offline EfficientNet-Lite0 teacher with
the paper's student, `configs/offline.yaml` at `--size` px; untrained weights, since time does
not depend on them), serves it on a local Ray with each backend, and drives it with concurrent
HTTP clients (one PNG per request, categories interleaved), bounded in requests and in time.
Prints per run: requests, failures, throughput, p50/p95/p99 latency, and the bad requests (an
unknown category, not an image, truncated, a decompression bomb, a wrong content type) sent
meanwhile, five a second on their own connection; the first request of every
category (cold: the model is loaded, for ONNX exported once per checkpoint then cached); and
the in-process ONNX Runtime throughput of the same export (one session, one image per call).

    python benchmarks/serve_load.py                          # both backends, 1 and 5 categories
    python benchmarks/serve_load.py --backends onnx --requests 10000 --loads 5x8 --limit-s 900
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from speed import describe_device

from memkd_ray.checkpoint import save_checkpoint
from memkd_ray.config import load_config
from memkd_ray.decision import calibrate
from memkd_ray.model import create_memkd
from memkd_ray.serving.models import load_served_model
from memkd_ray.storage import open_storage
from memkd_ray.storage.registry import Registry, cache_root

ROOT = Path(__file__).resolve().parent.parent


def build_store(store: Path, categories: int, size: int) -> list[str]:
    cfg = load_config(ROOT / "configs" / "offline.yaml", [f"data.image_size={size}",
                                                          "data.benchmark=folder"])
    registry = Registry(open_storage(f"file://{store}"))
    names = [f"part{i}" for i in range(categories)]
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = create_memkd(cfg).eval()
        directory = store / "runs" / "bench" / "folder" / name / "checkpoint_epoch_0001"
        save_checkpoint(directory, model, cfg, 1, {"image_auroc": 0.9}, category=name,
                        decision=calibrate([1.0, 1.1, 0.9, 1.05, 0.95], 0.01))
        registry.promote(f"file://{directory}")
    return names


def test_images(size: int, count: int = 16) -> list[bytes]:
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("flower.jpg")
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        y, x = rng.integers(0, photo.shape[0] - 300), rng.integers(0, photo.shape[1] - 300)
        buffer = io.BytesIO()
        Image.fromarray(photo[y:y + 300, x:x + 300]).resize((size, size)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def post(url: str, body: bytes) -> tuple[int, float]:
    """One request on a new connection (a cold category's first request)."""
    started = time.perf_counter()
    request = urllib.request.Request(url, body, {"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.perf_counter() - started


class Client:
    """One keep-alive HTTP connection, as a line PC's client would hold."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, path: str, body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        try:
            self.connection.request("POST", path, body, {"Content-Type": "image/png"})
            answer = self.connection.getresponse()
            answer.read()
            status = answer.status
        except (OSError, http.client.HTTPException):
            self.connection.close()
            status = 0
        return status, time.perf_counter() - started


def drive(base: str, names: list[str], images: list[bytes], clients: int, requests: int,
          limit_s: float) -> dict[str, float]:
    latencies: list[float] = []
    failures = [0]
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + limit_s

    def client() -> None:
        connection = Client(base)
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            status, seconds = connection.post(f"/v1/score/folder/{names[index % len(names)]}",
                                              images[index % len(images)])
            with lock:
                latencies.append(seconds)
                failures[0] += status != 200

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "failures": failures[0], "per_s": len(latencies) / wall,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99))}


def bad_requests(size: int) -> list[tuple[str, bytes, str]]:
    """(path suffix, body, content type) of requests the service must refuse with a 4xx."""
    good = test_images(size, 1)[0]
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    header = bytearray(bomb.getvalue())
    header[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width and height
    crc = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    header[29:33] = crc
    return [("nope/part0", good, "image/png"), ("folder/nope", good, "image/png"),
            ("folder/part0", b"not an image", "image/png"),
            ("folder/part0", good[: len(good) // 2], "image/png"),
            ("folder/part0", bytes(header), "image/png"),
            ("folder/part0", good, "text/plain")]


def probe_bad_requests(base: str, size: int, stop: threading.Event,
                       seen: list[tuple[int, float]]) -> None:
    """While a load runs: the bad requests, one every 0.2 s, their status and seconds."""
    client = Client(base)
    cases = bad_requests(size)
    index = 0
    while not stop.is_set():
        path, body, content_type = cases[index % len(cases)]
        started = time.perf_counter()
        try:
            client.connection.request("POST", f"/v1/score/{path}", body,
                                      {"Content-Type": content_type})
            answer = client.connection.getresponse()
            answer.read()
            seen.append((answer.status, time.perf_counter() - started))
        except (OSError, http.client.HTTPException):
            client.connection.close()
            seen.append((0, time.perf_counter() - started))
        index += 1
        time.sleep(0.2)


def in_process_onnx(store: Path, name: str, images: list[bytes], size: int,
                    seconds: float) -> float:
    """Images per second of the same export scored in this process, one image per call."""
    directory = store / "runs" / "bench" / "folder" / name / "checkpoint_epoch_0001"
    served = load_served_model(directory, "onnx", cache_root())
    decoded = [np.array(Image.open(io.BytesIO(b)).convert("RGB"))[None] for b in images]
    served.score(decoded[0])
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        served.score(decoded[count % len(decoded)])
        count += 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["onnx", "torch"])
    parser.add_argument("--categories", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--loads", nargs="+", default=["1x4", "1x8", "5x4", "5x8"],
                        metavar="CATEGORIESxCLIENTS", help="load runs, e.g. 5x8: 5 categories "
                        "interleaved, 8 concurrent clients")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--limit-s", type=float, default=120.0, help="per load run")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--default-serve-settings", action="store_true",
                        help="Ray Serve's default settings instead of its throughput mode")
    args = parser.parse_args()

    from memkd_ray.serving.environment import use_throughput_settings

    if not args.default_serve_settings:
        use_throughput_settings()  # as `memkd-ray serve` does for the Ray it starts

    import ray

    from memkd_ray.serving.app import ServeOptions, start_service, stop_service

    print(f"machine: {describe_device(torch.device('cpu'))}; Ray Serve "
          f"{'default settings' if args.default_serve_settings else 'throughput mode'}")
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        names = build_store(store, args.categories, args.size)
        images = test_images(args.size)
        base = f"http://127.0.0.1:{args.port}"
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False, configure_logging=False)
        try:
            for backend in args.backends:
                options = ServeOptions(f"file://{store}", backend=backend,
                                       replicas=args.replicas, cpus_per_replica=1.0,
                                       models_per_replica=args.categories)
                for start in ("first start", "restarted, ONNX exports cached"):
                    start_service(options, "127.0.0.1", args.port)
                    colds = [post(f"{base}/v1/score/folder/{name}", images[0])
                             for name in names]
                    print(f"{backend}: first request per category, {start} (s): "
                          + ", ".join(f"{s:.2f}" + ("" if code == 200 else f" ({code})")
                                      for code, s in colds), flush=True)
                    if start == "first start":
                        stop_service(joined=True)
                for load in args.loads:
                    categories, clients = map(int, load.split("x"))
                    stop, seen = threading.Event(), []
                    prober = threading.Thread(target=probe_bad_requests,
                                              args=(base, args.size, stop, seen))
                    prober.start()
                    result = drive(base, names[:categories], images, clients, args.requests,
                                   args.limit_s)
                    stop.set()
                    prober.join()
                    print(f"{backend}: {categories} categories, {clients} clients: "
                          f"{result['requests']} requests, {result['failures']} failed, "
                          f"{result['per_s']:.1f} req/s, p50 {result['p50']:.0f} ms, "
                          f"p95 {result['p95']:.0f} ms, p99 {result['p99']:.0f} ms; meanwhile "
                          f"{len(seen)} bad requests, {sum(400 <= c < 500 for c, _ in seen)} "
                          f"answered 4xx, slowest {max(t for _, t in seen):.2f} s", flush=True)
                stop_service(joined=True)
        finally:
            ray.shutdown()
        rate = in_process_onnx(store, names[0], images, args.size, 20.0)
        print(f"in-process ONNX Runtime, same export, one image per call: {rate:.1f} images/s")


if __name__ == "__main__":
    main()
