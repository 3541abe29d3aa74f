"""Where and how a category's networks run: device, precision, memory layout, compilation."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from memkd_ray.config import MemKDConfig
from memkd_ray.model import MemKD
from memkd_ray.model.teacher import Teacher


def resolve_device(name: str, assigned: torch.device | None = None) -> torch.device:
    """The device `train.device` names: `auto` is the one a cluster assigned this worker, or
    else CUDA when available."""
    if name == "auto":
        if assigned is not None:
            return assigned
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype that `train.precision` / `eval.precision` mean on `device`;
    float32 means no autocast."""
    if name == "auto":
        # Only native bfloat16 (Ampere and later): emulated it is slower than float32.
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    return PRECISIONS[name]


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast the enclosed forward passes to `dtype`; float32 leaves them untouched.

    Losses, memory recall and anomaly maps opt out themselves (model/precision.py). bfloat16
    has float32's exponent range, so no gradient scaling is needed.
    """
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def use_channels_last(setting: str, device: torch.device) -> bool:
    """`train.channels_last` on `device`: `auto` is on for CUDA only, where cuDNN's tensor-core
    convolutions want NHWC; on CPU the default layout keeps today's results bit for bit."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def place_model(model: MemKD, cfg: MemKDConfig, device: torch.device) -> MemKD:
    """Move `model` to `device` in the configured memory format (in place; returns it); on
    CUDA let cuDNN pick its convolution algorithms by timing them, and make float32 IEEE
    float32.

    Call it before the optimiser takes its first step, so that Adam's moments are created in
    the parameters' layout. Inputs need no conversion: a convolution with channels-last
    weights produces channels-last outputs, so the layout propagates from the first layer.
    """
    model = model.to(device)
    if device.type == "cuda":
        # Input sizes are fixed: cuDNN may time its algorithms once per shape and keep the best.
        torch.backends.cudnn.benchmark = True
        # PyTorch runs cuDNN convolutions in TF32 (a 10-bit mantissa) by default: on an H200
        # that moved the teacher's features by up to 0.045 against the CPU. float32 stays
        # float32 (the paper's precision); bfloat16 autocast is the opt-in for speed.
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    if use_channels_last(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(objective: torch.nn.Module, cfg: MemKDConfig) -> torch.nn.Module:
    """The training objective, compiled with torch.compile if `train.compile` asks for it."""
    return torch.compile(objective) if cfg.train.compile else objective


def teacher_device(teacher: Teacher) -> torch.device:
    return next(iter(teacher.buffers())).device


