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
plus the z-loss, for every reduction ("mean" divides by sum_i w_{y_i} over
non-ignored rows, as torch does).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _backend
from . import row_ops as _row_ops  # noqa: F401  (registers the fake kernels and autograd of the row kernels used here)
from ._layout import LceCoefField, StatsField, column
from ._loss_math import (
    REDUCTIONS,
    LossOptions,
    check_out_dtype,
    cross_entropy_coefficients,
    loss_per_token,
    normaliser_from_stats,
    reduce_loss,
    targets,
    upstream_per_token,
)


def _weighted_logit_sum(logits: torch.Tensor, class_weight: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """sum_c w_c z_c per row: a GEMV over the row in fp32 (row blocks keep the fp32 copy small)."""
    if class_weight is None:
        return logits.sum(-1, dtype=torch.float32) / temperature
    weights = class_weight.float()
    return torch.cat([torch.mv(rows.float(), weights) for rows in logits.split(64)]) / temperature


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        class_weight: torch.Tensor | None,
        options: LossOptions,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        namespace = _backend.namespace()
        vocab, temperature = logits.shape[-1], options.temperature
        stats = _backend.ops(namespace).softmax_stats(logits, temperature)  # (N, 3) fp32: one read pass
        max_z = column(stats, StatsField.MAX)
        log_s, lse = normaliser_from_stats(max_z, column(stats, StatsField.SUM_EXP))
        t = targets(target, class_weight, options.ignore_index, vocab)
        # (the target gather rejects a target outside [0, V), where the host did not check it)
        z_target = logits.gather(1, torch.where(t.valid, target, 0)[:, None]).squeeze(1).float() / temperature
        weighted_sum = _weighted_logit_sum(logits, class_weight, temperature) if options.label_smoothing > 0 else None
        # lse - z_y as (m - z_y) + log s: exact where z_y is near the max m, whatever |z| (lse - z_y
        # would lose ulp(lse): all logits 1e8 gave 8.0 instead of log V). A +inf logit makes m and
        # z_y (or s) non-finite: NaN, as F.cross_entropy gives.
        target_nll = (max_z - z_target) + log_s
        loss = loss_per_token(t, target_nll, lse, weighted_sum, options)
        ctx.save_for_backward(logits, target, class_weight, lse)
        ctx.config = (namespace, options)
        return reduce_loss(loss, t, options.reduction).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target, class_weight, lse = ctx.saved_tensors
        namespace, options = ctx.config
        vocab, temperature = logits.shape[-1], options.temperature
        t = targets(target, class_weight, options.ignore_index, vocab)
        g = upstream_per_token(grad_out, t, options.reduction)
        coefficients = cross_entropy_coefficients(g, t, lse, options)
        # a p_c / T, written by the kernel into the logits' dtype ...
        prob_coef = column(coefficients, LceCoefField.PROB).to(logits.dtype)
        grad = _backend.ops(namespace).logsumexp_backward(prob_coef, logits, temperature)
        # ... - beta / T at the target ...
        target_coef = (column(coefficients, LceCoefField.TARGET) / temperature).to(grad.dtype)
        grad.scatter_add_(1, torch.where(t.valid, target, 0)[:, None], -target_coef[:, None])
        if options.label_smoothing > 0.0:
            # ... - sigma w_c / T for every class, in place.
            w = class_weight.float() if class_weight is not None else torch.ones(vocab, device=grad.device)
            smooth_coef = column(coefficients, LceCoefField.SMOOTH) / temperature
            grad.addr_(smooth_coef.to(grad.dtype), w.to(grad.dtype), alpha=-1)
        return grad, None, None, None, None


def _check_args(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
) -> None:
    if logits.dim() < 1:
        raise ValueError("logitkit.cross_entropy: logits must have shape (..., V)")
    if target.dtype != torch.int64:
        raise TypeError(f"logitkit.cross_entropy: target must be torch.int64, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"logitkit.cross_entropy: target must have shape {list(logits.shape[:-1])}, got {list(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"logitkit.cross_entropy: target is on {target.device} but logits is on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"logitkit.cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"logitkit.cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"logitkit.cross_entropy: z_loss must be >= 0, got {z_loss}")
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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against ``target`` (...) int64.

    Equal to ``F.cross_entropy(logits / temperature, target, weight=class_weight,
    ignore_index=..., reduction=..., label_smoothing=...)`` plus
    ``z_loss * logsumexp(logits / temperature)**2`` per non-ignored token, with
    one fp32 read pass for the forward and the gradient written directly in
    the logits' dtype (no N x V fp32 buffer).

    The loss is computed in float32 and returned in float32 by default, for
    every logits dtype (as transformers' loss, which upcasts the logits, and
    Cut Cross-Entropy return it; ``F.cross_entropy`` on bf16 logits returns a
    bf16 loss instead). ``out_dtype=logits.dtype`` rounds it to the logits'
    dtype once.

    Targets outside [0, V) that are not ``ignore_index`` raise ``ValueError``
    naming the position on CPU; on CUDA (and under torch.compile) they are not
    checked on the host (no synchronisation): the target gather reports them
    as an index error.
    """
    _check_args(logits, target, class_weight, reduction, label_smoothing, z_loss)
    dtype = check_out_dtype(out_dtype, "cross_entropy")
    vocab = logits.shape[-1]
    logits2d = logits.reshape(-1, vocab)
    target1d = target.reshape(-1)
    _check_target_range(target1d, vocab, ignore_index)
    options = LossOptions(int(ignore_index), reduction, float(label_smoothing), float(z_loss), float(temperature))
    loss = _CrossEntropy.apply(logits2d, target1d, class_weight, options, dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss
