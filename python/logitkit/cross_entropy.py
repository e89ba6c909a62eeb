"""Cross-entropy on logits the caller already has, built on logitkit's row kernels.

Forward: one read pass over the logits (``softmax_stats``, fp32 state per
row) plus an O(N) gather of the target logits; with label smoothing one more
read for the (weighted) sum of the logits. Backward: the gradient is written
straight into one tensor of the logits' dtype by the ``logsumexp_backward``
kernel (``a_i p_ic / T``) followed by O(N) in-place corrections, never an
extra N x V fp32 buffer.

The loss and its gradient coefficients (a, beta, sigma) are those of
:mod:`logitkit._loss_math` with z = logits / T: this is
``torch.nn.functional.cross_entropy(z, y, weight=w, label_smoothing=eps)``
plus the z-loss, for every reduction ("mean" divides the cross-entropy by
sum_i w_{y_i} over non-ignored rows, as torch does, and the z-loss by their
count, as Liger). Probability targets (``_SoftTargetCrossEntropy``) take the
same stats pass and row-blocked fp32 passes for the target-weighted sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import _backend
from . import row_ops as _row_ops  # noqa: F401  (registers the fake kernels and autograd of the row kernels used here)
from ._layout import LceCoefField, StatsField, column
from ._loss_math import (
    REDUCTIONS,
    CrossEntropyOutput,
    LossOptions,
    OutputRequest,
    Targets,
    check_out_dtype,
    check_real_grad,
    compute_dtype,
    cross_entropy_coefficients,
    loss_outputs,
    loss_per_token,
    normaliser_from_stats,
    reduce_loss,
    shifted_target,
    targets,
    upstream_per_token,
    z_loss_per_token,
)

# Rows per block of the fp32 (or fp64) transient of the row-blocked passes: ~4 MiB at a time.
_BLOCK_BYTES = 4 * 1024 * 1024


def _row_blocks(n: int, vocab: int) -> list[slice]:
    """Row slices whose (rows, V) fp32/fp64 blocks fit about :data:`_BLOCK_BYTES`."""
    step = max(1, _BLOCK_BYTES // (8 * max(1, vocab)))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _weighted_logit_sum(logits: torch.Tensor, class_weight: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """sum_c w_c z_c per row, in the loss's compute dtype (a GEMV per row block)."""
    acc = compute_dtype(logits.dtype)
    if class_weight is None:
        return logits.sum(-1, dtype=acc) / temperature
    weights = class_weight.to(acc)
    return (
        torch.cat([torch.mv(logits[rows].to(acc), weights) for rows in _row_blocks(logits.shape[0], 1)]) / temperature
    )


def _hard_target_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    class_weight: torch.Tensor | None,
    norm: tuple[torch.Tensor, torch.Tensor],
    coefficients: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """dL/dlogits = (a p_c - beta [c = y] - sigma w_c) / T, formed in fp32 per row block and
    rounded once to the logits' dtype (bf16/fp16: the per-row scale a is not rounded before the
    multiply, and a p_y - beta = beta (p_y - 1) + (a - beta) p_y with p_y - 1 = expm1(z_y - lse)
    in fp32, as csrc/core/linear_ce.h)."""
    m, log_s = norm
    a, beta, sigma = (
        column(coefficients, f)[:, None] for f in (LceCoefField.PROB, LceCoefField.TARGET, LceCoefField.SMOOTH)
    )
    w = None if class_weight is None else class_weight.float()[None]
    y = torch.where(valid, target, 0)[:, None]
    grad = torch.empty_like(logits)
    for rows in _row_blocks(logits.shape[0], logits.shape[1]):
        shifted = (logits[rows].float() / temperature - m[rows, None]) - log_s[rows, None]  # z - lse
        p = shifted.exp()
        g = torch.where(p == 0, 0.0, p * a[rows])  # masked logits: 0, not 0 * inf
        g = g - sigma[rows] * (w if w is not None else 1.0)
        s_y = shifted.gather(1, y[rows])
        w_y = 1.0 if w is None else w[0][y[rows]]
        g_y = beta[rows] * torch.expm1(s_y) + (a[rows] - beta[rows]) * s_y.exp() - sigma[rows] * w_y
        g.scatter_(1, y[rows], torch.where(valid[rows, None], g_y, g.gather(1, y[rows])))
        grad[rows] = (g / temperature).to(logits.dtype)
    return grad


