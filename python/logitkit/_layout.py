"""Column layouts of the fp32 per-row tensors the kernels exchange with Python.

They mirror the C++ enums: ``softmax_stats`` returns (..., 3) rows in
:class:`StatsField` order (``core::SoftmaxState``: m, s, b); the linear
cross-entropy ops take and return per-token tensors in
:class:`LceStateField`, :class:`NormaliserField` and :class:`LceCoefField`
order (``LceStateField``, ``core::Normaliser`` and ``LceCoefField`` in
csrc/core/linear_ce.h). Python code indexes these tensors by name only.
"""

from __future__ import annotations

import enum

import torch


class StatsField(enum.IntEnum):
    """Columns of a softmax state: m = max z, s = sum exp(z - m), b = sum (z - m) exp(z - m)."""

    MAX = 0
    SUM_EXP = 1
    SUM_SHIFTED = 2


STATS_WIDTH = len(StatsField)


class LceStateField(enum.IntEnum):
    """Columns of the per-token forward state of ``linear_ce_stats`` (``kLceMax`` ... in C++):
    the softmax state of z, the target's z (NaN when the target is not in [0, V)) and the
    class-weighted sum of z over the vocabulary (label smoothing)."""

    MAX = 0
    SUM_EXP = 1
    SUM_SHIFTED = 2
    TARGET_LOGIT = 3
    WEIGHTED_SUM = 4


LCE_STATE_WIDTH = len(LceStateField)


class NormaliserField(enum.IntEnum):
    """Columns of the per-token normaliser ``linear_ce_backward`` takes: m and log s (lse = m + log s)."""

    MAX = 0
    LOG_SUM_EXP = 1


class LceCoefField(enum.IntEnum):
    """Columns of the per-token backward coefficients (a, e, beta, sigma) of
    ``dL/dz_c = p_c (a + e (z_c - lse)) - beta [c = y] - sigma w_c`` (``kLceCoefProb`` ... in C++)."""

    PROB = 0
    ENTROPY = 1
    TARGET = 2
    SMOOTH = 3


LCE_COEF_WIDTH = len(LceCoefField)


def column(t: torch.Tensor, field: enum.IntEnum) -> torch.Tensor:
    """The column ``field`` of a (..., width) per-row tensor."""
    return t[..., int(field)]


# Builders of the per-row tensors, one argument per field (in field order).


def stats_tensor(*, max: torch.Tensor, sum_exp: torch.Tensor, sum_shifted: torch.Tensor) -> torch.Tensor:
    """A (..., 3) softmax state in :class:`StatsField` order."""
    return torch.stack([max, sum_exp, sum_shifted], -1)


def normaliser_tensor(*, max: torch.Tensor, log_sum_exp: torch.Tensor) -> torch.Tensor:
    """A (..., 2) normaliser in :class:`NormaliserField` order."""
    return torch.stack([max, log_sum_exp], -1)


def coefficient_tensor(
    *, prob: torch.Tensor, entropy: torch.Tensor, target: torch.Tensor, smooth: torch.Tensor
) -> torch.Tensor:
    """A (..., 4) coefficient tensor in :class:`LceCoefField` order."""
    return torch.stack([prob, entropy, target, smooth], -1)
