"""What the op modules share to register their ops with torch.library: the
argument checks every op repeats from C++ (same messages, so that
``torch.compile`` reports bad input at trace time as eager mode does), and
helpers that register a fake kernel or an autograd formula in every op
namespace (``logitkit`` and, when built, ``logitkit_emulated``).

Each op module (row_ops, sampling, cross_entropy, linear_ce) registers its own
ops with these at import time.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from ._loader import OP_NAMESPACES

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpp_float(value: float) -> str:
    """``value`` as the C++ checks print a double (``std::ostream <<``: 6 significant digits)."""
    return f"{value:g}"


def check_logits(x: torch.Tensor, op: str, arg: str, with_float64: bool = False) -> None:
    """``check_logits`` of csrc/frontend/common.h (``with_float64``: float64 is accepted too)."""
    if x.dtype not in _LOGIT_DTYPES and not (with_float64 and x.dtype == torch.float64):
        allowed = "float32, bfloat16, float16 or float64" if with_float64 else "float32, bfloat16 or float16"
        raise TypeError(f"logitkit.{op}: {arg} must be {allowed}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(
            f"logitkit.{op}: {arg} must have at least one dimension (the last one is the vocabulary), got a 0-d tensor"
        )


def check_grad(grad: torch.Tensor, op: str, arg: str) -> None:
    """``check_grad`` of csrc/frontend/common.h: an incoming gradient is a real floating-point tensor."""
    if not grad.dtype.is_floating_point:
        raise TypeError(f"logitkit.{op}: {arg} must be a real floating-point tensor, got {grad.dtype}")


def check_one_device(op: str, bound: inspect.BoundArguments) -> None:
    """Every tensor argument of ``op`` is on one device.

    The C++ entry points check this; the fake kernels must too, because a
    call mixing meta tensors with real ones dispatches to the fake kernel,
    which would otherwise hand back an uninitialised tensor on the real device.
    """
    devices = {name: value.device for name, value in bound.arguments.items() if isinstance(value, torch.Tensor)}
    if len(set(devices.values())) > 1:
        placed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"logitkit.{op}: all tensor arguments must be on one device, got {placed}")


def check_temperature(temperature: float, op: str) -> None:
    """``check_temperature`` of csrc/common/row_ops_common.h."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"logitkit.{op}: temperature must be a finite number > 0, got {cpp_float(temperature)}")


def register_fake(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` becomes the fake kernel of ``op`` in every op namespace,
    after the check that all its tensor arguments share one device."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def fake(*args: Any, **kwargs: Any) -> Any:
            check_one_device(op, signature.bind(*args, **kwargs))
            return fn(*args, **kwargs)

        for ns in OP_NAMESPACES:
            torch.library.register_fake(f"{ns}::{op}")(fake)
        return fn

    return register


def register_autograd(
    op: str, backward_for: Callable[[Any], Callable[..., Any]], setup_context: Callable[..., None]
) -> None:
    """Registers the autograd formula of ``op`` in every op namespace.

    ``backward_for(ns_ops)`` returns the backward for the namespace
    ``ns_ops`` (``torch.ops.<ns>``), so that an op's gradient runs the
    backward kernels of its own namespace.
    """
    for ns in OP_NAMESPACES:
        torch.library.register_autograd(
            f"{ns}::{op}", backward_for(getattr(torch.ops, ns)), setup_context=setup_context
        )
