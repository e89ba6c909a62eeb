"""logitkit's Python API for the row ops over the vocabulary (last) dimension.

Every function accepts any leading shape, non-contiguous inputs, and logits in
float32, bfloat16 or float16 (all arithmetic float32); CPU tensors may also be
float64 (all arithmetic float64, for ``torch.autograd.gradcheck``). ``temperature`` T > 0
divides the logits first (z = x / T). The ops dispatch on the input's device:
CPU tensors run the vectorised multi-threaded CPU kernels, CUDA tensors the
CUDA kernels. All are differentiable (except :func:`softmax_stats`) and work
under ``torch.compile(fullgraph=True)``.

Special values (the same on every backend):

* ``-inf`` logits are masked tokens: probability 0.
* A row whose logits are all ``-inf``: logsumexp is ``-inf``; softmax,
  log_softmax and entropy are NaN (as ``torch.softmax`` gives NaN).
* A row holding ``+inf``: logsumexp is ``+inf``; softmax, log_softmax and
  entropy are NaN for the whole row.
* A NaN logit makes every output of its row NaN, even next to ``+inf`` (NaN
  wins, as in torch), and never touches other rows.
* A temperature so small that ``1 / T`` overflows float32 (``T < 2^-128``)
  divides ``x / T`` instead of multiplying by ``1 / T`` (docs/numerics.md).
* An empty vocabulary (V = 0): logsumexp ``-inf``, entropy NaN.

This module also registers the row ops' fake kernels and autograd formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _backend
from ._layout import STATS_WIDTH, StatsField, column, stats_tensor
from ._loss_math import entropy_from_stats, normaliser_from_stats
from ._registration import check_grad, check_logits, check_temperature, register_autograd, register_fake

__all__ = [
    "entropy",
    "log_softmax",
    "logsumexp",
    "merge_stats",
    "softmax",
    "softmax_stats",
    "stats_entropy",
    "stats_logsumexp",
]


def softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(x / temperature)`` over the last dimension.

    Shape (..., V) -> (..., V), same dtype as ``x``. Two streaming passes over
    each row: one builds the per-row (max, sum of exp) state with the online
    rescaling merge, one writes ``exp(z - logsumexp(z))``.
    """
    return _backend.ops().softmax(x, _temperature(temperature, "softmax"))


def log_softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(x / temperature)`` = ``z - logsumexp(z)`` over the last dimension.

    Shape (..., V) -> (..., V), same dtype as ``x``.
    """
    return _backend.ops().log_softmax(x, _temperature(temperature, "log_softmax"))


def logsumexp(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log(sum(exp(x / temperature)))`` over the last dimension, in one read pass.

    Shape (..., V) -> (...), same dtype as ``x`` (computed in float32).
    """
    return _backend.ops().logsumexp(x, _temperature(temperature, "logsumexp"))


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy in nats of ``softmax(logits / temperature)`` per row.

    Shape (..., V) -> (...), float32. One read pass over the row, keeping
    m = max z, s = sum exp(z - m) and b = sum (z - m) exp(z - m); then
    ``H = log(s) - b / s`` (equal to ``logsumexp(z) - E_p[z]``, but without
    cancellation for large logits). Backward:
    ``dH/dx = -(1/T) * p * (log p + H)``.
    """
    return _backend.ops().entropy(logits, _temperature(temperature, "entropy"))


def softmax_stats(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The mergeable per-row softmax state of ``z = x / temperature``.

    Returns float32 of shape (..., 3) holding, per row,
    ``[m, s, b] = [max z, sum exp(z - m), sum (z - m) exp(z - m)]``.
    States of disjoint vocabulary shards combine with :func:`merge_stats`
    (e.g. after an all-gather in tensor-parallel decoding); then
    :func:`stats_logsumexp` and :func:`stats_entropy` finish the job.
    Not differentiable: the output is marked so (``requires_grad`` False), and
    a backward through it raises instead of giving a silent zero gradient.
    float64 inputs (CPU) give float64 states.
    """
    return _backend.ops().softmax_stats(x, _temperature(temperature, "softmax_stats"))


