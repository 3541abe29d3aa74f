"""End to end through the command line: train, eval --save-maps, predict, exit codes."""

import csv
import json
import pickle
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from memkd_ray.cli import main
from memkd_ray.decision import DECISION_RATE_KEYS
from memkd_ray.metrics import METRIC_KEYS, compute_metrics
from tests.conftest import CONFIGS

EPOCH_LINE = re.compile(r"(\w+) epoch (\d+): loss \S+ \(kd (\S+), nm (\S+), orth (\S+)\)")


def test_train_writes_the_storage_layout_and_results(trained_run):
    run_dir, result = trained_run
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert [r["category"] for r in rows] == ["mesh", "stripes"]
    for row in rows:
        assert row["run_id"] == run_dir.name and row["benchmark"] == "synthetic"
        assert row["epochs"] == 6 and row["wall_seconds"] > 0
        assert row["status"] == "ok" and row["workers"] == 1
        # Stored pointers are relative to the store's root: a copied store points into itself.
        assert row["checkpoint_uri"] == (f"runs/{run_dir.name}/synthetic/{row['category']}/"
                                         "checkpoint_epoch_0006")
        checkpoint = run_dir.parents[1] / row["checkpoint_uri"]
        assert {p.name for p in checkpoint.iterdir()} == {
            "model.safetensors", "checkpoint.json", "training_state.safetensors", "evaluation"}
        meta = json.loads((checkpoint / "checkpoint.json").read_text())
        assert meta["epoch"] == 6
        assert meta["metrics"] == {k: row[k] for k in (*METRIC_KEYS, *DECISION_RATE_KEYS)}
    # Each category's checkpoint was offered to the registry, which took it (first run).
    for row in rows:
        assert f"registry: synthetic/{row['category']} <- run {run_dir.name}" in result.stdout
        best = run_dir.parents[1] / "registry" / "synthetic" / row["category"] / "best.json"
        assert json.loads(best.read_text())["checkpoint_uri"] == row["checkpoint_uri"]
    # The printed table is the parquet's, in percent with one decimal.
    assert f"{100 * rows[0]['image_auroc']:.1f}" in result.stdout
    assert "mean" in result.stdout


def test_training_learns_far_above_chance(trained_run):
    run_dir, result = trained_run
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    for row in rows:
        assert row["image_auroc"] >= 0.75, row
        assert row["pixel_auroc"] >= 0.75, row
    assert np.mean([r["image_auroc"] for r in rows]) >= 0.85
    for category in ("mesh", "stripes"):
        epochs = [tuple(map(float, m.groups()[2:])) for m in EPOCH_LINE.finditer(result.stderr)
                  if m.group(1) == category]
        assert len(epochs) == 6
        kd, nm = [e[0] for e in epochs], [e[1] for e in epochs]
        assert kd[-1] < 0.8 * kd[0]
        # L_NM really trains: the memory values move towards the exemplar features.
        assert np.mean(nm[-2:]) < np.mean(nm[:2])


