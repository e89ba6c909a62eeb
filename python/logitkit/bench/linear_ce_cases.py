"""The ``linear_ce`` case: linear cross-entropy forward + backward from hidden
states, against the materialised loss and PyTorch's chunked
``F.linear_cross_entropy``. Rows = tokens N, vocab = V, hidden size D from
:class:`~logitkit.bench.registry.CaseParams` (``--hidden``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import logitkit

from ..testing import references, tolerances
from .registry import DEFAULT_PARAMS, LOGIT_SCALE, Case, CaseParams, itemsize, register


def make_linear_ce_inputs(
    rows: int, vocab: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, params: CaseParams
) -> tuple:
    """hidden (N, D) ~ N(0, 1), weight (V, D) ~ N(0, (LOGIT_SCALE^2 / D)) so that the logits have
    std :data:`~logitkit.bench.registry.LOGIT_SCALE`, both in ``dtype``; target (N,) uniform in [0, V)."""
    d = params.hidden
    hidden = torch.randn(rows, d, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, d, device=device, generator=gen) * (LOGIT_SCALE / math.sqrt(d))).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    return hidden, weight, target


def forward_backward(loss_fn: Callable[..., Any]) -> Callable[..., tuple]:
    """``(hidden, weight, target) -> (loss, grad_hidden, grad_weight)`` of a summed loss: one
    forward and one backward, as a training step runs them."""

    def step(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple:
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            loss = loss_fn(h, w, target)
            loss.backward()
        return loss.detach(), h.grad, w.grad

    return step


def linear_ce_bytes(rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS) -> int:
    """Bytes model of linear cross-entropy forward + backward: read hidden, weight and target once,
    write grad_hidden and grad_weight once (no N x V traffic at all)."""
    return 2 * (rows + vocab) * params.hidden * itemsize(dtype) + rows * 8


def linear_ce_flops(rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS) -> int:
    """FLOP model: the three GEMMs of the materialised loss (logits, grad_hidden, grad_weight),
    2 N D V each. (logitkit recomputes the logits in the backward: 8 N D V in all.)"""
    return 6 * rows * vocab * params.hidden


def gemm_roofline(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple:
    """The roofline of the loss: its three GEMMs alone with ``torch.mm`` in the input dtype
    (logits = h W^T, then the gradient GEMMs with the logits standing in for dL/dz), 6 N D V
    flops as the GFLOP/s column counts them."""
    logits = hidden @ weight.T
    return logits @ weight, logits.T @ hidden


def register_cases() -> None:
    """``linear_ce``: loss (reduction "sum", so gradients are O(1) for the guard) and its gradients
    for hidden and weight. Baselines: the materialised ``F.cross_entropy(hidden @ weight.T,
    target)`` in the input dtype, the same on float32 logits (``(hidden @ weight.T).float()``, as
    transformers' loss path upcasts them), and PyTorch's chunked ``F.linear_cross_entropy`` with its
    default ``LinearCrossEntropyOptions()`` when this torch has it. Reference: the materialised
    loss in float64 (:func:`logitkit.testing.references.linear_cross_entropy`). Roofline (timed,
    not checked): the three GEMMs with ``torch.mm`` in the input dtype (:func:`gemm_roofline`)."""
    baselines = {
        "materialised": forward_backward(lambda h, w, t: F.cross_entropy(h @ w.T, t, reduction="sum")),
        # the GEMM's logits upcast before the loss, as transformers' loss path does: log-softmax
        # and its gradient in float32 (for float32 inputs the same computation as "materialised")
        "materialised-fp32-logits": forward_backward(
            lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="sum")
        ),
    }
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is not None and hasattr(F, "linear_cross_entropy"):
        baselines["torch-chunked"] = forward_backward(
            lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="sum", options=options())
        )
    ours = forward_backward(lambda h, w, t: logitkit.linear_cross_entropy(h, w, t, reduction="sum"))
    reference = forward_backward(functools.partial(references.linear_cross_entropy, reduction="sum"))
    register(
        Case(
            "linear_ce",
            make_linear_ce_inputs,
            ours,
            baselines,
            reference,
            linear_ce_bytes,
            tolerance=tolerances.BENCH_LINEAR_CE,
            default=False,
            flops_model=linear_ce_flops,
            memory_excludes_outputs=True,
            max_repeats=3,
            rooflines={"torch.mm x3": gemm_roofline},
        )
    )
