"""The cross-entropy math shared by :func:`logitkit.cross_entropy` (on logits)
and :func:`logitkit.linear_cross_entropy` (on hidden states): everything
about the loss that is O(N) per-token arithmetic on fp32 tensors, once the
kernels have reduced each token's row of logits to a few numbers.

With z the (scaled, soft-capped) logits of a token, p = softmax(z),
lse = logsumexp(z), y its target, w the class weights (1 without them),
W = sum_c w_c, eps the label smoothing, zeta the z-loss weight and V the
number of classes, the per-token loss is

    L = (1 - eps) w_y (lse - z_y) + (eps / V) sum_c w_c (lse - z_c) + zeta lse^2
      = (1 - eps) w_y (lse - z_y) + (eps / V) (W lse - sum_c w_c z_c) + zeta lse^2

(``torch.nn.functional.cross_entropy(z, y, weight=w, label_smoothing=eps)``
plus the z-loss), 0 at ignored tokens. Its gradient has the form of
csrc/core/linear_ce.h, for an upstream gradient g of the token:

    dL/dz_c = p_c a - beta [c = y] - sigma w_c,
    a = g ((1 - eps) w_y + (eps / V) W + 2 zeta lse),  beta = g (1 - eps) w_y,  sigma = g eps / V.

Reductions: "none", "sum", and "mean", which divides by the sum of w_y over
the non-ignored tokens (their count without class weights), as torch does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._layout import coefficient_tensor

REDUCTIONS = ("none", "mean", "sum")


class LossOptions(NamedTuple):
    """The options both losses take (checked by their public functions)."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    temperature: float


class Targets(NamedTuple):
    """The targets of N tokens, as the loss sees them."""

    target: torch.Tensor  # (N,) int64 target class, any value at ignored tokens
    valid: torch.Tensor  # (N,) bool: not ignore_index
    weight: torch.Tensor  # (N,) fp32 class weight of the target, w_y; 0 at ignored tokens
    vocab: int  # V
    total_weight: torch.Tensor | float  # W = sum_c w_c (V without class weights)


def targets(target: torch.Tensor, class_weight: torch.Tensor | None, ignore_index: int, vocab: int) -> Targets:
    """:class:`Targets` of the (N,) ``target``. (An out-of-range target reads the weight of the
    nearest class: its loss is NaN or rejected anyway.)"""
    valid = target != ignore_index
    if class_weight is None:
        return Targets(target, valid, valid.float(), vocab, float(vocab))
    safe = torch.where(valid, target, 0).clamp(0, vocab - 1)
    weights = class_weight.float()
    return Targets(target, valid, weights[safe] * valid, vocab, weights.sum())


def normaliser_from_stats(max_z: torch.Tensor, sum_exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log s, lse)`` of a softmax state (m, s): lse = m + log s, and +inf when m = +inf
    (core::Normaliser)."""
    log_s = torch.log(sum_exp)
    return log_s, torch.where(max_z == math.inf, max_z, max_z + log_s)


def entropy_from_stats(log_s: torch.Tensor, sum_exp: torch.Tensor, sum_shifted: torch.Tensor) -> torch.Tensor:
    """Entropy of a softmax state (m, s, b): H = log s - b / s (core::SoftmaxState)."""
    return log_s - sum_shifted / sum_exp


def loss_per_token(
    t: Targets, target_nll: torch.Tensor, lse: torch.Tensor, weighted_sum: torch.Tensor | None, options: LossOptions
) -> torch.Tensor:
    """The per-token loss (see the module docstring), 0 at ignored tokens.

    ``target_nll`` = lse - z_y, ``weighted_sum`` = sum_c w_c z_c (only read with label smoothing).
    """
    eps = options.label_smoothing
    loss = (1.0 - eps) * t.weight * target_nll
    if eps > 0.0:
        assert weighted_sum is not None
        loss = loss + (eps / t.vocab) * (t.total_weight * lse - weighted_sum)
    if options.z_loss > 0.0:
        loss = loss + options.z_loss * lse * lse
    return torch.where(t.valid, loss, torch.zeros_like(loss))


def check_out_dtype(out_dtype: torch.dtype | None, op: str) -> torch.dtype:
    """The dtype a loss is returned in: float32 by default, whatever the input dtype (the loss is
    computed in float32; rounding it to bf16 costs up to ~0.024 at a loss of ~10), or the
    floating-point ``out_dtype`` the caller asks for."""
    if out_dtype is None:
        return torch.float32
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"logitkit.{op}: out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")
    return out_dtype


def reduce_loss(loss: torch.Tensor, t: Targets, reduction: str) -> torch.Tensor:
    """Applies ``reduction`` to per-token losses; "mean" divides by sum w_y (0 / 0 = NaN for an
    all-ignored batch, as F.cross_entropy)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / t.weight.sum()


def upstream_per_token(grad: torch.Tensor, t: Targets, reduction: str) -> torch.Tensor:
    """The upstream gradient of each token's loss, (N,) fp32, from the gradient of the reduced
    loss (the backward of :func:`reduce_loss`)."""
    n = t.weight.shape[0]
    g = grad.float()
    if reduction == "none":
        return g.reshape(n)
    if reduction == "sum":
        return g.expand(n)
    return (g / t.weight.sum()).expand(n)


def cross_entropy_coefficients(g: torch.Tensor, t: Targets, lse: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """The backward coefficients (N, 4) [a, e = 0, beta, sigma] of the cross-entropy for the
    per-token upstream gradient ``g`` (module docstring). Ignored tokens get 0; a target outside
    [0, V) (only possible where targets are not checked on the host) gets NaN, like its loss."""
    eps, vocab = options.label_smoothing, t.vocab
    g = torch.where(t.valid, g, torch.zeros_like(g))
    in_range = (t.target >= 0) & (t.target < vocab)
    g = torch.where(t.valid & ~in_range, torch.full_like(g, math.nan), g)
    beta = g * ((1.0 - eps) * t.weight)
    a = beta
    if eps > 0.0:
        a = a + g * ((eps / vocab) * t.total_weight)
    if options.z_loss > 0.0:  # d(zeta lse^2)/dlse = 2 zeta lse (lse of ignored tokens may be anything: masked)
        a = a + g * (2.0 * options.z_loss) * torch.where(t.valid, lse, torch.zeros_like(lse))
    return coefficient_tensor(prob=a, entropy=torch.zeros_like(a), target=beta, smooth=g * (eps / vocab))


def log_prob_entropy_coefficients(
    g_log_prob: torch.Tensor, g_entropy: torch.Tensor, entropy: torch.Tensor
) -> torch.Tensor:
    """The backward coefficients (N, 4) [a, e, beta, sigma] of g_l log p_y + g_h H:
    d/dz_c [g_l (z_y - lse) + g_h H] = p_c (-g_l - g_h H - g_h (z_c - lse)) + g_l [c = y]."""
    return coefficient_tensor(
        prob=-g_log_prob - g_entropy * entropy,
        entropy=-g_entropy,
        target=-g_log_prob,
        smooth=torch.zeros_like(g_log_prob),
    )
