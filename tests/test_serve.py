"""`memkd-ray serve`: the registry's models behind Ray Serve, scored as `predict` scores, bad
requests refused with 4xx while good ones go on, and the registry followed when it moves."""

import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from PIL import Image

from memkd_ray.cli import main
from memkd_ray.serving.requests import MAX_BODY_BYTES
from tests.conftest import _free_port
from tests.test_cli import png_header

STRIPES = "synthetic/stripes"


def request(url: str, body: bytes | None = None, content_type: str | None = "image/png",
            headers: dict | None = None, method: str | None = None) -> tuple[int, dict, bytes]:
    sent = urllib.request.Request(url, data=body, method=method or (
        "POST" if body is not None else "GET"))
    if body is not None and content_type:
        sent.add_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        sent.add_header(key, value)
    try:
        with urllib.request.urlopen(sent, timeout=120) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def store(trained_run, tmp_path_factory) -> Path:
    """A copy of the trained store (this module moves its registry)."""
    copy = tmp_path_factory.mktemp("serve") / "store"
    shutil.copytree(trained_run[0].parent.parent, copy)
    return copy


@pytest.fixture(scope="module")
def service(store, ray_cluster):
    """Serve the store on the shared local Ray with both backends in turn: yields a function
    that deploys with the given options and returns the base URL."""
    from ray import serve

    from memkd_ray.serving.app import ServeOptions, start_service

    port = _free_port()

    def deploy(**options) -> str:
        defaults = {"storage": f"file://{store}", "cpus_per_replica": 0.5, "refresh_s": 1.0}
        start_service(ServeOptions(**{**defaults, **options}), "127.0.0.1", port)
        return f"http://127.0.0.1:{port}"

    yield deploy
    serve.shutdown()


def predicted(store: Path, images: list[Path], tmp_path: Path, capsys) -> dict:
    assert main(["-q", "predict", "--checkpoint", f"registry:{STRIPES}", "--storage", str(store),
                 *map(str, images), "--out", str(tmp_path / "pred")]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_served_answers_equal_predict(backend, service, store, synth_root, tmp_path, capsys):
    base = service(backend=backend)
    test = synth_root / "stripes" / "test"
    images = [test / "good" / "000.png", test / "good" / "004.png", test / "hole" / "001.png",
              test / "hole" / "002.png"]
    expected = predicted(store, images, tmp_path, capsys)
    card = json.loads((store / "registry" / STRIPES / "best.json").read_text())
    answers = []
    # Concurrent requests, so that the pool batches them.
    threads = [threading.Thread(target=lambda p=p: answers.append(
        (p, request(f"{base}/v1/score/{STRIPES}", p.read_bytes())))) for p in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for path, (status, _, body) in answers:
        assert status == 200, body
        answer = json.loads(body)
        want = expected[str(path)]
        assert abs(answer["score"] - want["score"]) <= 1e-4
        assert answer["anomalous"] == want["anomalous"]
        assert abs(answer["normalized_score"] - want["normalized_score"]) <= 1e-4
        assert answer["threshold"] == card["decision"]["threshold"]
        assert answer["model"] == {"benchmark": "synthetic", "category": "stripes",
                                   "run_id": card["run_id"], "epoch": card["epoch"],
                                   "sha256": card["sha256"]}
    assert json.loads(dict((str(p), b) for p, (_, _, b) in answers)[str(images[2])])["anomalous"]

    status, headers, body = request(f"{base}/v1/score/{STRIPES}?map=png", images[2].read_bytes())
    assert status == 200 and headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(body)).size == (128, 128)
    assert abs(float(headers["x-score"]) - expected[str(images[2])]["score"]) <= 1e-4


def test_models_and_health(service, store):
    base = service(backend="torch")
    status, _, body = request(f"{base}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = request(f"{base}/v1/models")
    models = json.loads(body)["models"]
    assert status == 200 and [m["model"]["category"] for m in models] == ["mesh", "stripes"]
    for entry in models:
        card = json.loads((store / "registry" / "synthetic" / entry["model"]["category"]
                           / "best.json").read_text())
        assert entry["decision"] == card["decision"] and entry["model"]["sha256"] == card["sha256"]


def test_bad_requests_get_4xx_and_good_ones_go_on(service, synth_root):
    base = service(backend="torch")
    good = (synth_root / "stripes" / "test" / "good" / "000.png").read_bytes()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "gray").save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    # A PNG declaring 100000 x 100000 pixels: refused from its header, before any decoding.
    bomb = png_header(100000, 100000)
    cases = [
        (f"{base}/v1/score/synthetic/nope", good, "image/png", 404),
        (f"{base}/v1/score/nope/stripes", good, "image/png", 404),
        (f"{base}/v1/score/{STRIPES}", b"not an image at all", "image/png", 400),
        (f"{base}/v1/score/{STRIPES}", good[: len(good) // 2], "image/png", 400),
        (f"{base}/v1/score/{STRIPES}", bomb, "image/png", 413),
        (f"{base}/v1/score/{STRIPES}", good, "text/plain", 415),
        (f"{base}/v1/score/{STRIPES}", good, None, 415),
        (f"{base}/v1/score/{STRIPES}", jpeg, "image/png", 415),
        (f"{base}/v1/score/{STRIPES}", b"", "image/png", 400),
        (f"{base}/v1/score/{STRIPES}?map=svg", good, "image/png", 400),
        (f"{base}/v1/elsewhere", None, None, 404),
    ]
    for url, body, content_type, expected in cases:
        status, _, answer = request(url, body, content_type)
        assert status == expected, (url, content_type, answer[:200])
        reason = json.loads(answer)["error"]
        assert reason and "\n" not in reason
        assert request(f"{base}/v1/score/{STRIPES}", good)[0] == 200
    # A body declared larger than the limit is refused before it is read.
    connection = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=60)
    connection.putrequest("POST", f"/v1/score/{STRIPES}")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    connection.send(good)
    answer = connection.getresponse()
    assert answer.status == 413 and "at most" in json.loads(answer.read())["error"]
    connection.close()
    assert request(f"{base}/v1/score/{STRIPES}", jpeg, "image/jpeg")[0] == 200
    assert request(f"{base}/v1/models", b"x", method="POST")[0] == 405


def test_the_service_follows_the_registry_and_never_serves_a_broken_model(service, store,
                                                                           synth_root):
    base = service(backend="torch")
    registry = store / "registry" / "synthetic" / "stripes"
    old = json.loads((registry / "best.json").read_text())
    runs = store / "runs"
    # A second run of the same category (its files copied): promoted by force.
    newer = f"{old['run_id']}-b"
    shutil.copytree(runs / old["run_id"], runs / newer)
    failures, stop = [], threading.Event()
    good = (synth_root / "stripes" / "test" / "good" / "000.png").read_bytes()

    def load() -> None:
        while not stop.is_set():
            status, _, body = request(f"{base}/v1/score/{STRIPES}", good)
            if status != 200:
                failures.append(body)

    clients = [threading.Thread(target=load) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        promote(store, newer)
        served = _wait_for_run(base, newer)
        assert served == newer

        # A run whose weights are damaged after promotion: the service keeps the old model.
        broken = f"{old['run_id']}-c"
        shutil.copytree(runs / old["run_id"], runs / broken)
        promote(store, broken)
        for weights in (runs / broken).rglob("model.safetensors"):
            weights.write_bytes(weights.read_bytes()[:-100])
        time.sleep(5)  # several refreshes
        assert _served_run(base) == newer
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert failures == []


def promote(store: Path, run_id: str) -> None:
    """Force the stripes checkpoint of `run_id` (a copied run directory) into the registry."""
    from memkd_ray.storage import open_storage
    from memkd_ray.storage.registry import Registry

    checkpoint = max((store / "runs" / run_id / "synthetic" / "stripes").glob("checkpoint_epoch_*"))
    assert Registry(open_storage(f"file://{store}")).promote(
        f"file://{checkpoint}", force=True).promoted


def _served_run(base: str) -> str:
    models = json.loads(request(f"{base}/v1/models")[2])["models"]
    return next(m["model"]["run_id"] for m in models if m["model"]["category"] == "stripes")


def _wait_for_run(base: str, run_id: str, limit_s: float = 60) -> str:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and _served_run(base) != run_id:
        time.sleep(0.5)
    return _served_run(base)


@pytest.mark.parametrize("joined, code, left", [
    (False, 0, "what it started ends with it"),
    (True, 1, "the application may still run on the cluster")])
def test_a_stop_that_hangs_ends_the_process_all_the_same(joined, code, left):
    hanging = ("import time\n"
               "from memkd_ray.cli.serving import stop_within\n"
               f"stop_within(lambda: time.sleep(600), 0.5, joined={joined})\n")
    result = subprocess.run([sys.executable, "-c", hanging], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == code, result.stderr
    assert f"did not stop within 0.5 s; exiting ({left}" in result.stderr
    assert "time.sleep" in result.stderr or "<string>" in result.stderr  # where it waited


def test_an_exit_that_hangs_after_the_stop_ends_all_the_same():
    # The stop returned; a thread the interpreter waits for at exit never ends.
    hanging = ("import threading, time\n"
               "from memkd_ray.cli.serving import stop_within\n"
               "threading.Thread(target=time.sleep, args=(600,)).start()\n"
               "stop_within(lambda: None, 0.5, joined=True)\n")
    result = subprocess.run([sys.executable, "-c", hanging], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "exiting (what it started ends with it)" in result.stderr


def test_the_serve_command_checks_its_options_and_stops_on_ctrl_c(trained_run, tmp_path):
    store = trained_run[0].parent.parent
    env = {**os.environ, "MEMKD_TEST_TOKEN": "s3cret-token"}
    command = [sys.executable, "-m", "memkd_ray.cli", "serve", "--storage", str(store)]
    for extra, reason in [(["--port", "0"], "--port 0"),
                          (["--replicas", "0"], "--replicas 0"),
                          (["--token-env", "MEMKD_UNSET_VARIABLE"], "not set"),
                          (["--category", "nope"], "no model registered")]:
        result = subprocess.run([*command, *extra], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 2 and reason in result.stderr, result.stderr[-500:]
        assert len(result.stderr.strip().splitlines()) == 1

    port = _free_port()
    process = subprocess.Popen(
        [*command, "--port", str(port), "--backend", "torch", "--token-env", "MEMKD_TEST_TOKEN",
         "--cpus-per-replica", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr))
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("serving" in line for line in lines):
            assert process.poll() is None, lines
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        assert request(f"{base}/healthz")[0] == 200
        assert request(f"{base}/v1/models")[0] == 401
        status, _, body = request(f"{base}/v1/models",
                                  headers={"Authorization": "Bearer s3cret-token"})
        assert status == 200 and len(json.loads(body)["models"]) == 2
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join()
    stderr = "".join(lines)
    assert process.returncode == 0, stderr[-2000:]
    if "did not stop within" in stderr:  # stopped all the same; say where it waited
        warnings.warn(stderr[stderr.index("did not stop within"):][:3000], stacklevel=1)
    assert "serving 2 model(s)" in stderr and "s3cret-token" not in stderr
    with pytest.raises(OSError):
        request(f"{base}/healthz")
