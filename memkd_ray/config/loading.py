"""Reading configs: YAML files with `base:` links, `--set` overrides, dotted keys, types
checked against the schema (schema.py) and values against their ranges."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from memkd_ray.config.schema import AUGMENTATIONS, MemKDConfig
from memkd_ray.errors import ConfigError

_CHOICES = {
    "loss.orth": ("abs", "signed"),
    "memory.value_init": ("random", "features"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.feature_cache": ("auto", "on", "off", "device", "host"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.channels_last": ("auto", "on", "off"),
    "eval.precision": ("auto", "fp32", "bf16"),
    "eval.normal_map": ("none", "mean"),
}
# The bounds of each numeric key: (comparison, its sign, {key: bound}); a key may have several,
# and a non-finite number is refused everywhere.
_BOUNDS = (
    (operator.ge, ">=", {
        "student.bottleneck_blocks": 1, "train.epochs": 1, "train.batch_size": 1,
        "train.exemplars": 1, "train.checkpoint_every": 1, "eval.batch_size": 1,
        "eval.score_top_k": 1, "distributed.workers_per_category": 1,
        "distributed.checkpoints_to_keep": 2, "data.eyecandies_light": 0,
        "loss.lambda_nm": 0, "loss.lambda_orth": 0, "train.steps": 0, "train.eval_every": 0,
        "train.num_threads": 0, "train.feature_cache_max_gb": 0, "train.loader_workers": 0,
        "eval.gaussian_sigma": 0, "distributed.gpus_per_worker": 0,
        "distributed.max_failures": 0, "distributed.max_concurrent_categories": 0,
        "distributed.placement_timeout_s": 0, "decision.holdout_fraction": 0,
        "decision.min_holdout": 2, "train.augment_jitter": 0}),
    (operator.gt, ">", dict.fromkeys((
        "memory.temperature", "memory.lr_scale", "student.width_ratio", "train.lr",
        "train.feature_cache_device_share", "distributed.cpus_per_worker",
        "train.augment_crop", "data.folder_test_fraction", "tune.validation_normal_fraction",
        "tune.validation_defect_fraction", "decision.target_fpr"), 0)),
    (operator.le, "<=", {"data.eyecandies_light": 5, "train.feature_cache_device_share": 1,
                         "train.augment_crop": 1}),
    (operator.lt, "<", {"data.folder_test_fraction": 1, "tune.validation_normal_fraction": 0.5,
                        "tune.validation_defect_fraction": 0.5, "decision.target_fpr": 0.5,
                        "decision.holdout_fraction": 0.5, "train.augment_jitter": 1}),
)
_LISTS = {  # key: (length, smallest item, what the list holds)
    "memory.items": (3, 0, "three non-negative item counts"),
    "student.decoder_blocks": (3, 1, "three positive block counts"),
    "train.betas": (2, 0, "two numbers"),
    "eval.stage_weights": (3, 0, "three non-negative weights, not all 0"),
}


def validate(cfg: MemKDConfig) -> MemKDConfig:
    """Check value ranges that types alone cannot express; raise ConfigError naming the key."""
    raw = cfg.to_dict()
    for key, allowed in _CHOICES.items():
        if get_dotted(raw, key) not in allowed:
            raise ConfigError(f"{key}: {get_dotted(raw, key)!r} is not one of "
                              f"{', '.join(allowed)}")
    for key in sorted({key for _, _, bounds in _BOUNDS for key in bounds}):
        value = get_dotted(raw, key)
        rules = [(compare, sign, bounds[key]) for compare, sign, bounds in _BOUNDS
                 if key in bounds]
        if not math.isfinite(value) or not all(compare(value, b) for compare, _, b in rules):
            wanted = " and ".join(f"{sign} {bound}" for _, sign, bound in rules)
            raise ConfigError(f"{key} must be a finite number {wanted}, got {value!r}")
    for key, (length, smallest, what) in _LISTS.items():
        items = get_dotted(raw, key)
        if len(items) != length or not all(math.isfinite(v) and v >= smallest for v in items):
            raise ConfigError(f"{key} must list {what}")
    unknown = [name for name in cfg.train.augment if name not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"train.augment: {unknown[0]!r} is not one of {', '.join(AUGMENTATIONS)}")
    if cfg.data.image_size < 32 or cfg.data.image_size % 32:
        raise ConfigError("data.image_size must be a multiple of 32, at least 32")
    if max(cfg.eval.stage_weights) <= 0:
        raise ConfigError(f"eval.stage_weights must list {_LISTS['eval.stage_weights'][2]}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.train.device):
        raise ConfigError(f"train.device {cfg.train.device!r} is not auto, cpu or cuda[:i]")
    for key in ("mean", "std"):
        value = getattr(cfg.teacher, key)
        if value is not None and (len(value) != 3 or not all(map(math.isfinite, value))):
            raise ConfigError(f"teacher.{key} must hold three numbers (RGB)")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MemKDConfig:
    """Load a YAML config (following `base:` links), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = _read_yaml_with_bases(Path(path)) if path is not None else {}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        set_dotted(raw, key.strip(), _parse_scalar(text, key), create=True)
    return validate(from_dict(raw))