def _temperature(value: Any, op: str) -> float:
    """``temperature`` as a float, or a TypeError naming it (the C++ check sees only floats)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"logitkit.{op}: temperature must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"logitkit.{op}: temperature must be a number, got {type(value).__name__}") from None


def merge_stats(stats: Sequence[torch.Tensor] | torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Merges softmax states of disjoint vocabulary shards into one state.

    ``stats`` is a sequence of (..., 3) tensors from :func:`softmax_stats`,
    or one tensor with the shards along ``dim``. Uses the rescaling merge
    ``M = max_k m_k``, ``S = sum_k s_k e^{m_k - M}``,
    ``B = sum_k e^{m_k - M} (b_k + (m_k - M) s_k)``; empty shards
    (m = -inf) contribute nothing. The result is exact up to float32 rounding:
    merging the states of a row's shards gives the state of the whole row.
    """
    if isinstance(stats, torch.Tensor):
        if dim is None:
            raise ValueError("merge_stats: pass dim= when stats is a single tensor of stacked shard states")
        st = stats.movedim(dim, 0)
    else:
        if len(stats) == 0:
            raise ValueError("merge_stats: stats is empty")
        for k, shard in enumerate(stats):
            _check_states(shard, "merge_stats")
            if shard.shape != stats[0].shape or shard.device != stats[0].device:
                first = f"{list(stats[0].shape)} on {stats[0].device}"
                raise ValueError(
                    f"merge_stats: every state must have the shape and device of stats[0] ({first}), "
                    f"stats[{k}] is {list(shard.shape)} on {shard.device}"
                )
        st = torch.stack(list(stats), 0)
    _check_states(st, "merge_stats")
    if st.dtype != torch.float64:
        st = st.float()
    m, s, b = (column(st, f) for f in (StatsField.MAX, StatsField.SUM_EXP, StatsField.SUM_SHIFTED))
    big_m = m.amax(0)
    factor = torch.where(m == -math.inf, torch.zeros_like(m), torch.exp(m - big_m))
    merged_s = (s * factor).sum(0)
    merged_b = torch.where(factor == 0, torch.zeros_like(b), factor * (b + (m - big_m) * s)).sum(0)
    return stats_tensor(max=big_m, sum_exp=merged_s, sum_shifted=merged_b)


def _check_states(stats: torch.Tensor, op: str) -> None:
    """Softmax states are real floating-point tensors of shape (..., 3)."""
    if not isinstance(stats, torch.Tensor):
        raise TypeError(f"{op}: stats must be a tensor, got {type(stats).__name__}")
    if not stats.dtype.is_floating_point:
        raise TypeError(f"{op}: stats must be a floating-point tensor of softmax states, got {stats.dtype}")
    if stats.dim() < 1 or stats.shape[-1] != STATS_WIDTH:
        raise ValueError(f"{op}: states must have a last dimension of 3, got shape {list(stats.shape)}")


def stats_logsumexp(stats: torch.Tensor) -> torch.Tensor:
    """log-sum-exp from a (..., 3) softmax state: ``m + log(s)`` (+inf if m = +inf)."""
    _check_states(stats, "stats_logsumexp")
    _, lse = normaliser_from_stats(column(stats, StatsField.MAX), column(stats, StatsField.SUM_EXP))
    return lse


def stats_entropy(stats: torch.Tensor) -> torch.Tensor:
    """Entropy in nats from a (..., 3) softmax state: ``log(s) - b / s`` (NaN if m = +inf)."""
    _check_states(stats, "stats_entropy")
    m, s, b = (column(stats, f) for f in (StatsField.MAX, StatsField.SUM_EXP, StatsField.SUM_SHIFTED))
    h = entropy_from_stats(torch.log(s), s, b)
    return torch.where(m == math.inf, torch.full_like(h, math.nan), h)


# ---------------------------------------------------------------------------
# Fake kernels (the C++ checks of csrc/common/row_op_frontends.h) and autograd
# ---------------------------------------------------------------------------


def _float64_kernels(x: torch.Tensor) -> bool:
    """Whether the kernels that ``x`` dispatches to take float64: the CPU
    kernels do; the CUDA kernels (and their emulation) do not. The fake kernel
    cannot tell the two CPU namespaces apart, so it accepts float64 on the CPU
    and the emulated op's own check rejects it at run time."""
    return x.device.type in ("cpu", "meta")


def _result_dtype(x: torch.Tensor, fixed: torch.dtype | None) -> torch.dtype:
    """The dtype of a row op's result: ``x``'s own, or the arithmetic type for
    entropy/stats (float32, float64 for float64 inputs)."""
    if fixed is None:
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else fixed


