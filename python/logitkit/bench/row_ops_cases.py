"""Cases of the row ops (softmax, log_softmax, entropy, logsumexp) against the
PyTorch a user writes; the references are the float64 definitions of
:mod:`logitkit.testing.references`."""

from __future__ import annotations

import functools

import torch

import logitkit

from ..testing import references
from .registry import Case, make_logits, register, row_reduction_bytes, row_to_row_bytes


def _eager_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1)


def _eager_log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, -1)


def _eager_logsumexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, -1)


def _eager_entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy as usually written in PyTorch (float32 math, two full-size temporaries)."""
    return -(torch.softmax(x.float(), -1) * torch.log_softmax(x.float(), -1)).sum(-1)


def register_cases() -> None:
    entropy_bytes = functools.partial(row_reduction_bytes, out_dtype=torch.float32)  # always float32
    for name, fn, eager, model, default in (
        ("softmax", logitkit.softmax, _eager_softmax, row_to_row_bytes, True),
        ("log_softmax", logitkit.log_softmax, _eager_log_softmax, row_to_row_bytes, True),
        ("entropy", logitkit.entropy, _eager_entropy, entropy_bytes, True),
        ("logsumexp", logitkit.logsumexp, _eager_logsumexp, row_reduction_bytes, False),
    ):
        register(Case(name, make_logits, fn, {"eager": eager}, references.ROW_OPS[name], model, default=default))
