"""What a checkpoint directory holds and how its `checkpoint.json` is checked, without torch.

    model.safetensors           student and memory tensors
    training_state.safetensors  optimiser moments and RNG (checkpoints taken during training)
    checkpoint.json             config, epoch, metrics, teacher, package version, sha256s,
                                the decision threshold (null before the last epoch)

The registry, the report and `models list|show` read checkpoints through this module only, so
they run where torch is not installed; checkpoint.py writes and loads the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memkd_ray import __version__
from memkd_ray.config import MemKDConfig, from_dict, validate
from memkd_ray.decision import Decision, parse_decision
from memkd_ray.errors import CheckpointError, ConfigError
from memkd_ray.files import sha256_file

WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
STATE_FILE = "training_state.safetensors"
INFERENCE_FILES = (META_FILE, WEIGHTS_FILE)
"""What a model needs to predict: copied by `models pull`."""
FORMAT_VERSION = 1
_REQUIRED = {
    "format_version": int,
    "config": dict,
    "epoch": int,
    "metrics": dict,
    "teacher": dict,
    "package_version": str,
    "sha256": str,
}


def parse_json_object(data: bytes, where: str, fields: dict[str, type]) -> dict[str, Any]:
    """A stored JSON object whose `fields` are present with their types (checkpoint.json, a
    registry card); CheckpointError names `where` and the first field that is not."""
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{where}: not valid JSON") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{where}: top level must be an object")
    for key, kind in fields.items():
        if not isinstance(parsed.get(key), kind):
            raise CheckpointError(f"{where}: field {key!r} missing or not a {kind.__name__}")
    return parsed


def parse_checkpoint_meta(data: bytes, where: str) -> dict[str, Any]:
    """checkpoint.json parsed and schema-checked; CheckpointError names `where`."""
    meta = parse_json_object(data, where, _REQUIRED)
    teacher = meta["teacher"]
    for key, kind, required in (("name", str, True), ("weights", str, True),
                                ("weights_sha256", str, False), ("mean", list, False),
                                ("std", list, False)):
        value = teacher.get(key)
        if not isinstance(value, kind) and (required or value is not None):
            raise CheckpointError(f"{where}: field 'teacher.{key}' missing or not a "
                                  f"{kind.__name__}")
    for key in ("mean", "std"):
        values = teacher.get(key)
        if values is not None and (len(values) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise CheckpointError(f"{where}: field 'teacher.{key}' must hold three numbers")
    if not isinstance(meta.get("category"), (str, type(None))):
        raise CheckpointError(f"{where}: field 'category' must be a string")
    if not isinstance(meta.get("training_state", {}), dict):
        raise CheckpointError(f"{where}: field 'training_state' must be an object")
    parse_decision(meta.get("decision"), where)
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format {meta['format_version']} is newer than "
                              f"this memkd-ray ({__version__}) reads")
    return meta


def checkpoint_decision(meta: dict[str, Any], where: str) -> Decision | None:
    """The decision a checkpoint carries; None for one trained without (or before) them."""
    return parse_decision(meta.get("decision"), where)


def verify_checkpoint_dir(directory: Path) -> tuple[dict[str, Any], MemKDConfig]:
    """checkpoint.json of a local checkpoint directory, its weights' sha256 checked and its
    config validated; CheckpointError names what is wrong."""
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (is {directory} a checkpoint directory?)")
    meta = parse_checkpoint_meta(meta_path.read_bytes(), str(meta_path))
    actual = sha256_file(weights_path)
    if actual != meta["sha256"]:
        raise CheckpointError(
            f"{weights_path}: sha256 {actual[:12]}... does not match checkpoint.json "
            f"{meta['sha256'][:12]}... (tampered or truncated)"
        )
    try:
        config = validate(from_dict(meta["config"]))
    except ConfigError as exc:
        raise CheckpointError(f"{meta_path}: bad config ({exc})") from None
    return meta, config