def from_dict(raw: dict[str, Any]) -> MemKDConfig:
    """Build a MemKDConfig from nested plain data, rejecting unknown keys and wrong types."""
    return _build(MemKDConfig, raw, "")


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The YAML document of a file; ConfigError, naming the file, for anything that is not a
    readable UTF-8 YAML file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the {what} ({reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` reference")
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must name a config file, got {base!r:.40}")
    return _deep_merge(_read_yaml_with_bases(path.parent / base, (*seen, path)), data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_scalar(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: cannot parse value {text!r}") from None


def get_dotted(raw: dict[str, Any], key: str) -> Any:
    """The value at a dotted key (`train.lr`; numeric parts index lists: `memory.items.0`)."""
    node, leaf = _dotted_parent(raw, key, create=False)
    return node[leaf]


def set_dotted(raw: dict[str, Any], key: str, value: Any, create: bool = False) -> None:
    """Set a dotted key; with `create`, missing sections are made (a YAML file states only
    what differs), else the key must exist."""
    node, leaf = _dotted_parent(raw, key, create)
    node[leaf] = value


def _dotted_parent(raw: dict[str, Any], key: str, create: bool) -> tuple[Any, Any]:
    """The container of a dotted key's value and the key or index there."""
    *parents, leaf = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parents):
        if not isinstance(node, (dict, list)):
            section = ".".join(parents[:depth])
            raise ConfigError(f"{key}: {section} is {node!r:.40}, not a section")
        slot = _slot(node, part, key, create)
        if create and isinstance(node, dict) and slot not in node:
            node[slot] = {}
        node = node[slot]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"{key}: {'.'.join(parents)} is {node!r:.40}, not a section")
    return node, _slot(node, leaf, key, create)


def _slot(node: Any, part: str, key: str, create: bool) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{key}: not a config key")
        return int(part)
    if part not in node and not create:
        raise ConfigError(f"{key}: not a config key")
    return part


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        section = prefix.rstrip(".") or "config"
        raise ConfigError(f"{section}: must be a mapping of keys, got {raw!r:.40}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


_KINDS = {bool: ((bool,), "true or false"), int: ((int,), "an integer"),
          float: ((int, float), "a number"), str: ((str,), "a string")}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        return _coerce(value, next(t for t in options if t is not type(None)), key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(hint)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):
        # PyYAML reads exponents without a dot (`5e-3`) as strings.
        with contextlib.suppress(ValueError):
            return float(value)
    if hint is str and isinstance(value, bool) and "on" in _CHOICES.get(key, ()):
        return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if hint not in _KINDS:
        raise ConfigError(f"{key}: unsupported type {hint}")
    types_accepted, kind = _KINDS[hint]
    if not isinstance(value, types_accepted) or (isinstance(value, bool) and hint is not bool):
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    return float(value) if hint is float else value