class _CrossEntropy(torch.autograd.Function):
    """Hard (class index) targets. Returns the reduced loss and the per-token lse (differentiable:
    dlse/dz = p, folded into the coefficient a of p)."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        class_weight: torch.Tensor | None,
        options: LossOptions,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        namespace = _backend.namespace()
        vocab, temperature, acc = logits.shape[-1], options.temperature, compute_dtype(logits.dtype)
        stats = _backend.ops(namespace).softmax_stats(logits, temperature)  # (N, 3): one read pass
        max_z = column(stats, StatsField.MAX)
        log_s, lse = normaliser_from_stats(max_z, column(stats, StatsField.SUM_EXP))
        t = targets(target, class_weight, options.ignore_index, vocab, acc)
        # (the target gather rejects a target outside [0, V), where the host did not check it)
        z_target = logits.gather(1, torch.where(t.valid, target, 0)[:, None]).squeeze(1).to(acc) / temperature
        weighted_sum = _weighted_logit_sum(logits, class_weight, temperature) if options.label_smoothing > 0 else None
        # lse - z_y as (m - z_y) + log s: exact where z_y is near the max m, whatever |z| (lse - z_y
        # would lose ulp(lse): all logits 1e8 gave 8.0 instead of log V). A +inf logit makes m and
        # z_y (or s) non-finite: NaN, as F.cross_entropy gives.
        target_nll = (max_z - z_target) + log_s
        loss = loss_per_token(t, target_nll, lse, weighted_sum, options)
        ctx.save_for_backward(logits, target, class_weight, max_z, log_s, lse)
        ctx.config = (namespace, options)
        return reduce_loss(loss, t, options.reduction).to(out_dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        logits, target, class_weight, max_z, log_s, lse = ctx.saved_tensors
        namespace, options = ctx.config
        vocab, temperature = logits.shape[-1], options.temperature
        t = targets(target, class_weight, options.ignore_index, vocab, lse.dtype)
        g = upstream_per_token(grad_out, t, options.reduction)
        coefficients = cross_entropy_coefficients(g, t, lse, options, grad_lse)
        if logits.dtype in (torch.bfloat16, torch.float16):
            grad = _hard_target_grad(logits, target, t.valid, class_weight, (max_z, log_s), coefficients, temperature)
            return grad, None, None, None, None
        # float32/float64: a p_c / T, written by the row kernel in the logits' dtype ...
        grad = _backend.ops(namespace).logsumexp_backward(column(coefficients, LceCoefField.PROB), logits, temperature)
        # ... - beta / T at the target ...
        target_coef = (column(coefficients, LceCoefField.TARGET) / temperature).to(grad.dtype)
        grad.scatter_add_(1, torch.where(t.valid, target, 0)[:, None], -target_coef[:, None])
        if options.label_smoothing > 0.0:
            # ... - sigma w_c / T for every class, in place.
            w = (
                class_weight.to(grad.dtype)
                if class_weight is not None
                else torch.ones(vocab, device=grad.device, dtype=grad.dtype)
            )
            smooth_coef = column(coefficients, LceCoefField.SMOOTH) / temperature
            grad.addr_(smooth_coef.to(grad.dtype), w, alpha=-1)
        return grad, None, None, None, None


def _soft_target_weights(q: torch.Tensor, w: torch.Tensor | None, eps: float, acc: torch.dtype) -> torch.Tensor:
    """w_c q'_c of a row block, q' = (1 - eps) q + eps / V (torch's label smoothing of
    probability targets)."""
    q = q.to(acc)
    if eps > 0.0:
        q = (1.0 - eps) * q + eps / q.shape[-1]
    return q if w is None else q * w


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Probability targets q (N, V), as F.cross_entropy takes them: per token
    L = sum_c w_c q'_c (lse - z_c) + zeta lse^2; "mean" divides by N (torch's convention for
    probability targets, class weights or not). dL/dz_c = (Q g + 2 zeta g lse + g_lse) p_c - g w_c q'_c
    with Q = sum_c w_c q'_c; dL/dq_c = g (1 - eps) w_c (lse - z_c)."""

    @staticmethod
    def forward(ctx: Any, logits, q, class_weight, options: LossOptions, out_dtype: torch.dtype):
        namespace = _backend.namespace()
        n, vocab, temperature, acc = logits.shape[0], logits.shape[1], options.temperature, compute_dtype(logits.dtype)
        stats = _backend.ops(namespace).softmax_stats(logits, temperature)
        max_z = column(stats, StatsField.MAX)
        log_s, lse = normaliser_from_stats(max_z, column(stats, StatsField.SUM_EXP))
        w = None if class_weight is None else class_weight.to(acc)
        nll, total = [], []
        for rows in _row_blocks(n, vocab):  # sum_c w q' ((m - z_c) + log s): exact near the max
            wq = _soft_target_weights(q[rows], w, options.label_smoothing, acc)
            gap = max_z[rows, None] - logits[rows].to(acc) / temperature
            total.append(wq.sum(-1))
            nll.append(torch.where(wq == 0, 0.0, wq * gap).sum(-1) + total[-1] * log_s[rows])
        t = _all_tokens(n, vocab, logits.device, acc)
        loss = torch.cat(nll) + (z_loss_per_token(t, lse, options) if options.z_loss > 0 else 0.0)
        ctx.save_for_backward(logits, q, class_weight, max_z, log_s, lse, torch.cat(total))
        ctx.options = options
        return reduce_loss(loss, t, options.reduction).to(out_dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
        logits, q, class_weight, max_z, log_s, lse, total = ctx.saved_tensors
        options = ctx.options
        n, vocab, temperature = logits.shape[0], logits.shape[1], options.temperature
        t = _all_tokens(n, vocab, logits.device, lse.dtype)
        g = upstream_per_token(grad_out, t, options.reduction)
        a = g * total + g * (2.0 * options.z_loss) * lse
        if grad_lse is not None:
            check_real_grad(grad_lse)
            a = a + grad_lse.to(a.dtype)
        w = None if class_weight is None else class_weight.to(lse.dtype)
        grad_x = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        grad_q = torch.empty_like(q) if ctx.needs_input_grad[1] else None
        for rows in _row_blocks(n, vocab):
            shifted = (logits[rows].to(lse.dtype) / temperature - max_z[rows, None]) - log_s[rows, None]
            if grad_x is not None:
                wq = _soft_target_weights(q[rows], w, options.label_smoothing, lse.dtype)
                p = shifted.exp()
                dz = torch.where(p == 0, 0.0, p * a[rows, None]) - g[rows, None] * wq
                grad_x[rows] = (dz / temperature).to(logits.dtype)
            if grad_q is not None:
                scale = g[rows, None] * (1.0 - options.label_smoothing)
                dq = -scale * shifted if w is None else -scale * w * shifted
                grad_q[rows] = dq.to(q.dtype)
        return grad_x, grad_q, None, None, None


def _all_tokens(n: int, vocab: int, device: torch.device, dtype: torch.dtype) -> Targets:
    """:class:`Targets` of N tokens none of which is ignored, each of weight 1 (probability
    targets: "mean" divides by N)."""
    ones = torch.ones(n, device=device, dtype=dtype)
    return Targets(torch.zeros(n, dtype=torch.int64, device=device), ones.bool(), ones, vocab, float(vocab))


def _check_args(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> None:
    if logits.dim() < 1:
        raise ValueError("logitkit.cross_entropy: logits must have shape (..., V)")
    if logits.shape[-1] < 1:
        raise ValueError("logitkit.cross_entropy: logits must have at least one class (V >= 1), got V = 0")
    if target.dtype.is_floating_point:
        if target.shape != logits.shape:
            raise ValueError(
                f"logitkit.cross_entropy: probability targets must have the logits' shape {list(logits.shape)}, "
                f"got {list(target.shape)}"
            )
    elif target.dtype != torch.int64:
        raise TypeError(
            f"logitkit.cross_entropy: target must be torch.int64 (or floating-point probabilities), got {target.dtype}"
        )
    elif target.shape != logits.shape[:-1]:
        raise ValueError(
            f"logitkit.cross_entropy: target must have shape {list(logits.shape[:-1])}, got {list(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"logitkit.cross_entropy: target is on {target.device} but logits is on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"logitkit.cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"logitkit.cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"logitkit.cross_entropy: z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"logitkit.cross_entropy: softcap must be None or a finite number > 0, got {softcap}")
    vocab = logits.shape[-1]
    if class_weight is not None and (class_weight.shape != (vocab,) or class_weight.device != logits.device):
        raise ValueError(f"logitkit.cross_entropy: class_weight must have shape ({vocab},) on {logits.device}")


def _check_target_range(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises on a target outside [0, V) that is not ignore_index. It reads the target on the
    host: CPU eager only (under torch.compile and on CUDA the gather itself rejects a bad index)."""
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"logitkit.cross_entropy: target[{index}] = {int(target[index])} is outside [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )


def _softcapped(logits: torch.Tensor, softcap: float, temperature: float) -> torch.Tensor:
    """z = softcap * tanh((logits / T) / softcap), in the loss's compute dtype (autograd through
    torch's tanh; one (N, V) fp32 tensor, see :func:`cross_entropy`)."""
    return softcap * torch.tanh(logits.to(compute_dtype(logits.dtype)) / (temperature * softcap))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    shift: bool = False,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of ``logits`` (..., V) against ``target``: class indices (...) int64, or
    probabilities of the logits' shape (floating point), as ``F.cross_entropy`` takes them.

    Equal to ``F.cross_entropy(z, target, weight=class_weight, ignore_index=...,
    reduction=..., label_smoothing=...)`` plus ``z_loss * logsumexp(z)**2`` per
    non-ignored token, with ``z = logits / temperature`` and, with ``softcap``,
    ``z = softcap * tanh(z / softcap)`` (Gemma 2's final logit soft-capping, as
    :func:`linear_cross_entropy`). One read pass for the forward, and the gradient
    written directly in the logits' dtype (no N x V fp32 buffer; bf16/fp16: formed in
    fp32 per block of rows and rounded once, p_y - 1 as expm1(z_y - lse)).

    Options from other projects:

    * ``softcap``: unlike Liger's in-kernel softcap, it costs one (N, V) fp32 tensor of
      the capped logits (torch's tanh and its backward); without it nothing is copied.
    * ``return_lse=True``: also return the per-token log-sum-exp of z (float32, or float64
      for float64 logits; shape of ``target``). Differentiable, as Cut Cross-Entropy's:
      a gradient on it adds ``g_lse * softmax(z)`` to the logits' gradient, so a user's own
      z-loss on it trains.
    * ``shift=True`` (Cut Cross-Entropy's ``shift``): position t of ``logits`` (..., T, V)
      predicts ``target[..., t + 1]`` (..., T): the causal-LM shift done by shifting the
      targets (the last position predicts nothing), never a copy of the logits.
      Per-token outputs (``reduction="none"``, lse, accuracy) then have the shape of
      ``target[..., 1:]``.
    * ``return_z_loss=True`` (Liger's name and convention): return a
      :class:`CrossEntropyOutput` whose ``z_loss`` is the z-loss part of ``loss`` (which
      includes it), reduced as the loss, not differentiable (for logging).
    * ``return_token_accuracy=True`` (Liger's name): ``token_accuracy`` in the
      :class:`CrossEntropyOutput`: argmax of the logits (the lowest index among ties, as
      ``torch.argmax``) == target, over the non-ignored tokens ("mean": their fraction,
      "sum": their count, "none": 1/0 per token). Costs one more read of the logits.
    * z-loss with ``reduction="mean"``: divided by the number of non-ignored tokens, as
      Liger and PaLM, also with class weights (the cross-entropy term is divided by the
      sum of the target weights, as torch).
    * Probability targets: ``ignore_index`` does not apply (as torch); "mean" divides by
      the number of tokens, class weights or not (as torch); label smoothing mixes
      ``(1 - eps) q + eps / V`` (as torch); gradients flow into ``target`` too. Token
      accuracy is not defined for them (``ValueError``).

    The loss is computed in float32 and returned in float32 by default, for every logits
    dtype but float64 (computed and returned in float64: ``torch.autograd.gradcheck`` runs
    on it, CPU). ``out_dtype=logits.dtype`` rounds it to the logits' dtype once.
    (``F.cross_entropy`` on bf16 logits returns a bf16 loss.)

    Targets outside [0, V) that are not ``ignore_index`` raise ``ValueError`` naming the
    position on CPU; on CUDA (and under torch.compile) they are not checked on the host
    (no synchronisation): the target gather reports them as an index error.
    """
    _check_args(logits, target, class_weight, reduction, label_smoothing, z_loss, softcap)
    soft = target.dtype.is_floating_point
    if soft and (shift or return_token_accuracy):
        raise ValueError(
            "logitkit.cross_entropy: shift and return_token_accuracy take class-index targets, not probabilities"
        )
    dtype = check_out_dtype(out_dtype, "cross_entropy", logits.dtype)
    vocab = logits.shape[-1]
    labels = shifted_target(target, ignore_index) if shift else target
    logits2d, temperature = logits.reshape(-1, vocab), float(temperature)
    if softcap is not None:
        logits2d, temperature = _softcapped(logits2d, float(softcap), temperature), 1.0
    options = LossOptions(int(ignore_index), reduction, float(label_smoothing), float(z_loss), temperature)
    if soft:
        loss, lse = _SoftTargetCrossEntropy.apply(logits2d, target.reshape(-1, vocab), class_weight, options, dtype)
        t = _all_tokens(lse.shape[0], vocab, lse.device, lse.dtype)
    else:
        target1d = labels.reshape(-1)
        _check_target_range(target1d, vocab, ignore_index)
        loss, lse = _CrossEntropy.apply(logits2d, target1d, class_weight, options, dtype)
        t = targets(target1d, class_weight, options.ignore_index, vocab, lse.dtype)

    request = OutputRequest(logits.shape[:-1], shift, return_lse, return_z_loss, return_token_accuracy)
    return loss_outputs(loss, lse, t, options, lambda: logits.reshape(-1, vocab).argmax(-1) == t.target, request)
