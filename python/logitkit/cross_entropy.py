"""Cross-entropy on logits the caller already has, built on logitkit's row kernels.

Forward: one read pass over the logits (:func:`logitkit.softmax_stats`, fp32
state per row) plus an O(N) gather of the target logits; with label
smoothing one more read for the (weighted) sum of the logits. Backward: the
gradient is written straight into one tensor of the logits' dtype by the
``logsumexp_backward`` kernel (``A_i p_ic``) followed by O(N) in-place
corrections, never an extra N x V fp32 buffer.

With z = logits / T, p = softmax(z), lse = logsumexp(z), w = class weights
(1 if none), W = sum_c w_c, eps = label smoothing, V = number of classes:

    loss_i = (1 - eps) w_{y_i} (lse_i - z_{i y_i}) + (eps / V) sum_c w_c (lse_i - z_ic) + z_loss lse_i^2
    dloss_i / dz_ic = p_ic [(1 - eps) w_{y_i} + eps W / V + 2 z_loss lse_i]
                      - (1 - eps) w_{y_i} [c = y_i] - (eps / V) w_c

which is torch.nn.functional.cross_entropy(z, y, weight=w, label_smoothing=eps)
plus the z-loss, for every reduction ("mean" divides by sum_i w_{y_i} over
non-ignored rows, as torch does).
"""
from __future__ import annotations

import torch

from . import ops as _api  # noqa: F401  (registers fake kernels and autograd of the row ops)

_REDUCTIONS = ("none", "mean", "sum")


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, class_weight, ignore_index, label_smoothing, z_loss, temperature, reduction):
        ops = torch.ops.logitkit
        vocab = logits.shape[-1]
        stats = ops.softmax_stats(logits, temperature)  # (N, 3) fp32: one read pass
        lse = torch.where(stats[:, 0] == float("inf"), stats[:, 0], stats[:, 0] + torch.log(stats[:, 1]))
        valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        z_target = logits.gather(1, safe_target[:, None]).squeeze(1).float() / temperature
        weights = class_weight.float() if class_weight is not None else None
        w_target = (weights[safe_target] if weights is not None else torch.ones_like(lse)) * valid
        loss = (1.0 - label_smoothing) * w_target * (lse - z_target)
        total_weight = weights.sum() if weights is not None else torch.tensor(float(vocab), device=lse.device)
        if label_smoothing > 0.0:
            # sum_c w_c z_ic (a GEMV over the row, fp32 accumulation)
            if weights is not None:  # row blocks keep the fp32 copy small
                weighted_sum = torch.cat([torch.mv(rows.float(), weights) for rows in logits.split(64)]) / temperature
            else:
                weighted_sum = logits.sum(-1, dtype=torch.float32) / temperature
            loss = loss + (label_smoothing / vocab) * valid * (total_weight * lse - weighted_sum)
        if z_loss > 0.0:
            loss = loss + z_loss * valid * lse * lse
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if reduction == "none":
            result = loss
        elif reduction == "sum":
            result = loss.sum()
        else:
            result = loss.sum() / w_target.sum()
        ctx.save_for_backward(logits, safe_target, valid, w_target, lse, weights)
        ctx.params = (label_smoothing, z_loss, temperature, reduction, total_weight)
        return result.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        logits, safe_target, valid, w_target, lse, weights = ctx.saved_tensors
        label_smoothing, z_loss, temperature, reduction, total_weight = ctx.params
        vocab = logits.shape[-1]
        g = grad_out.float()
        zero = torch.zeros_like(lse)
        if reduction == "none":
            g_rows = torch.where(valid, g, zero)
        elif reduction == "sum":
            g_rows = torch.where(valid, g.expand_as(lse), zero)
        else:  # an all-ignored batch has loss NaN (0/0, as torch) but gradient 0
            g_rows = torch.where(valid, (g / w_target.sum()).expand_as(lse), zero)
        # A_i p_ic / T, written by the kernel into the logits' dtype.
        scale = g_rows * ((1.0 - label_smoothing) * w_target + label_smoothing * total_weight / vocab
                          + 2.0 * z_loss * torch.where(valid, lse, torch.zeros_like(lse)))
        grad = torch.ops.logitkit.logsumexp_backward(scale.to(logits.dtype), logits, temperature)
        # - (1 - eps) w_y g / T at the target
        correction = ((1.0 - label_smoothing) * w_target * g_rows / temperature).to(grad.dtype)
        grad.scatter_add_(1, safe_target[:, None], -correction[:, None])
        if label_smoothing > 0.0:
            # - (eps / V) w_c g / T for every class, in place
            w = weights if weights is not None else torch.ones(vocab, device=grad.device)
            grad.addr_((g_rows * label_smoothing / (vocab * temperature)).to(grad.dtype), w.to(grad.dtype), alpha=-1)
        return grad, None, None, None, None, None, None, None


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
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against ``target`` (...) int64.

    Equal to ``F.cross_entropy(logits / temperature, target, weight=class_weight,
    ignore_index=..., reduction=..., label_smoothing=...)`` plus
    ``z_loss * logsumexp(logits / temperature)**2`` per non-ignored token, with
    one fp32 read pass for the forward and the gradient written directly in
    the logits' dtype (no N x V fp32 buffer). Returns the logits' dtype.

    Targets outside [0, V) that are not ``ignore_index`` raise ``ValueError``
    naming the position on CPU; on CUDA (and under torch.compile) they are not
    checked on the host (no synchronisation): the target gather reports them
    as an index error.
    """
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
    if reduction not in _REDUCTIONS:
        raise ValueError(f"logitkit.cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"logitkit.cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"logitkit.cross_entropy: z_loss must be >= 0, got {z_loss}")
    vocab = logits.shape[-1]
    if class_weight is not None and (class_weight.shape != (vocab,) or class_weight.device != logits.device):
        raise ValueError(f"logitkit.cross_entropy: class_weight must have shape ({vocab},) on {logits.device}")
    logits2d = logits.reshape(-1, vocab)
    target1d = target.reshape(-1)
    # The range check reads the target on the host: CPU eager only (under
    # torch.compile and on CUDA the gather itself rejects a bad index).
    if logits.device.type == "cpu" and target1d.numel() > 0 and not torch.compiler.is_compiling():
        bad = (target1d != ignore_index) & ((target1d < 0) | (target1d >= vocab))
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"logitkit.cross_entropy: target[{index}] = {int(target1d[index])} is outside [0, {vocab}) "
                f"and is not ignore_index ({ignore_index})"
            )
    loss = _CrossEntropy.apply(logits2d, target1d, class_weight, ignore_index, float(label_smoothing), float(z_loss),
                               float(temperature), reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss
