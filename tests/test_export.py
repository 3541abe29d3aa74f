"""ONNX export: the graph reproduces torch on real photographs, and scores without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage
import torch

from memkd_ray.checkpoint import load_model
from memkd_ray.checkpoint_format import META_FILE
from memkd_ray.cli import main
from memkd_ray.data.sample import Sample
from memkd_ray.deploy import export as export_module
from memkd_ray.deploy.export import PARITY_TOLERANCE, export_onnx
from memkd_ray.deploy.runtime import ONNX_FILE, OnnxScorer
from memkd_ray.engine import predict_maps
from memkd_ray.files import sha256_file
from memkd_ray.storage.registry import fetch_checkpoint
from tests.conftest import WITHOUT_TORCH

# Real photographs the models never saw (none of the images reserved for the independent check).
PHOTOS = [Path(skimage.data_dir) / name for name in
          ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")]
REFERENCE = "registry:synthetic/stripes"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memkd_ray.cli", *argv], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def store(trained_run) -> Path:
    return trained_run[0].parent.parent


@pytest.fixture(scope="module")
def exported(store, synth_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The best stripes model of the registry exported by the CLI, checked on the built-in
    photographs and two of the category's own test images."""
    out = tmp_path_factory.mktemp("export") / "stripes"
    own = [synth_root / "stripes" / "test" / "good" / "000.png",
           synth_root / "stripes" / "test" / "hole" / "000.png"]
    result = cli("export", "--checkpoint", REFERENCE, "--storage", str(store), "--out", str(out),
                 "--check-images", *map(str, own), "--threshold", "0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_export_writes_one_checked_self_describing_graph(exported, store):
    out, result = exported
    assert sorted(p.name for p in out.iterdir()) == ["model.json", ONNX_FILE]
    printed = json.loads(result.stdout)
    assert printed["onnx"] == str((out / ONNX_FILE).resolve())
    assert "ONNX Runtime vs torch on 5 real images" in result.stderr

    sidecar = json.loads((out / "model.json").read_text())
    checkpoint = fetch_checkpoint(REFERENCE, str(store))
    meta = json.loads((checkpoint / META_FILE).read_text())
    assert sidecar["model"] == {"file": ONNX_FILE, "sha256": sha256_file(out / ONNX_FILE),
                                "opset": 18, "batch": "dynamic"}
    assert sidecar["input"]["size"] == 128 and sidecar["input"]["shape"] == ["N", 3, 128, 128]
    assert sidecar["normalisation"]["mean"] == meta["teacher"]["mean"] == [0.5, 0.5, 0.5]
    # --threshold replaces the calibrated threshold and keeps its spread.
    calibrated = meta["decision"]
    assert sidecar["decision"] == {**calibrated, "threshold": 0.5, "method": "user",
                                   "target_fpr": None, "held_out_images": 0}
    source = sidecar["source"]
    assert source["checkpoint"] == REFERENCE and source["category"] == "stripes"
    assert source["checkpoint_json_sha256"] == sha256_file(checkpoint / META_FILE)
    assert source["weights_sha256"] == meta["sha256"] and source["epoch"] == meta["epoch"]
    parity = sidecar["parity"]
    assert parity == printed["parity"] and parity["images"] == 5
    assert 0 < max(parity["max_map_difference"], parity["max_score_difference"]) <= 1e-4

    graph = onnx.load(out / ONNX_FILE)
    onnx.checker.check_model(graph, full_check=True)
    (images,) = graph.graph.input
    dims = images.type.tensor_type.shape.dim
    assert images.name == "images" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [
        3, 128, 128]
    assert [o.name for o in graph.graph.output] == ["anomaly_map", "score"]
    # Weights inside the one file; the up-sampling of Eq. 3 is in the graph.
    assert not any(t.external_data for t in graph.graph.initializer)
    assert "Resize" in {node.op_type for node in graph.graph.node}


def test_predict_with_the_export_needs_no_torch_and_matches_torch(exported, store, synth_root,
                                                                  tmp_path):
    out, _ = exported
    defect = synth_root / "stripes" / "test" / "hole" / "001.png"
    normal = synth_root / "stripes" / "test" / "good" / "001.png"
    images = [*PHOTOS, normal, defect]
    pred = tmp_path / "pred"
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "predict", "--checkpoint",
                             str(out), *map(str, images), "--out", str(pred)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout)
    assert scores == json.loads((pred / "scores.json").read_text())
    assert list(scores) == [str(p) for p in images]
    assert len(list(pred.glob("*.png"))) == len(images)
    assert scores[str(defect)]["score"] > scores[str(normal)]["score"]
    assert [scores[str(p)]["anomalous"] for p in (normal, defect)] == [
        scores[str(p)]["score"] > 0.5 for p in (normal, defect)]

    # The same images through the torch model: maps and scores agree to the tolerance.
    model, checkpoint = load_model(fetch_checkpoint(REFERENCE, str(store)))
    decoded = np.stack([Sample(p, 0, "x").load_image(128) for p in images])
    pixels = torch.from_numpy(decoded).permute(0, 3, 1, 2).float() / 255
    torch_maps, torch_scores = predict_maps(model, pixels, checkpoint.config)
    onnx_maps, onnx_scores = OnnxScorer.open(out / ONNX_FILE).score(decoded)
    assert np.abs(onnx_maps - torch_maps.numpy()).max() <= PARITY_TOLERANCE
    raw = np.array([answer["score"] for answer in scores.values()])
    assert np.abs(raw - torch_scores.numpy()).max() <= PARITY_TOLERANCE
    np.testing.assert_array_equal(onnx_scores, raw.astype(np.float32))


