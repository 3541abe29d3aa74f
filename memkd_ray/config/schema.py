"""The configuration's schema: dataclasses holding every paper default.

These defaults are the single home of the paper's settings (MemKD section 5.2): WideResNet50
teacher, 256x256 inputs, Adam lr 0.005 with betas (0.5, 0.999), batch 16, 100 epochs, N = 16
exemplars, L = 50 items per memory, lambda1 = lambda2 = 0.1. YAML files only state what
differs from these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


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
    value_init: str = "random"
    """How the memory values start: `random` (unit normal) or `features`: the teacher features
    of random positions of random training images, at the stage each memory rebuilds (Eq. 10).
    The paper states neither; random values start far from the features' scale (norms of
    tens), and Adam moves a value by about the learning rate per step."""
    lr_scale: float = 1.0
    """The memories' learning rate as a multiple of `train.lr` (the paper trains everything
    with one Adam at one rate)."""


# Where the memories sit, in decoder order (`memory.items` lists them in this order): on the
# OCBE output, after decoder stage 1, after decoder stage 2.
MEMORY_SITES = ("bottleneck", "decoder1", "decoder2")

# What `train.augment` may list (data/augmentation.py): `crop`, a random square crop of at
# least `train.augment_crop` of the side, resized back; `hflip`, `vflip`, mirrored with
# probability 1/2; `rot90`, turned by 0, 90, 180 or 270 degrees; `jitter`, brightness,
# contrast and saturation each scaled by a factor in 1 +- `train.augment_jitter`.
AUGMENTATIONS = ("crop", "hflip", "vflip", "rot90", "jitter")


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
    augment: list[str] = field(default_factory=list)
    """Augmentations of the training images (AUGMENTATIONS), drawn anew at every step for
    each image of the batch; empty (the paper's) trains on the images as they are. With any,
    the teacher's features of the batch are computed per step, not cached: a step costs one
    more teacher pass per image. The exemplars (L_NM's normal images) stay as they are, from
    the cache: augmenting them too would double that cost."""
    augment_crop: float = 0.8
    """`crop`: the smallest crop side, as a share of the image side (at most 1)."""
    augment_jitter: float = 0.1
    """`jitter`: the largest relative change of brightness, contrast and saturation."""
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
    """`auto`: the GPU Ray assigns a worker (`distributed.gpus_per_worker` > 0), else the CPU;
    in one process (engine.fit) CUDA when available. `cpu` or `cuda[:i]` force a device."""
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
class DecisionConfig:
    """The per-category threshold that says "anomalous", fitted after training on normal
    training images held out from it (memkd_ray/decision.py); the test split never chooses."""

    target_fpr: float = 0.01
    """Share of normal images the threshold is meant to flag."""
    holdout_fraction: float = 0.1
    """Share of the training images held out, untrained on, to fit the threshold; 0 trains on
    all of them and the model carries no decision (the paper's training set)."""
    min_holdout: int = 5
    """Held-out images at least, whatever the fraction (a spread needs a few)."""


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
    decision: DecisionConfig = field(default_factory=DecisionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short stable hash of the full configuration (identifies a training setup)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
