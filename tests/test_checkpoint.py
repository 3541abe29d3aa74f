"""Checkpoint format: safetensors + JSON, verified on load, never unpickled."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memkd_ray import __version__
from memkd_ray.checkpoint import load_model, save_checkpoint
from memkd_ray.checkpoint_format import META_FILE, WEIGHTS_FILE
from memkd_ray.engine import sync_student_batchnorm
from memkd_ray.errors import CheckpointError
from memkd_ray.files import sha256_file
from memkd_ray.model import create_memkd
from memkd_ray.model.teacher import read_weights_file, resolve_weights_file
from tests.conftest import fast_config


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    cfg = fast_config("memory.items=[10,20,30]")
    model = create_memkd(cfg)
    with torch.no_grad():
        model.memories["bottleneck"].values.add_(1.5)
    directory = save_checkpoint(tmp_path / "ckpt", model, cfg, epoch=4,
                                metrics={"image_auroc": 0.9})
    return directory, model


def test_round_trip_restores_every_trainable_tensor(saved):
    directory, model = saved
    loaded, checkpoint = load_model(directory)
    original = model.trainable_state_dict()
    restored = loaded.trainable_state_dict()
    assert set(original) == set(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert checkpoint.config.memory.items == [10, 20, 30]
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["epoch"] == 4 and meta["metrics"] == {"image_auroc": 0.9}
    assert meta["teacher"]["name"] == "efficientnet_lite0"
    assert meta["package_version"] == __version__
    assert meta["sha256"] == sha256_file(directory / WEIGHTS_FILE)
    assert "memories.bottleneck.keys" in restored


def test_tampered_or_truncated_weights_are_refused(saved):
    directory, _ = saved
    weights = directory / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match checkpoint\.json"):
        load_model(directory)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="tampered or truncated"):
        load_model(directory)


def test_the_teacher_weights_are_pinned_to_the_file_trained_with(saved, tmp_path: Path):
    directory, _ = saved
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text())
    trained_with = resolve_weights_file(meta["config"]["teacher"]["weights"])
    assert meta["teacher"]["weights_sha256"] == sha256_file(trained_with)
    # checkpoint.json edited to build the teacher from another file (here: one tensor off).
    tensors = read_weights_file(trained_with)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, other)
    meta["config"]["teacher"]["weights"] = str(other)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"teacher\.weights .*other\.safetensors has "
                                              r"sha256 .*the checkpoint was trained with"):
        load_model(directory)
    # Checkpoints written before the hash was recorded still load.
    meta["config"]["teacher"]["weights"] = meta["teacher"]["weights"]
    del meta["teacher"]["weights_sha256"]
    meta_path.write_text(json.dumps(meta))
    load_model(directory)


def test_pickle_payload_is_never_loaded(saved, tmp_path: Path):
    directory, _ = saved
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    weights = directory / WEIGHTS_FILE
    weights.write_bytes(pickle.dumps(Exploit()))
    meta = json.loads((directory / META_FILE).read_text())
    meta["sha256"] = sha256_file(weights)  # a consistent but malicious checkpoint
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_model(directory)
    assert not marker.exists()


def test_malformed_json_and_missing_files(saved):
    directory, _ = saved
    meta = json.loads((directory / META_FILE).read_text())
    del meta["epoch"]
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="field 'epoch' missing"):
        load_model(directory)
    (directory / META_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: not found"):
        load_model(directory)


def test_save_replaces_atomically_and_leaves_no_staging(saved):
    directory, model = saved
    save_checkpoint(directory, model, fast_config("memory.items=[10,20,30]"), epoch=5)
    assert json.loads((directory / META_FILE).read_text())["epoch"] == 5
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("overrides", [[], ["train.augment=[crop,hflip,rot90,jitter]"]])
def test_training_state_resumes_exactly(tmp_path: Path, synth_root, overrides):
    """Train 2 epochs straight vs 1 epoch, checkpoint, restore into a fresh state, 1 more;
    with augmentation, whose draws come from the checkpointed generator, too."""
    from memkd_ray.checkpoint import restore_training_state
    from memkd_ray.data import read_category
    from memkd_ray.data.datasets import load_training_images
    from memkd_ray.engine import (
        TrainingFeatures,
        TrainState,
        epoch_batches,
        make_optimizer,
        train_one_epoch,
    )

    cfg = fast_config(*overrides)
    images = load_training_images(read_category("synthetic", synth_root, "mesh").train, 128)

    def fresh() -> TrainState:
        torch.manual_seed(0)
        model = create_memkd(cfg)
        return TrainState(model, make_optimizer(model, cfg), torch.Generator().manual_seed(0))

    def epoch(state: TrainState) -> dict:
        features = TrainingFeatures(state.model.teacher, images, torch.device("cpu"), True)
        stats = train_one_epoch(state.model, features,
                                epoch_batches(len(images), 16, seed=0, epoch=state.epoch),
                                state.optimizer, cfg, state.generator)
        state.epoch += 1
        state.history.append(stats)
        return stats

    straight = fresh()
    epoch(straight)
    expected = epoch(straight)

    interrupted = fresh()
    epoch(interrupted)
    save_checkpoint(tmp_path / "ckpt", interrupted.model, cfg, 1, state=interrupted)
    resumed = fresh()
    assert restore_training_state(tmp_path / "ckpt", resumed) == 1
    assert len(resumed.history) == 1
    again = epoch(resumed)
    for key in ("loss", "kd", "nm", "orth"):
        assert again[key] == pytest.approx(expected[key], rel=1e-5), key


def test_a_student_trained_with_synced_batchnorm_loads_as_the_plain_model(tmp_path):
    # What several GPU workers train (distributed.sync_batchnorm) must load anywhere.
    cfg = fast_config()
    model = create_memkd(cfg)
    plain = model.trainable_state_dict()
    sync_student_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.student.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.student.modules())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.teacher.modules())
    with torch.no_grad():
        for module in model.student.modules():
            if isinstance(module, torch.nn.SyncBatchNorm):
                module.running_mean.uniform_()
    trained = model.trainable_state_dict()
    assert list(trained) == list(plain)
    save_checkpoint(tmp_path / "ckpt", model, cfg, epoch=1)
    loaded, _ = load_model(tmp_path / "ckpt")
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in loaded.modules())
    for key, value in loaded.trainable_state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_a_checkpoint_loads_with_the_normalisation_it_was_trained_with(saved):
    # A checkpoint records its teacher's normalisation; loading uses the record, not today's
    # default for its config (which may have changed since, as timm's configs did for hub
    # teachers).
    directory, _ = saved
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text())
    assert meta["config"]["teacher"]["mean"] is None
    meta["teacher"]["mean"], meta["teacher"]["std"] = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_model(directory)
    assert loaded.teacher.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert loaded.teacher.std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])



def test_the_newest_complete_checkpoint_is_found_by_its_digests(tmp_path: Path):
    # What a restarted worker continues from: the newest checkpoint whose files match their
    # sha256s, not a newer one cut short by a kill, nor one without training state.
    import pyarrow.fs as pafs

    from memkd_ray.engine import TrainState, make_optimizer
    from memkd_ray.storage.layout import checkpoint_dir_name, newest_complete_checkpoint

    cfg = fast_config()
    model = create_memkd(cfg)
    state = TrainState(model, make_optimizer(model, cfg), torch.Generator().manual_seed(0))
    run_dir = tmp_path / "run" / "mesh"
    filesystem = pafs.LocalFileSystem()
    assert newest_complete_checkpoint(filesystem, str(run_dir)) is None
    for epoch in (1, 2, 3):
        state.epoch = epoch
        save_checkpoint(run_dir / checkpoint_dir_name(epoch), model, cfg, epoch, state=state)
    save_checkpoint(run_dir / checkpoint_dir_name(4), model, cfg, 4)  # weights only
    (run_dir / "stray_file").write_text("x")
    weights = run_dir / checkpoint_dir_name(3) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # an upload cut short
    assert newest_complete_checkpoint(filesystem, str(run_dir)) == str(
        run_dir / checkpoint_dir_name(2))
