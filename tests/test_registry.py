"""Model registry on file:// and on a real S3 endpoint (moto server on loopback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memkd_ray.checkpoint import read_checkpoint, save_checkpoint
from memkd_ray.cli import main
from memkd_ray.errors import CheckpointError, UserInputError
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.model import create_memkd
from memkd_ray.storage import open_storage, plain_name
from memkd_ray.storage.layout import RunLayout, write_results
from memkd_ray.storage.registry import Registry, fetch_checkpoint
from tests.conftest import S3_SECRET, WITHOUT_TORCH, fast_config

CATEGORY = "mesh"


@pytest.fixture(scope="module")
def model_and_config():
    cfg = fast_config()
    return create_memkd(cfg), cfg


@pytest.fixture(params=["file", "s3"])
def storage_uri(request, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    request.getfixturevalue("s3_endpoint")
    return f"s3://memkd-test/{tmp_path.name}"


def publish_run(storage_uri: str, run_id: str, image_auroc: float, model_and_config,
                tmp_path: Path) -> str:
    """Store a checkpoint (and results.parquet) as a training run would; returns its URI."""
    model, cfg = model_and_config
    metrics = {**dict.fromkeys(METRIC_KEYS, 0.5), "image_auroc": image_auroc}
    local = save_checkpoint(tmp_path / f"staging-{run_id}", model, cfg, 1, metrics,
                            category=CATEGORY)
    storage = open_storage(storage_uri)
    layout = RunLayout(storage, run_id)
    base = f"{layout.benchmark_dir('synthetic')}/{CATEGORY}/checkpoint_epoch_0001"
    for path in local.iterdir():
        storage.write_bytes(f"{base}/{path.name}", path.read_bytes())
    uri = storage.uri_for(base)
    write_results(layout, [{"run_id": run_id, "benchmark": "synthetic", "category": CATEGORY,
                            "status": "ok", "error": "", **metrics, "checkpoint_uri": uri}])
    return uri


def test_only_the_better_run_becomes_best(storage_uri, model_and_config, tmp_path, capsys):
    first = publish_run(storage_uri, "run-a", 0.80, model_and_config, tmp_path)
    better = publish_run(storage_uri, "run-b", 0.95, model_and_config, tmp_path)
    worse = publish_run(storage_uri, "run-c", 0.90, model_and_config, tmp_path)
    registry = Registry(open_storage(storage_uri))
    assert registry.promote(first).promoted
    assert registry.promote(better).promoted
    result = registry.promote(worse)
    assert not result.promoted and result.best["run_id"] == "run-b"
    best = registry.best("synthetic", CATEGORY)
    assert best["checkpoint_uri"] == better and best["metrics"]["image_auroc"] == 0.95
    assert [row["run_id"] for row in registry.history("synthetic", CATEGORY)] == ["run-a",
                                                                                  "run-b"]
    # --force replaces even a better model, and the history records it.
    assert registry.promote(worse, force=True).promoted
    assert registry.best("synthetic", CATEGORY)["run_id"] == "run-c"
    history = registry.history("synthetic", CATEGORY)
    assert [(r["run_id"], r["forced"]) for r in history][-1] == ("run-c", True)

    assert main(["models", "list", "--storage", storage_uri]) == 0
    table = capsys.readouterr().out
    assert "synthetic" in table and "run-c" in table and "90.0" in table and "MiB" in table
    assert main(["models", "list", "--storage", storage_uri, "--format", "json"]) == 0
    (card,) = json.loads(capsys.readouterr().out)
    assert card["run_id"] == "run-c" and len(card["sha256"]) == 64
    assert main(["models", "show", "synthetic/mesh", "--storage", storage_uri]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["teacher"]["name"] == "efficientnet_lite0"
    assert shown["package_version"] and shown["teacher"]["weights"].startswith("package:")


def test_concurrent_promotions_converge_on_the_best(storage_uri, model_and_config, tmp_path):
    scores = [0.61, 0.93, 0.72, 0.88, 0.97, 0.55]
    uris = [publish_run(storage_uri, f"run-{i}", s, model_and_config, tmp_path)
            for i, s in enumerate(scores)]
    registry = Registry(open_storage(storage_uri))
    barrier = threading.Barrier(len(uris))
    errors = []

    def promote(uri: str) -> None:
        try:
            barrier.wait()
            Registry(open_storage(storage_uri)).promote(uri)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(uri,)) for uri in uris]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    best = registry.best("synthetic", CATEGORY)
    assert best["run_id"] == "run-4" and best["metrics"]["image_auroc"] == 0.97
    history = registry.history("synthetic", CATEGORY)
    assert "run-4" in {row["run_id"] for row in history}
    assert len(history) == len(registry._claims("synthetic", CATEGORY))
    # The pointer leads to a complete checkpoint whose hash checks out.
    assert registry.card(best["checkpoint_uri"])["sha256"] == best["sha256"]


def test_partial_checkpoint_is_never_promoted(storage_uri, model_and_config, tmp_path):
    uri = publish_run(storage_uri, "run-x", 0.99, model_and_config, tmp_path)
    storage = open_storage(storage_uri)
    weights = f"{storage.path_of(uri)}/model.safetensors"
    storage.write_bytes(weights, storage.read_bytes(weights)[:1000])  # an interrupted upload
    registry = Registry(storage)
    with pytest.raises(CheckpointError, match="partial upload or tampered"):
        registry.promote(uri)
    assert registry.best("synthetic", CATEGORY) is None


def test_pull_verifies_and_refuses_a_corrupted_object(storage_uri, model_and_config, tmp_path,
                                                      capsys):
    uri = publish_run(storage_uri, "run-p", 0.9, model_and_config, tmp_path)
    Registry(open_storage(storage_uri)).promote(uri)
    good = tmp_path / "pulled"
    assert main(["models", "pull", "synthetic/mesh", "--to", str(good),
                 "--storage", storage_uri]) == 0
    assert capsys.readouterr().out.strip() == str(good.resolve())
    assert {p.name for p in good.iterdir()} == {"model.safetensors", "checkpoint.json"}
    by_run = tmp_path / "by-run"
    assert main(["models", "pull", "synthetic/mesh", "--run", "run-p", "--to", str(by_run),
                 "--storage", storage_uri]) == 0
    capsys.readouterr()

    storage = open_storage(storage_uri)
    weights = f"{storage.path_of(uri)}/model.safetensors"
    data = bytearray(storage.read_bytes(weights))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(weights, bytes(data))
    bad = tmp_path / "tampered"
    assert main(["models", "pull", "synthetic/mesh", "--to", str(bad),
                 "--storage", storage_uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "tampered or truncated" in err[0]
    assert err[0].startswith(f"memkd-ray: error: {uri}/model.safetensors: "), err
    assert not bad.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tampered")] == []


def test_predict_and_eval_from_registry_and_s3_uri(s3_endpoint, synth_root, model_and_config,
                                                   tmp_path, monkeypatch, capsys):
    storage_uri = f"s3://memkd-test/{tmp_path.name}"
    uri = publish_run(storage_uri, "run-q", 0.9, model_and_config, tmp_path)
    Registry(open_storage(storage_uri)).promote(uri)
    monkeypatch.setenv("MEMKD_RAY_CACHE", str(tmp_path / "cache"))
    image = synth_root / "mesh" / "test" / "hole" / "000.png"
    for reference in ("registry:synthetic/mesh", uri):
        out = tmp_path / f"pred-{len(reference)}"
        assert main(["-q", "predict", "--checkpoint", reference, str(image), "--out", str(out),
                     "--storage", storage_uri]) == 0
        assert list(json.loads(capsys.readouterr().out)) == [str(image)]
    (cached,) = (tmp_path / "cache").iterdir()  # both references hit the same sha256 entry
    assert main(["-q", "eval", "--checkpoint", "registry:synthetic/mesh", "--data-root",
                 str(synth_root), "--category", "mesh", "--storage", storage_uri]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(METRIC_KEYS)
    assert main(["runs", "list", "--storage", storage_uri]) == 0
    assert "run-q" in capsys.readouterr().out
    assert main(["runs", "show", "run-q", "--storage", storage_uri]) == 0
    assert "mesh" in capsys.readouterr().out
    shutil.rmtree(cached)


def test_credentials_never_reach_outputs_or_stored_objects(s3_endpoint, model_and_config,
                                                           tmp_path, capsys):
    storage_uri = f"s3://memkd-test/{tmp_path.name}"
    uri = publish_run(storage_uri, "run-s", 0.9, model_and_config, tmp_path)
    outputs = []
    for argv in (["models", "promote", "run-s"], ["models", "list", "--format", "json"],
                 ["models", "show", "synthetic/mesh"], ["runs", "list"],
                 ["models", "pull", "synthetic/mesh", "--to", str(tmp_path / "m")]):
        assert main([*argv, "--storage", storage_uri]) == 0
        captured = capsys.readouterr()
        outputs += [captured.out, captured.err]
    assert "run-s" in outputs[0]
    assert all(S3_SECRET not in text for text in outputs)
    listing = s3_endpoint.list_objects_v2(Bucket="memkd-test", Prefix=tmp_path.name)
    for obj in listing["Contents"]:
        body = s3_endpoint.get_object(Bucket="memkd-test", Key=obj["Key"])["Body"].read()
        assert S3_SECRET.encode() not in body, obj["Key"]
    assert uri.startswith("s3://memkd-test/")


@pytest.mark.parametrize("name", ["mesh", "metal_nut", "pcb1", "CandyCane", "v1.2",
                                  "20261130-133624-70b085", "0"])
def test_names_of_real_benchmarks_and_runs_are_plain(name):
    assert plain_name("category", name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-x", "_x", "a/b", "a\\b",
                                  "my parts", "mesh ", "caf\u00e9", "a\0b", "a\nb"])
def test_anything_else_is_refused_as_a_storage_name(name):
    with pytest.raises(UserInputError, match="must be a plain name"):
        plain_name("category", name)


def test_concurrent_pulls_of_one_model_share_one_verified_cache_entry(
        s3_endpoint, model_and_config, tmp_path, monkeypatch):
    storage_uri = f"s3://memkd-test/{tmp_path.name}"
    uri = publish_run(storage_uri, "run-c", 0.9, model_and_config, tmp_path)
    monkeypatch.setenv("MEMKD_RAY_CACHE", str(tmp_path / "cache"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: fetch_checkpoint(uri, storage_uri), range(4)))
    assert len(set(paths)) == 1
    assert read_checkpoint(paths[0]).meta["sha256"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [paths[0].name]


def test_the_run_id_is_read_below_the_storage_root_even_one_named_runs(model_and_config,
                                                                        tmp_path):
    storage_uri = f"file://{tmp_path / 'runs' / 'team'}"
    uri = publish_run(storage_uri, "run-r", 0.9, model_and_config, tmp_path)
    assert Registry(open_storage(storage_uri)).card(uri)["run_id"] == "run-r"


def test_browsing_the_registry_and_the_runs_needs_no_torch(model_and_config, tmp_path):
    # A laptop with the package but no torch lists and inspects what a cluster trained.
    store = f"file://{tmp_path / 'store'}"
    uri = publish_run(store, "run-a", 0.9, model_and_config, tmp_path)
    assert Registry(open_storage(store)).promote(uri).promoted
    for argv, expected in [(["models", "list"], "run-a"),
                           (["models", "show", f"synthetic/{CATEGORY}"], '"config_hash"'),
                           (["runs", "list"], "run-a"),
                           (["runs", "show", "run-a"], CATEGORY)]:
        result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv, "--storage", store],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (argv, result.stderr[-2000:])
        assert expected in result.stdout, argv



def test_a_copied_store_points_into_itself_and_no_pointer_leaves_it(model_and_config, tmp_path,
                                                                     capsys):
    # Results and registry hold pointers relative to the store's root: a copy (here the only
    # one left) works on its own, and a pointer edited to lead elsewhere is refused.
    original = tmp_path / "store"
    uri = publish_run(f"file://{original}", "run-a", 0.9, model_and_config, tmp_path)
    assert Registry(open_storage(str(original))).promote(uri).promoted
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    registry = Registry(open_storage(str(copy)))
    best = registry.best("synthetic", CATEGORY)
    assert best["checkpoint_uri"] == (copy / "runs" / "run-a" / "synthetic" / CATEGORY
                                      / "checkpoint_epoch_0001").as_uri()
    assert registry.history("synthetic", CATEGORY)[0]["checkpoint_uri"] == best["checkpoint_uri"]
    assert main(["-q", "runs", "show", "run-a", "--storage", str(copy)]) == 0
    assert main(["-q", "models", "pull", f"synthetic/{CATEGORY}", "--to", str(tmp_path / "m"),
                 "--storage", str(copy)]) == 0
    capsys.readouterr()

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(copy / "runs" / "run-a" / "synthetic" / CATEGORY / "checkpoint_epoch_0001",
                    elsewhere)
    best_json = copy / "registry" / "synthetic" / CATEGORY / "best.json"
    for pointer in (elsewhere.as_uri(), str(elsewhere), "runs/../../elsewhere"):
        card = json.loads(best_json.read_text())
        best_json.write_text(json.dumps({**card, "checkpoint_uri": pointer}))
        code = main(["predict", "--checkpoint", f"registry:synthetic/{CATEGORY}", "--storage",
                     str(copy), str(tmp_path / "none.png"), "--out", str(tmp_path / "pred")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "points outside the store" in err[0], err
        assert not (tmp_path / "pred").exists()
    # Records written before pointers were relative hold absolute URIs: inside, still read.
    inside = best["checkpoint_uri"]
    best_json.write_text(json.dumps({**json.loads(best_json.read_text()),
                                     "checkpoint_uri": inside}))
    assert registry.best("synthetic", CATEGORY)["checkpoint_uri"] == inside


def test_an_unusable_checkpoint_uri_names_the_checkpoint_flag(s3_endpoint, tmp_path, capsys):
    code = main(["predict", "--checkpoint", "s3://no-such-bucket/run/ckpt",
                 str(tmp_path / "x.png"), "--out", str(tmp_path / "pred")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--checkpoint s3://no-such-bucket: bucket no-such-bucket not found" in err[0]


def test_promote_says_when_there_is_nothing_to_promote(model_and_config, tmp_path, capsys):
    store = tmp_path / "store"
    publish_run(f"file://{store}", "run-ok", 0.9, model_and_config, tmp_path)
    layout = RunLayout(open_storage(str(store)), "run-failed")
    write_results(layout, [{"run_id": "run-failed", "benchmark": "synthetic",
                            "category": CATEGORY, "status": "failed", "error": "broken"}])
    for argv, message in [(["run-failed"], "run run-failed: no category finished ok"),
                          (["run-ok", "--metric", "bogus"], "--metric bogus: not one of")]:
        assert main(["models", "promote", *argv, "--storage", str(store)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (store / "registry").exists()


def test_a_store_that_refuses_writes_is_a_one_line_error(model_and_config, tmp_path, capsys):
    # Where a command must write, a file stands in the way (as a read-only or full disk would
    # refuse the write): the report and a forced promotion say which object, in one line.
    store = tmp_path / "store"
    publish_run(f"file://{store}", "run-a", 0.9, model_and_config, tmp_path)
    (store / "runs" / "run-a" / "report").write_text("in the way")
    (store / "registry").write_text("in the way")
    for argv in (["report", "run-a"], ["models", "promote", "run-a", "--force"]):
        assert main([*argv, "--storage", str(store)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0], err


def test_reading_stored_tables_never_aborts_the_process_at_exit(model_and_config, tmp_path):
    # pyarrow's thread pool, used to read a Parquet table, aborted about a third of the
    # processes at exit ("terminate called without an active exception", exit -6).
    store = f"file://{tmp_path / 'store'}"
    publish_run(store, "run-a", 0.9, model_and_config, tmp_path)
    for _ in range(12):
        result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "runs", "list",
                                 "--storage", store], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-500:]
