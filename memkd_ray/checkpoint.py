"""Checkpoints: `model.safetensors` (student and memory tensors) + `checkpoint.json`.

The JSON holds the full config, the epoch, the metrics, the teacher's identity, the package
version and the sha256 of the weights file. Loading checks the schema and the hash and never
unpickles anything.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memkd_ray import __version__
from memkd_ray.checkpoint_format import (
    FORMAT_VERSION,
    META_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    verify_checkpoint_dir,
)
from memkd_ray.config import MemKDConfig
from memkd_ray.decision import Decision
from memkd_ray.engine import TrainState
from memkd_ray.errors import CheckpointError
from memkd_ray.eval_record import RECORD_DIR
from memkd_ray.files import sha256_file
from memkd_ray.model import MemKD, create_memkd
from memkd_ray.model.teacher import TeacherWeightsError, resolve_weights_file


def teacher_weights_sha256(weights: str) -> str:
    """sha256 of the teacher weights file a config names; empty for `hub` (timm's own
    source) and `none`. Recorded at save and checked at load, so a checkpoint is rebuilt
    with exactly the teacher it was trained with, whatever path its config names."""
    if weights in ("hub", "none"):
        return ""
    path = resolve_weights_file(weights)
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    """Hashing a large teacher file once per process, not at every checkpoint."""
    return sha256_file(Path(path))


def save_checkpoint(
    directory: str | Path,
    model: MemKD,
    cfg: MemKDConfig,
    epoch: int,
    metrics: dict[str, float] | None = None,
    state: TrainState | None = None,
    category: str | None = None,
    evaluation_record: dict[str, bytes] | None = None,
    decision: Decision | None = None,
) -> Path:
    """Write a checkpoint directory atomically: it appears complete or not at all.

    With `state`, the optimiser, RNG and epoch history are saved too, so that training can
    resume exactly where it stopped (`restore_training_state`); `evaluation_record`
    (eval_record.encode_eval_record) is the test evaluation kept for the report; `decision`
    the threshold fitted after the last epoch (decision.py).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        weights = {
            k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()
        }
        save_file(weights, staging / WEIGHTS_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "category": category,
            "epoch": epoch,
            "metrics": metrics or {},
            "teacher": {
                "name": model.teacher.name,
                "weights": model.teacher.weights,
                "weights_sha256": teacher_weights_sha256(model.teacher.weights),
                "mean": model.teacher.mean.flatten().tolist(),
                "std": model.teacher.std.flatten().tolist(),
            },
            "package_version": __version__,
            "sha256": sha256_file(staging / WEIGHTS_FILE),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "decision": None if decision is None else decision.to_dict(),
        }
        if state is not None:
            meta["training_state"] = _save_training_state(state, staging / STATE_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if evaluation_record is not None:
            (staging / RECORD_DIR).mkdir()
            for name, data in evaluation_record.items():
                (staging / RECORD_DIR / name).write_bytes(data)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


@dataclass
class Checkpoint:
    directory: Path
    config: MemKDConfig
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and verify a checkpoint directory; CheckpointError names what is wrong."""
    directory = Path(directory)
    meta, config = verify_checkpoint_dir(directory)
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except SafetensorError as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unreadable safetensors "
                              f"({exc})") from None
    return Checkpoint(directory, config, meta, state)


def load_model(
    directory: str | Path, device: torch.device | str = "cpu"
) -> tuple[MemKD, Checkpoint]:
    """Rebuild the model a checkpoint was trained with and load its weights; the teacher
    normalises its input as recorded at training, whatever the defaults are now."""
    checkpoint = read_checkpoint(directory)
    _check_teacher_weights(checkpoint)
    teacher, recorded = checkpoint.config.teacher, checkpoint.meta["teacher"]
    if teacher.mean is None and "mean" in recorded:
        teacher = replace(teacher, mean=recorded["mean"], std=recorded["std"])
    model = create_memkd(replace(checkpoint.config, teacher=teacher))
    try:
        model.load_trainable_state_dict(checkpoint.state)
    except (KeyError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "mismatch" in line), lines[-1] if lines else "")
        raise CheckpointError(f"{checkpoint.directory}: the weights do not fit the model its "
                              f"config builds ({detail[:300]})") from None
    return model.to(device).eval(), checkpoint


def _check_teacher_weights(checkpoint: Checkpoint) -> None:
    """The teacher weights the config names must be the file the checkpoint was trained with
    (checkpoints from before this record carry no hash and are not checked)."""
    recorded = checkpoint.meta["teacher"].get("weights_sha256")
    if not recorded:
        return
    weights = checkpoint.config.teacher.weights
    try:
        actual = teacher_weights_sha256(weights)
    except TeacherWeightsError as exc:
        raise CheckpointError(f"{checkpoint.directory}: {exc}") from None
    if actual != recorded:
        raise CheckpointError(
            f"{checkpoint.directory / META_FILE}: teacher.weights {weights} has sha256 "
            f"{actual[:12] or '(none)'}..., the checkpoint was trained with {recorded[:12]}... "
            "(another file, or an edited checkpoint.json)")


def _save_training_state(state: TrainState, path: Path) -> dict[str, Any]:
    """Tensors to safetensors; the optimiser's param groups and the history to the JSON."""
    optimizer = state.optimizer.state_dict()
    tensors = {"rng.generator": state.generator.get_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    save_file(tensors, path)
    return {
        "sha256": sha256_file(path),
        "optimizer_param_groups": optimizer["param_groups"],
        "optimizer_scalars": scalars,
        "history": state.history,
    }


def restore_training_state(directory: str | Path, state: TrainState) -> int:
    """Load weights, optimiser, RNG and history of a checkpoint into `state`; returns the
    epoch it was taken at."""
    checkpoint = read_checkpoint(directory)
    saved = checkpoint.meta.get("training_state")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{checkpoint.directory}: holds weights only, no training state")
    path = checkpoint.directory / STATE_FILE
    if not path.is_file() or sha256_file(path) != saved.get("sha256"):
        raise CheckpointError(f"{path}: missing or sha256 mismatch (tampered or truncated)")
    tensors = load_file(path)
    per_param: dict[int, dict[str, Any]] = {
        int(k): dict(v) for k, v in saved["optimizer_scalars"].items()
    }
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            per_param.setdefault(int(param_id), {})[name] = value
    state.model.load_trainable_state_dict(checkpoint.state)
    state.optimizer.load_state_dict(
        {"state": per_param, "param_groups": saved["optimizer_param_groups"]}
    )
    state.generator.set_state(tensors["rng.generator"])
    state.history = list(saved["history"])
    state.epoch = checkpoint.meta["epoch"]
    return state.epoch
