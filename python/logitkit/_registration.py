"""What the op modules share to register their ops with torch.library: the
argument checks every op repeats from C++ (same messages, so that
``torch.compile`` reports bad input at trace time as eager mode does), and
helpers that register a fake kernel or an autograd formula in every op
namespace (``logitkit`` and, when built, ``logitkit_emulated``).

Each op module (row_ops, sampling, cross_entropy, linear_ce) registers its own
ops with these at import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._loader import OP_NAMESPACES

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpp_float(value: float) -> str:
    """``value`` as the C++ checks print a double (``std::ostream <<``: 6 significant digits)."""
    return f"{value:g}"


def check_logits(x: torch.Tensor, op: str, arg: str) -> None:
    """``check_logits`` of csrc/common/row_ops_common.h."""
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logitkit.{op}: {arg} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(
            f"logitkit.{op}: {arg} must have at least one dimension (the last one is the vocabulary), got a 0-d tensor"
        )


def check_temperature(temperature: float, op: str) -> None:
    """``check_temperature`` of csrc/common/row_ops_common.h."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"logitkit.{op}: temperature must be a finite number > 0, got {cpp_float(temperature)}")


def register_fake(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` becomes the fake kernel of ``op`` in every op namespace."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for ns in OP_NAMESPACES:
            torch.library.register_fake(f"{ns}::{op}")(fn)
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
