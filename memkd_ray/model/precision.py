"""Mixed precision: the forward passes may run in bfloat16, these computations never do."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def in_float32(fn: F) -> F:
    """Run `fn` with autocast off and its half-precision tensor arguments (also inside lists
    and tuples) cast to float32; float32 and float64 arguments pass unchanged.

    Under bfloat16 autocast (8 significant bits) a cosine of two 1024-channel features, a
    softmax over memory items at a low temperature or a squared-distance sum would lose the
    small differences that anomaly maps and losses are made of; these ops cost little next to
    the convolutions, so they keep full precision. Without autocast and with float32 inputs
    this changes nothing.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(_device_type((*args, *kwargs.values())), enabled=False):
            return fn(*_widen(args), **_widen(kwargs))

    return wrapper  # type: ignore[return-value]


_HALF = (torch.bfloat16, torch.float16)


def _widen(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF else value
    if isinstance(value, (list, tuple)):
        return type(value)(_widen(v) for v in value)
    return value


def _device_type(values: tuple) -> str:
    for value in values:
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, torch.Tensor):
            return value.device.type
    raise TypeError("in_float32: the function takes no tensor argument")
