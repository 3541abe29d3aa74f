"""Typed configuration: dataclasses holding every paper default, YAML loading, overrides.

The dataclass defaults below are the single home of the paper's settings (MemKD section 5.2):
WideResNet50 teacher, 256x256 inputs, Adam lr 0.005 with betas (0.5, 0.999), batch 16,
100 epochs, N = 16 exemplars, L = 50 items per memory, lambda1 = lambda2 = 0.1.
YAML files only state what differs from these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memkd_ray.errors import ConfigError


@dataclass
class DataConfig:
    benchmark: str = "mvtec"
    """Reader of the benchmark layout: `mvtec`, `mpdd`, `synthetic` and `photos` (MVTec
    layout), `visa`, `mvtec3d`, `eyecandies` or `folder` (docs/DATASETS.md)."""
    root: str | None = None
    """Directory holding one sub-directory per category; `--data-root` sets it."""
    categories: list[str] = field(default_factory=list)
    """Categories that `--category all` trains; empty means every category found under root."""
    image_size: int = 256
    eyecandies_light: int = 0
    """Eyecandies only: which of the six renders `NNN_image_K.png` to use (0 all spotlights,
    1-4 one spotlight, 5 global light box); the paper does not say which it used."""
    folder_test_fraction: float = 0.2
    """Folder benchmark only: share of `good/` images held out (seeded) for the test split."""


@dataclass
class TeacherConfig:
    name: str = "wide_resnet50_2.tv_in1k"
    """Any timm backbone with `features_only` support and four stages at strides 4-32, with an
    optional pretrained tag. The paper's teacher is torchvision's ImageNet WideResNet50 (the
    weights RD and MemKD load through torchvision), which timm names `wide_resnet50_2.tv_in1k`;
    timm's untagged `wide_resnet50_2` resolves to its own `racm_in1k` training instead."""
    weights: str = "hub"
    """`hub` (timm pretrained download), `none` (random, for speed tests), `package:<module>`
    (a weights file shipped inside an installed Python package) or a path to a weights file."""
    mean: list[float] | None = None
    """Input normalisation; None takes the weights' own (see model/teacher.py)."""
    std: list[float] | None = None


@dataclass
class StudentConfig:
    bottleneck_blocks: int = 3
    decoder_blocks: list[int] = field(default_factory=lambda: [3, 4, 6])
    """Residual blocks per decoder stage, deepest first (RD's de_wide_resnet50_2)."""
    width_ratio: float = 0.5
    """Inner width of a residual block over its output channels; 0.5 is WRN50's width 128."""


@dataclass
class MemoryConfig:
    enabled: bool = True
    """False gives the Reverse Distillation baseline (no NR Memory, no NEL)."""
    items: list[int] = field(default_factory=lambda: [50, 50, 50])
    """Key/value pairs per memory in decoder order (bottleneck, stage 1, stage 2); 0 = off."""
    temperature: float = 1.0
    """Softmax temperature of the cosine addressing (Eq. 5 and 8 use 1.0)."""


@dataclass
class LossConfig:
    lambda_nm: float = 0.1
    """lambda1 of Eq. 11, weight of the normality memorization loss; 0 switches it off."""
    lambda_orth: float = 0.1
    """lambda2 of Eq. 11, weight of the pairwise orthogonal loss; 0 switches it off."""
    orth: str = "abs"
    """`abs` penalises |cos(k, v)|; `signed` is Eq. 7 as printed (drives keys and values
    anti-parallel instead of orthogonal)."""