def test_eval_save_maps_lets_anyone_recompute_the_metrics(trained_run, synth_root, tmp_path,
                                                          capsys):
    run_dir, _ = trained_run
    checkpoint = run_dir / "synthetic" / "mesh" / "checkpoint_epoch_0006"
    maps_dir = tmp_path / "maps"
    assert main(["-q", "eval", "--checkpoint", str(checkpoint), "--data-root", str(synth_root),
                 "--category", "mesh", "--save-maps", str(maps_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(METRIC_KEYS)
    stored = json.loads((checkpoint / "checkpoint.json").read_text())["metrics"]
    for key in METRIC_KEYS:
        assert printed[key] == pytest.approx(stored[key], abs=1e-6)
    with open(maps_dir / "index.csv") as handle:
        index = list(csv.DictReader(handle))
    assert len(index) == 50
    arrays = [np.load(maps_dir / f"{row['id']}.npz") for row in index]
    maps = np.stack([a["map"] for a in arrays])
    masks = np.stack([a["mask"] for a in arrays])
    labels = np.array([int(row["label"]) for row in index])
    assert maps.dtype == np.float32 and masks.dtype == np.uint8 and maps.shape == (50, 128, 128)
    recomputed = compute_metrics(maps, masks, labels)
    for key in METRIC_KEYS:
        assert recomputed[key] == pytest.approx(printed[key], abs=1e-6)
    independent = roc_auc_score(labels, maps.reshape(50, -1).max(1))
    assert independent == pytest.approx(printed["image_auroc"], abs=1e-6)


def test_save_maps_keeps_one_file_per_image_whatever_its_name(trained_run, synth_root,
                                                               tmp_path, capsys):
    # 000.png beside 000.jpg, and a name that is not valid UTF-8: every image its own file.
    import os

    from PIL import Image

    run_dir, _ = trained_run
    root = tmp_path / "bench"
    shutil.copytree(synth_root / "mesh", root / "mesh")
    good = root / "mesh" / "test" / "good"
    Image.open(good / "000.png").convert("RGB").save(good / "000.jpg")
    odd = os.fsdecode(bytes(good) + b"/caf\xe9.png")
    shutil.copyfile(good / "001.png", odd)
    maps_dir = tmp_path / "maps"
    assert main(["-q", "eval", "--checkpoint",
                 str(run_dir / "synthetic" / "mesh" / "checkpoint_epoch_0006"), "--data-root",
                 str(root), "--category", "mesh", "--save-maps", str(maps_dir)]) == 0
    capsys.readouterr()
    with open(maps_dir / "index.csv", encoding="utf-8") as handle:
        index = list(csv.DictReader(handle))
    assert len(index) == 52 and len({row["id"] for row in index}) == 52
    assert sorted(p.name for p in maps_dir.iterdir()) == sorted(
        ["index.csv", *(f"{row['id']}.npz" for row in index)])
    assert any(row["path"].endswith("caf\\xe9.png") for row in index)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".maps")] == []


def test_predict_writes_overlays_and_scores(trained_run, synth_root, tmp_path, capsys):
    run_dir, _ = trained_run
    checkpoint = run_dir / "synthetic" / "stripes" / "checkpoint_epoch_0006"
    images = [synth_root / "stripes" / "test" / "good" / "000.png",
              synth_root / "stripes" / "test" / "hole" / "000.png"]
    out = tmp_path / "pred"
    # An image given twice is scored and drawn once.
    assert main(["-q", "predict", "--checkpoint", str(checkpoint), *map(str, images),
                 str(images[0]), "--out", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == json.loads((out / "scores.json").read_text())
    assert list(scores) == [str(p) for p in images]
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_000.png", "0001_000.png"]
    assert Image.open(out / "0001_000.png").size == (128, 128)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


DEMO = str(CONFIGS / "demo.yaml")
CKPT = "{run}/synthetic/mesh/checkpoint_epoch_0006"


# One row per way a user gets a command wrong: each must exit 2 with one line naming the
# problem, before anything is written (grows with every new command and option).
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--config", "missing.yaml", "--data-root", "."], "config file not found"),
        (["train", "--config", DEMO, "--data-root", ".", "--set", "train.epochz=1"],
         "unknown config key train.epochz"),
        (["train", "--config", "{tmp}/section.yaml", "--data-root", "."],
         "train: must be a mapping of keys, got 5"),
        (["train", "--config", DEMO, "--data-root", "/nonexistent"],
         "/nonexistent: data root not found"),
        (["train", "--config", DEMO, "--data-root", ".", "--storage", "gs://bucket/x"],
         "unsupported scheme gs://"),
        (["train", "--config", DEMO, "--data-root", ".", "--storage", "{tmp}/file"],
         "--storage {tmp}/file: not a directory"),
        (["runs", "list", "--storage", "{tmp}/file"], "--storage {tmp}/file: not a directory"),
        (["train", "--config", DEMO, "--data-root", ".", "--workers-per-category", "3"],
         "distributed.workers_per_category 3 must divide train.batch_size 16"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--address", "ray://127.0.0.1:1"],
         "--address ray://127.0.0.1:1: nothing answers at 127.0.0.1:1"),
        (["tune", "--config", DEMO, "--data-root", "{synth}", "--address", "127.0.0.1:1"],
         "--address 127.0.0.1:1: nothing answers at 127.0.0.1:1"),
        (["train", "--config", DEMO, "--data-root", ".", "--set", "teacher.name=resnet_nope"],
         "teacher.name resnet_nope: not a model timm knows"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--set",
          "teacher.weights={tmp}/pickled.pth"], "{tmp}/pickled.pth is not a plain tensor file"),
        (["eval", "--checkpoint", "/nonexistent", "--data-root", ".", "--category", "x"],
         "checkpoint.json: not found"),
        (["eval", "--checkpoint", "{tmp}/file", "--data-root", ".", "--category", "x"],
         "--checkpoint {tmp}/file: not a directory"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--set", "train.lr=.inf"],
         "train.lr must be a finite number > 0, got inf"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--set", "decision.target_fpr=0"],
         "decision.target_fpr must be a finite number > 0 and < 0.5, got 0"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--set",
          "decision.holdout_fraction=0.7"],
         "decision.holdout_fraction must be a finite number >= 0 and < 0.5, got 0.7"),
        (["serve", "--storage", "{tmp}/empty-store"], "no model registered for any category"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--set", "train.device=cuda"],
         "train.device cuda needs distributed.gpus_per_worker > 0"),
        (["eval", "--checkpoint", CKPT, "--data-root", "{synth}", "--category", "mesh",
          "--save-maps", "{tmp}/file"], "--save-maps {tmp}/file: exists and is not a directory"),
        (["predict", "--checkpoint", CKPT, "{tmp}/bomb.png", "--out", "{tmp}/pred"],
         "{tmp}/bomb.png: larger than the largest accepted image (64 Mpx"),
        (["predict", "--checkpoint", CKPT, "{tmp}/big.png", "--out", "{tmp}/pred"],
         "{tmp}/big.png: 13000x13000 pixels: larger than the largest accepted image"),
        (["predict", "--checkpoint", CKPT, "{tmp}/truncated.png", "--out", "{tmp}/pred"],
         "{tmp}/truncated.png: unreadable image"),
        (["predict", "--checkpoint", CKPT, "{tmp}/truncated.png", "--out", "{tmp}/file/x"],
         "--out {tmp}/file/x: {tmp}/file is not a directory"),
        (["predict", "--checkpoint", "{tmp}/none.onnx", "{tmp}/truncated.png", "--out",
          "{tmp}/pred"], "{tmp}/none.onnx: not found"),
        (["export", "--checkpoint", CKPT, "--out", "{tmp}/file"],
         "--out {tmp}/file: exists and is not a directory"),
        (["export", "--checkpoint", CKPT, "--out", "{tmp}/onnx", "--opset", "13"],
         "--opset 13: the exporter writes opsets 18 to"),
        (["export", "--checkpoint", CKPT, "--out", "{tmp}/onnx", "--check-images",
          "{tmp}/truncated.png"], "{tmp}/truncated.png: unreadable image"),
        (["models", "pull", "synthetic/mesh", "--to", "{tmp}/file"],
         "--to {tmp}/file: exists and is not a directory"),
        (["report", "some-run", "--out", "{tmp}/file"],
         "--out {tmp}/file: exists and is not a directory"),
        (["data", "synth", "--out", "{tmp}/synth", "--size", "0"],
         "--size 0: must be between 32 and 8192"),
        (["data", "synth", "--out", "{tmp}/synth", "--size", "-5"],
         "--size -5: must be between 32 and 8192"),
        (["data", "synth", "--out", "{tmp}/file"], "--out {tmp}/file: exists and is not a"),
        (["data", "check", "--config", DEMO, "--data-root", "{tmp}/broken"],
         "{tmp}/broken/mesh/train/good/000.png: unreadable image"),
        (["train", "--config", DEMO, "--data-root", "{tmp}/spaced"],
         "category 'my parts': must be a plain name"),
        (["train", "--config", "{tmp}/binary.yaml", "--data-root", "."],
         "{tmp}/binary.yaml: cannot read the config file (not UTF-8 text)"),
        (["train", "--config", "{tmp}", "--data-root", "."],
         "{tmp}: cannot read the config file (Is a directory)"),
        (["train", "--config", "{tmp}/base5.yaml", "--data-root", "."],
         "{tmp}/base5.yaml: base must name a config file, got 5"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--set",
          "teacher.weights=package:sys"], "teacher.weights: sys is not a package of files"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--set",
          "teacher.weights={tmp}/random.safetensors"], "is not a readable safetensors file"),
        (["train", "--config", DEMO, "--data-root", ".", "--set", "data=5"],
         "data.root: data is 5, not a section"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--storage", "{tmp}/" + "x" * 300],
         "File name too long"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--storage", "{tmp}/loop"],
         "--storage {tmp}/loop: Symlink loop"),
        (["runs", "list", "--storage", ""], "--storage: empty"),
        (["train", "--config", DEMO, "--data-root", "{synth}", "--address",
          "http://admin:pw@127.0.0.1:1"], "--address http://***@127.0.0.1:1: expected auto"),
        (["train", "--resume", "run-x", "--storage", "{tmp}/store"],
         "--resume run-x: file://{tmp}/store/runs/run-x/train_spec.json is damaged"),
        (["runs", "show", "run-x", "--storage", "{tmp}/store"],
         "run-x/results.parquet: unreadable table"),
        (["tune", "--config", DEMO, "--data-root", "{synth}", "--space", "{tmp}/binary.yaml"],
         "{tmp}/binary.yaml: cannot read the search space file (not UTF-8 text)"),
        (["tune", "--config", DEMO, "--data-root", "{synth}", "--samples", "0"],
         "--samples 0: must be at least 1"),
        (["tune", "--config", DEMO, "--data-root", "{synth}", "--max-concurrent", "-1"],
         "--max-concurrent -1: must be 0 (what the cluster holds) or more"),
        (["tune", "--resume", "20990101-000000-abcdef", "--storage", "{tmp}/store"],
         "--resume 20990101-000000-abcdef: no such tune run"),
        (["export", "--checkpoint", CKPT, "--out", "{tmp}/onnx", "--opset", "99"],
         "--opset 99: the exporter writes opsets 18 to"),
        (["export", "--checkpoint", CKPT, "--out", "{tmp}/onnx", "--threshold", "nan"],
         "--threshold nan: must be a finite number"),
        (["data", "synth", "--out", "{tmp}/synth", "--size", "100000"],
         "--size 100000: must be between 32 and 8192"),
        (["data", "photos", "--out", "{tmp}/photos", "--source", "big={tmp}/bomb.png"],
         "{tmp}/bomb.png: larger than the largest accepted image"),
        (["predict", "--checkpoint", CKPT, "{tmp}/float.tif", "--out", "{tmp}/pred"],
         "{tmp}/float.tif: 32-bit float pixels are not read"),
        (["data", "check", "--config", DEMO, "--data-root", "{tmp}/dangling"],
         "{tmp}/dangling/mesh/train/good/zz.png: file not found"),
        (["data", "check", "--config", DEMO, "--data-root", "{tmp}/capital"],
         "{tmp}/capital/mesh/train/good/000.Png: unreadable image"),
    ],
)
def test_bad_input_exits_2_with_a_one_line_reason(argv, message, trained_run, synth_root,
                                                  tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a directory\n")
    (tmp_path / "section.yaml").write_text("train: 5\n")
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    (tmp_path / "big.png").write_bytes(png_header(13000, 13000))
    whole = (synth_root / "mesh" / "train" / "good" / "000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "pickled.pth").write_bytes(pickle.dumps({"weights": Path("x")}))
    broken = tmp_path / "broken" / "mesh"
    shutil.copytree(synth_root / "mesh", broken)
    (broken / "train" / "good" / "000.png").write_bytes(whole[: len(whole) // 2])
    shutil.copytree(synth_root / "mesh", tmp_path / "spaced" / "my parts")
    Image.fromarray(np.full((40, 40), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    for name in ("dangling", "capital"):
        shutil.copytree(synth_root / "mesh", tmp_path / name / "mesh")
    (tmp_path / "dangling" / "mesh" / "train" / "good" / "zz.png").symlink_to(tmp_path / "none")
    (tmp_path / "capital" / "mesh" / "train" / "good" / "000.Png").write_bytes(b"not an image")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "base5.yaml").write_text("base: 5\n")
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    run = tmp_path / "store" / "runs" / "run-x"
    run.mkdir(parents=True)
    (run / "train_spec.json").write_text('{"config": {}')
    (run / "results.parquet").write_bytes(b"PAR1 cut short")
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    values = {"tmp": str(tmp_path), "synth": str(synth_root), "run": str(trained_run[0])}
    assert main(["-q", *(a.format(**values) for a in argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(**values) in err[0], err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a directory


def test_data_check_takes_categories_and_overrides_like_train(synth_root, capsys):
    assert main(["data", "check", "--config", DEMO, "--data-root", str(synth_root),
                 "--category", "stripes", "--set", "data.image_size=64"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^stripes +60 +20 ", table, re.MULTILINE) and "mesh" not in table
    assert main(["data", "check", "--config", DEMO, "--data-root", str(synth_root),
                 "--category", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_offline_config_trains_any_category_folder_names(synth_root, tmp_path, ray_cluster):
    # A user's own MVTec-layout tree: folder names with capitals, dashes, dots and digits, and
    # a store whose path holds a space: trained, offered to the registry and reported.
    import shutil

    from memkd_ray.checkpoint import load_model

    root = tmp_path / "line"
    for source, name in (("mesh", "Line-7_A"), ("stripes", "part.B2")):
        shutil.copytree(synth_root / source, root / name)
    store = tmp_path / "my store"
    fast = ["data.image_size=128", "student.bottleneck_blocks=1",
            "student.decoder_blocks=[1,1,1]", "train.steps=10"]
    argv = ["-q", "train", "--config", str(CONFIGS / "offline.yaml"), "--data-root", str(root),
            "--category", "Line-7_A", "part.B2", "--storage", str(store)]
    for override in fast:
        argv += ["--set", override]
    assert main(argv) == 0
    (run_dir,) = (store / "runs").iterdir()
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert sorted(r["category"] for r in rows) == ["Line-7_A", "part.B2"]
    for row in rows:
        # 10 steps of 16 from 60 images (4 steps per epoch): 3 epochs, by the step budget.
        assert row["status"] == "ok" and row["benchmark"] == "mvtec" and row["epochs"] == 3
        checkpoint = store / row["checkpoint_uri"]
        assert checkpoint.parent == run_dir / "mvtec" / row["category"]
        model, loaded = load_model(checkpoint)
        assert loaded.config.train.lr_schedule == "cosine"
        assert model.normal_map_mean.abs().sum() > 0  # calibrated after training, and kept
        best = store / "registry" / "mvtec" / row["category"] / "best.json"
        assert json.loads(best.read_text())["checkpoint_uri"] == row["checkpoint_uri"]
    assert (run_dir / "report" / "index.html").is_file()
    assert main(["-q", "models", "promote", run_dir.name, "--storage", str(store)]) == 0
    assert main(["-q", "report", run_dir.name, "--storage", f"file://{store}"]) == 0


@pytest.mark.parametrize("argv", [
    ["train", "--config", str(CONFIGS / "demo.yaml"), "--data-root", "{synth}", "--category",
     "../../../../{tmp}/outside/stripes"],
    ["report", "../../outside"],
    ["runs", "show", "../../outside"],
    ["models", "show", "../.."],
    ["models", "pull", "synthetic/..", "--to", "{tmp}/pulled"],
    ["models", "pull", "synthetic/stripes", "--run", "../../outside", "--to", "{tmp}/pulled"],
    ["models", "promote", ".."],
    ["eval", "--checkpoint", "registry:../..", "--data-root", "{synth}", "--category", "mesh"],
])
def test_names_never_lead_outside_the_storage_root(argv, trained_run, synth_root, tmp_path,
                                                   capsys):
    store = trained_run[0].parent.parent
    before = sorted(str(p) for p in store.rglob("*"))
    argv = [a.format(synth=synth_root, tmp=tmp_path) for a in argv]
    assert main(["-q", *argv, "--storage", f"file://{store}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be a plain name" in err[0], err
    assert sorted(str(p) for p in store.rglob("*")) == before
    assert not any(tmp_path.iterdir())