def test_fixed_batch_export_replaces_an_export_and_pads_the_last_batch(exported, store,
                                                                       tmp_path):
    out, _ = exported
    fixed = tmp_path / "fixed"
    shutil.copytree(out, fixed)
    sidecar = export_onnx(fetch_checkpoint(REFERENCE, str(store)), fixed, source="test", batch=2)
    assert sorted(p.name for p in fixed.iterdir()) == ["model.json", ONNX_FILE]  # no partials
    assert sidecar["model"]["batch"] == 2 and sidecar["parity"]["images"] == 3
    dims = onnx.load(fixed / ONNX_FILE).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 128, 128]
    decoded = np.stack([Sample(p, 0, "x").load_image(128) for p in PHOTOS[:3]])
    fixed_maps, fixed_scores = OnnxScorer.open(fixed).score(decoded)  # batches of 2: 2 + 1
    dynamic_maps, dynamic_scores = OnnxScorer.open(out).score(decoded)
    assert fixed_maps.shape == (3, 128, 128)
    np.testing.assert_allclose(fixed_maps, dynamic_maps, atol=1e-5)
    np.testing.assert_allclose(fixed_scores, dynamic_scores, atol=1e-5)


def test_an_export_onnx_runtime_does_not_reproduce_is_not_written(exported, store, tmp_path,
                                                                  monkeypatch, capsys):
    out, _ = exported
    # The real graph, judged against a tolerance no float32 runtime meets.
    monkeypatch.setattr(export_module, "export_graph",
                        lambda scorer, path, opset, batch: shutil.copyfile(out / ONNX_FILE, path))
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", 0.0)
    target = tmp_path / "never"
    assert main(["-q", "export", "--checkpoint", REFERENCE, "--storage", str(store),
                 "--out", str(target)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "ONNX Runtime differs from torch by up to" in line and "nothing written" in line
    assert not target.exists()


@pytest.mark.parametrize(("damage", "message"), [
    ("flip", "sha256"),
    ("no-sidecar", "model.json: not found"),
    ("bad-sidecar", "model.json: not a memkd-ray export description"),
    # Damage whose digest was written into model.json too: caught by ONNX Runtime's load or
    # by the graph's own input shape.
    ("truncated-resealed", "ONNX Runtime cannot load it"),
    ("size-edited", "says input size 96"),
    ("batch-edited", "batch 4"),
])
def test_a_damaged_export_is_refused(damage, message, exported, synth_root, tmp_path, capsys):
    out, _ = exported
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    if damage == "flip":
        data = bytearray((damaged / ONNX_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (damaged / ONNX_FILE).write_bytes(bytes(data))
    elif damage == "no-sidecar":
        os.remove(damaged / "model.json")
    elif damage == "bad-sidecar":
        (damaged / "model.json").write_text('{"format": "something else"}')
    else:
        sidecar = json.loads((damaged / "model.json").read_text())
        if damage == "truncated-resealed":
            model = damaged / ONNX_FILE
            model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
            sidecar["model"]["sha256"] = sha256_file(model)
        elif damage == "size-edited":
            sidecar["input"]["size"] = 96
        else:
            sidecar["model"]["batch"] = 4
        (damaged / "model.json").write_text(json.dumps(sidecar))
    pred = tmp_path / "pred"
    image = synth_root / "stripes" / "test" / "good" / "000.png"
    assert main(["-q", "predict", "--checkpoint", str(damaged / ONNX_FILE), str(image),
                 "--out", str(pred)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line
    assert not pred.exists()