def _register_row_fake(
    op: str, arg: str, result_shape: Callable[[torch.Tensor], Sequence[int]], dtype: torch.dtype | None = None
) -> None:
    """Fake kernel of a forward row op: ``op(arg, temperature)`` -> a tensor of ``result_shape(arg)``
    (the input's dtype unless ``dtype``)."""

    def fake(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        check_logits(x, op, arg, with_float64=_float64_kernels(x))
        check_temperature(temperature, op)
        return x.new_empty(result_shape(x), dtype=_result_dtype(x, dtype))

    register_fake(op)(fake)


def _register_backward_fake(op: str, arg: str, per_row_grad: bool) -> None:
    """Fake kernel of a backward op ``op(grad, arg, temperature)`` -> the gradient of ``arg``."""

    def fake(grad: torch.Tensor, x: torch.Tensor, temperature: float) -> torch.Tensor:
        check_logits(x, op, arg, with_float64=_float64_kernels(x))
        check_temperature(temperature, op)
        check_grad(grad, op, "grad")
        expected = x.shape[:-1] if per_row_grad else x.shape
        if grad.shape != expected:
            raise ValueError(f"logitkit.{op}: grad must have shape {list(expected)}, got {list(grad.shape)}")
        return x.new_empty(x.shape)

    register_fake(op)(fake)


def _save_output(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.temperature = inputs[1] if len(inputs) > 1 else 1.0
    ctx.save_for_backward(output)


def _save_input(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.temperature = inputs[1] if len(inputs) > 1 else 1.0
    ctx.save_for_backward(inputs[0])


def _composite_backward(op: str, ns_ops: Any, grad: torch.Tensor, saved: torch.Tensor, temperature: float) -> Any:
    """The gradient of ``op`` w.r.t. its input, written with differentiable ops (c = 1/T):

    * softmax y:      dx = c * y * (g - <g, y>)
    * log_softmax y:  dx = c * (g - exp(y) * sum(g))
    * logsumexp:      dx = c * g * softmax(x)
    * entropy H:      dx = -c * g * p * (log p + H), with p log p = 0 at p = 0

    Used only when autograd records the backward itself (``create_graph=True``:
    double backward, ``gradgradcheck``); otherwise the fused backward kernel runs.
    """
    c = 1.0 / temperature
    if op == "softmax":
        return c * saved * (grad - (grad * saved).sum(-1, keepdim=True))
    if op == "log_softmax":
        return c * (grad - saved.exp() * grad.sum(-1, keepdim=True))
    if op == "logsumexp":
        return c * grad.unsqueeze(-1) * ns_ops.softmax(saved, temperature)
    log_p = ns_ops.log_softmax(saved, temperature)
    p = log_p.exp()
    h = ns_ops.entropy(saved, temperature).unsqueeze(-1)
    return -c * grad.unsqueeze(-1) * p * (log_p.masked_fill(p == 0, 0.0) + h)


def _backward_with(backward_op: str) -> Callable[[Any], Callable[..., Any]]:
    """The autograd backward calling ``backward_op(grad, saved, temperature)`` of the op's
    namespace (the fused kernel), or its composite form when the backward is itself
    differentiated."""
    forward_op = backward_op.removesuffix("_backward")

    def backward_for(ns_ops: Any) -> Callable[..., Any]:
        op = getattr(ns_ops, backward_op)

        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            (saved,) = ctx.saved_tensors
            grad = grad.to(saved.dtype)
            if torch.is_grad_enabled() and (grad.requires_grad or saved.requires_grad):
                return _composite_backward(forward_op, ns_ops, grad, saved, ctx.temperature).to(saved.dtype), None
            return op(grad, saved, ctx.temperature), None

        return backward

    return backward_for


def _mark_non_differentiable(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.mark_non_differentiable(output)


def _not_differentiable(op: str) -> Callable[[Any], Callable[..., Any]]:
    """The backward of an op whose output is marked non-differentiable (never called by autograd)."""

    def backward_for(ns_ops: Any) -> Callable[..., Any]:
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
            raise RuntimeError(f"logitkit.{op} is not differentiable")

        return backward

    return backward_for


def _register() -> None:
    def same_shape(x: torch.Tensor) -> Sequence[int]:
        return x.shape

    def per_row(x: torch.Tensor) -> Sequence[int]:
        return x.shape[:-1]

    def per_row_stats(x: torch.Tensor) -> Sequence[int]:
        return (*x.shape[:-1], STATS_WIDTH)

    _register_row_fake("softmax", "x", same_shape)
    _register_row_fake("log_softmax", "x", same_shape)
    _register_row_fake("logsumexp", "x", per_row)
    _register_row_fake("entropy", "logits", per_row, dtype=torch.float32)
    _register_row_fake("softmax_stats", "x", per_row_stats, dtype=torch.float32)
    _register_backward_fake("softmax_backward", "output", per_row_grad=False)
    _register_backward_fake("log_softmax_backward", "output", per_row_grad=False)
    _register_backward_fake("logsumexp_backward", "x", per_row_grad=True)
    _register_backward_fake("entropy_backward", "x", per_row_grad=True)
    register_autograd("softmax", _backward_with("softmax_backward"), _save_output)
    register_autograd("log_softmax", _backward_with("log_softmax_backward"), _save_output)
    register_autograd("logsumexp", _backward_with("logsumexp_backward"), _save_input)
    register_autograd("entropy", _backward_with("entropy_backward"), _save_input)
    register_autograd("softmax_stats", _not_differentiable("softmax_stats"), _mark_non_differentiable)


_register()
