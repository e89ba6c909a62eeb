"""Tolerances against the float64 references, per op and input dtype.

An output passes when ``|out - ref| <= atol + rtol * |ref|`` element-wise
(:func:`logitkit.testing.assert_close`). For bf16/fp16 inputs the rounding
of the output to the input dtype dominates; float32 results carry float32
accumulation error only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    atol: float
    rtol: float


#: The input dtypes logitkit accepts, by their short names.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

PerDtype = Mapping[torch.dtype, Tolerance]


def _per_dtype(fp32: tuple[float, float], bf16: tuple[float, float], fp16: tuple[float, float]) -> PerDtype:
    return {torch.float32: Tolerance(*fp32), torch.bfloat16: Tolerance(*bf16), torch.float16: Tolerance(*fp16)}


#: softmax, log_softmax, logsumexp and entropy (always computed and returned in float32).
ROW_OPS: Mapping[str, PerDtype] = {
    "softmax": _per_dtype((1e-7, 2e-5), (1e-5, 8e-3), (1e-7, 1e-3)),
    "log_softmax": _per_dtype((2e-5, 2e-6), (2e-2, 8e-3), (2e-3, 1e-3)),
    "logsumexp": _per_dtype((2e-5, 2e-6), (2e-2, 8e-3), (2e-3, 1e-3)),
    "entropy": _per_dtype((2e-4, 1e-4), (2e-4, 1e-4), (2e-4, 1e-4)),
}

#: logitkit.cross_entropy on logits: the loss, and (atol scaled by max |grad|) its gradient.
CROSS_ENTROPY: PerDtype = _per_dtype((1e-5, 1e-5), (2e-2, 2e-2), (3e-3, 3e-3))

#: logitkit.linear_cross_entropy: the loss, and (atol scaled by max |grad|) the gradients.
LINEAR_CROSS_ENTROPY: PerDtype = _per_dtype((2e-5, 2e-5), (1e-2, 1e-2), (2e-3, 2e-3))

#: Top-H: where a kept count differs from the reference's, the criterion at the cut must lie within
#: ``TOP_H_CUT * (1 + |tau|)`` of tau (rounding of c_k near the threshold), or within
#: ``TOP_H_CUT_RELATIVE * |tau|`` on rows whose budget tau is tiny.
TOP_H_CUT = 1e-4
TOP_H_CUT_RELATIVE = 1e-3

#: logitkit-bench's correctness guard of the row ops (atol tiny, so the rtol checks small
#: probabilities as tightly as large log-probabilities).
BENCH_ROW_OPS: PerDtype = _per_dtype((1e-5, 1e-4), (1e-5, 2e-2), (1e-5, 2e-2))

#: logitkit-bench's guard of linear_ce (summed loss ~ N log V, and both gradients, O(1) elements):
#: for bf16/fp16 the materialised baseline rounds its logits to the input dtype, so its gradients
#: are off by a few percent of their scale; the atol covers that, the rtol the outputs' own rounding.
BENCH_LINEAR_CE: PerDtype = _per_dtype((1e-4, 1e-4), (5e-2, 2e-2), (1e-2, 2e-2))

#: :func:`logitkit.testing.assert_no_worse_than_torch`: logitkit's error may be this many times the
#: plain-PyTorch computation's own error in the same dtype.
NO_WORSE_FACTOR = 2.0