@dataclass
class TrainConfig:
    epochs: int = 100
    steps: int = 0
    """Optimiser steps to train for, whatever the training set's size; 0 trains for `epochs`.
    A category's epochs are then ceil(steps / steps per epoch). An epoch of a small training
    set is only a few steps (80 images at batch 16: 5), so a budget in epochs gives it little
    training and one in steps does not."""
    batch_size: int = 16
    lr: float = 0.005
    lr_schedule: str = "constant"
    """`constant` (the paper's) or `cosine`: from `lr` at the first epoch towards 0 at the last,
    set once per epoch."""
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    exemplars: int = 16
    """N of the normality embedding learning: normal images drawn per step (Sec. 4.2)."""
    seed: int = 0
    feature_cache: str = "auto"
    """Where the frozen teacher's training features are kept: `off` (recomputed every step),
    `device` (on the training device), `host` (host memory; on CUDA each batch is gathered
    into pinned memory and copied asynchronously), `on` (device if it fits in
    `feature_cache_device_share` of the free device memory, else host) or `auto` (as `on`,
    but only if the cache fits in `feature_cache_max_gb`; recomputed otherwise)."""
    feature_cache_max_gb: float = 4.0
    """Budget for `auto`: the cache is used only if it fits in this many GiB."""
    feature_cache_device_share: float = 0.5
    """`auto`/`on` on CUDA: the largest share of the free GPU memory (measured when the cache
    is built) the cache may take on the device; the rest is left for the training step."""
    precision: str = "fp32"
    """`fp32` (the paper's), `bf16` (autocast of the forward passes to bfloat16; losses stay
    float32) or `auto`: bf16 on CUDA devices with native bfloat16 support, fp32 otherwise.
    bf16 is opt-in: its parity with fp32 on the paper's benchmarks has not been measured."""
    channels_last: str = "auto"
    """`on` (or true), `off` (or false) or `auto` (on for CUDA, off on CPU): keep the
    networks' weights in the channels-last (NHWC) memory format, which cuDNN's tensor-core
    convolutions need."""
    compile: bool = False
    """Compile the training step (student forward and losses) with torch.compile."""
    loader_workers: int = 0
    """Processes decoding images (the training set once, test images at every evaluation);
    0 decodes in the calling process."""
    eval_every: int = 0
    """Evaluate on the test split every k epochs (0: only after the last epoch)."""
    checkpoint_every: int = 10
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda[:i]`."""
    num_threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""


@dataclass
class EvalConfig:
    gaussian_sigma: float = 4.0
    """Sigma of the Gaussian filter g of Eq. 4."""
    stage_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Weight of each stage's distance in the anomaly map, shallow first; Eq. 4 sums them
    (all 1). 0 leaves a stage out of the map (it is still distilled)."""
    score_top_k: int = 1
    """The image score is the mean of the k largest values of its anomaly map; 1 is the map's
    maximum (the paper's). A few hundred pixels of a 256 px map (100 is 0.15 %) still cover
    the smallest defects, and one hot pixel of a normal image no longer decides its score."""
    normal_map: str = "none"
    """`none` (the paper's) or `mean`: subtract from every anomaly map, pixel by pixel, the
    mean map of the training images, computed after training and kept in the checkpoint
    (engine.calibrate_normal_map)."""
    batch_size: int = 16
    precision: str = "fp32"
    """`fp32`, `bf16` or `auto` (as `train.precision`) for evaluation and prediction. fp32 by
    default so that reported metrics do not depend on the hardware; the anomaly maps (cosine
    distances, up-sampling, Gaussian filter) are float32 either way."""


@dataclass
class DistributedConfig:
    """Ray Train: one worker group per category, data-parallel inside it."""

    workers_per_category: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    """0 trains on CPU; a fraction lets several workers share one GPU."""
    max_failures: int = 2
    """Worker-group restarts per category, each resuming from the last checkpoint."""
    checkpoints_to_keep: int = 2
    """At least 2: a restore after a hard kill must not find its checkpoint deleted."""
    max_concurrent_categories: int = 0
    """0: as many categories at once as the cluster's CPUs/GPUs hold; the rest queue."""
    sync_batchnorm: bool = True
    """With several GPU workers per category, the student's BatchNorm uses the statistics of
    the global batch (SyncBatchNorm), as one worker holding the whole batch would. CPU workers
    (gloo) keep per-worker statistics: torch has no SyncBatchNorm on CPU."""
    placement_timeout_s: float = 300.0
    """How long a category waits for its worker group's resources before it fails; 0 waits
    forever (an autoscaling cluster adding GPU nodes)."""


@dataclass
class TuneConfig:
    """Hyper-parameter search: the validation split that selection uses instead of the test."""

    validation_normal_fraction: float = 0.1
    """Share of the normal training images held out, untouched, for validation."""
    validation_defect_fraction: float = 0.1
    """Share held out to carry synthetic defects (cut-paste, scratches, stains)."""


@dataclass
class MemKDConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short stable hash of the full configuration (identifies a training setup)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


_CHOICES = {
    "loss.orth": ("abs", "signed"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.feature_cache": ("auto", "on", "off", "device", "host"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.channels_last": ("auto", "on", "off"),
    "eval.precision": ("auto", "fp32", "bf16"),
    "eval.normal_map": ("none", "mean"),
}


def validate(cfg: MemKDConfig) -> MemKDConfig:
    """Check value ranges that types alone cannot express; raise ConfigError naming the key."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    checks = [
        ("data.image_size", cfg.data.image_size >= 32 and cfg.data.image_size % 32 == 0,
         "must be a multiple of 32, at least 32"),
        ("data.eyecandies_light", 0 <= cfg.data.eyecandies_light <= 5,
         "must be 0..5 (the Eyecandies render index K of NNN_image_K.png)"),
        ("data.folder_test_fraction", 0 < cfg.data.folder_test_fraction < 1,
         "must be between 0 and 1 (exclusive)"),
        ("memory.items", len(cfg.memory.items) == 3 and all(n >= 0 for n in cfg.memory.items),
         "must list three non-negative item counts"),
        ("memory.temperature", cfg.memory.temperature > 0, "must be positive"),
        ("student.decoder_blocks",
         len(cfg.student.decoder_blocks) == 3 and all(n >= 1 for n in cfg.student.decoder_blocks),
         "must list three positive block counts"),
        ("student.bottleneck_blocks", cfg.student.bottleneck_blocks >= 1, "must be positive"),
        ("student.width_ratio", cfg.student.width_ratio > 0, "must be positive"),
        ("loss.lambda_nm", cfg.loss.lambda_nm >= 0, "must be non-negative"),
        ("loss.lambda_orth", cfg.loss.lambda_orth >= 0, "must be non-negative"),
        ("train.epochs", cfg.train.epochs >= 1, "must be positive"),
        ("train.steps", cfg.train.steps >= 0, "must be non-negative"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be positive"),
        ("train.lr", cfg.train.lr > 0, "must be positive"),
        ("train.betas", len(cfg.train.betas) == 2, "must hold two numbers"),
        ("train.exemplars", cfg.train.exemplars >= 1, "must be positive"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 1, "must be positive"),
        ("train.eval_every", cfg.train.eval_every >= 0, "must be non-negative"),
        ("train.feature_cache_max_gb", cfg.train.feature_cache_max_gb >= 0,
         "must be non-negative"),
        ("train.feature_cache_device_share", 0 < cfg.train.feature_cache_device_share <= 1,
         "must be in (0, 1]"),
        ("train.loader_workers", cfg.train.loader_workers >= 0, "must be non-negative"),
        ("eval.gaussian_sigma", cfg.eval.gaussian_sigma >= 0, "must be non-negative"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, "must be positive"),
        ("eval.score_top_k", cfg.eval.score_top_k >= 1, "must be positive"),
        ("eval.stage_weights",
         len(cfg.eval.stage_weights) == 3 and min(cfg.eval.stage_weights) >= 0
         and max(cfg.eval.stage_weights) > 0,
         "must list three non-negative weights, not all 0"),
        ("distributed.workers_per_category", cfg.distributed.workers_per_category >= 1,
         "must be positive"),
        ("distributed.cpus_per_worker", cfg.distributed.cpus_per_worker > 0, "must be positive"),
        ("distributed.gpus_per_worker", cfg.distributed.gpus_per_worker >= 0,
         "must be non-negative"),
        ("distributed.max_failures", cfg.distributed.max_failures >= 0, "must be non-negative"),
        ("distributed.placement_timeout_s", cfg.distributed.placement_timeout_s >= 0,
         "must be non-negative (0 waits forever)"),
        ("distributed.checkpoints_to_keep", cfg.distributed.checkpoints_to_keep >= 2,
         "must be at least 2"),
        ("tune.validation_normal_fraction", 0 < cfg.tune.validation_normal_fraction < 0.5,
         "must be between 0 and 0.5"),
        ("tune.validation_defect_fraction", 0 < cfg.tune.validation_defect_fraction < 0.5,
         "must be between 0 and 0.5"),
        ("distributed.max_concurrent_categories", cfg.distributed.max_concurrent_categories >= 0,
         "must be non-negative"),
    ]
    for key, ok, reason in checks:
        if not ok:
            raise ConfigError(f"{key} {reason}")
    for key in ("mean", "std"):
        value = getattr(cfg.teacher, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"teacher.{key} must hold three numbers (RGB)")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MemKDConfig:
    """Load a YAML config (following `base:` links), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = _read_yaml_with_bases(Path(path)) if path is not None else {}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(raw, key.strip(), _parse_scalar(text, key))
    return validate(from_dict(raw))


def from_dict(raw: dict[str, Any]) -> MemKDConfig:
    """Build a MemKDConfig from nested plain data, rejecting unknown keys and wrong types."""
    return _build(MemKDConfig, raw, "")


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` reference")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
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


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[leaf] = value


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


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = next(t for t in options if t is not type(None))
        return _coerce(value, inner, key)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML reads exponents without a dot (`5e-3`) as strings.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) and "on" in _CHOICES.get(key, ()):
            # YAML 1.1 reads a bare on/off (and true/false) as a boolean.
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")
