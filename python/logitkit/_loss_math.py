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

Reductions: "none", "sum", and "mean", which divides the cross-entropy by the
sum of w_y over the non-ignored tokens (their count without class weights), as
torch does, and the z-loss by the number of non-ignored tokens, as Liger and
PaLM do (the z-loss is a penalty on every token's normaliser, not a class-weighted
term; with class weights the two divisors differ). The z-loss term of a token is
therefore scaled by ``zeta_scale = sum w_y / count`` under "mean" with class
weights (1 otherwise) before the common division by sum w_y.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def targets(
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    ignore_index: int,
    vocab: int,
    dtype: torch.dtype = torch.float32,
) -> Targets:
    """:class:`Targets` of the (N,) ``target``, weights in ``dtype`` (the loss's compute dtype:
    float32, or float64 for float64 inputs). (An out-of-range target reads the weight of the
    nearest class: its loss is NaN or rejected anyway.)"""
    valid = target != ignore_index
    if class_weight is None:
        return Targets(target, valid, valid.to(dtype), vocab, float(vocab))
    safe = torch.where(valid, target, 0).clamp(0, vocab - 1)
    weights = class_weight.to(dtype)
    return Targets(target, valid, weights[safe] * valid, vocab, weights.sum())


def normaliser_from_stats(max_z: torch.Tensor, sum_exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log s, lse)`` of a softmax state (m, s): lse = m + log s, and +inf when m = +inf
    (core::Normaliser)."""
    log_s = torch.log(sum_exp)
    return log_s, torch.where(max_z == math.inf, max_z, max_z + log_s)


def entropy_from_stats(log_s: torch.Tensor, sum_exp: torch.Tensor, sum_shifted: torch.Tensor) -> torch.Tensor:
    """Entropy of a softmax state (m, s, b): H = log s - b / s (core::SoftmaxState)."""
    return log_s - sum_shifted / sum_exp


def z_loss_scale(t: Targets, options: LossOptions) -> torch.Tensor | float:
    """The factor on each token's z-loss term that makes "mean" divide it by the number of
    non-ignored tokens rather than by sum w_y (module docstring): sum w_y / count under "mean"
    with class weights, else 1 (all-ignored batches: 0, every term is masked anyway)."""
    if options.reduction != "mean" or isinstance(t.total_weight, float):
        return 1.0
    count = t.valid.sum()
    return torch.where(count > 0, t.weight.sum() / count.clamp(min=1), torch.zeros((), device=t.weight.device))


def z_loss_per_token(t: Targets, lse: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """zeta lse^2 of each non-ignored token (times :func:`z_loss_scale`), 0 at ignored tokens."""
    term = (options.z_loss * z_loss_scale(t, options)) * lse * lse
    return torch.where(t.valid, term, torch.zeros_like(term))


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
    loss = torch.where(t.valid, loss, torch.zeros_like(loss))
    return loss + z_loss_per_token(t, lse, options) if options.z_loss > 0.0 else loss


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the O(N) loss math runs in for inputs of ``dtype``: float64 for float64 inputs
    (gradcheck, references), float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_real_grad(grad: torch.Tensor | None) -> None:
    """Losses are real: a complex upstream gradient is an error (its imaginary part would be
    dropped silently)."""
    if grad is not None and grad.is_complex():
        raise TypeError(f"logitkit: a loss's gradient must be real, got {grad.dtype}")


def check_out_dtype(out_dtype: torch.dtype | None, op: str, input_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a loss is returned in: float32 by default, whatever the input dtype (the loss is
    computed in float32; rounding it to bf16 costs up to ~0.024 at a loss of ~10), float64 for
    float64 inputs (computed in float64), or the floating-point ``out_dtype`` the caller asks for."""
    if out_dtype is None:
        return compute_dtype(input_dtype)
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
    check_real_grad(grad)
    g = grad.to(t.weight.dtype)
    if reduction == "none":
        return g.reshape(n)
    if reduction == "sum":
        return g.expand(n)
    return (g / t.weight.sum()).expand(n)


def cross_entropy_coefficients(
    g: torch.Tensor, t: Targets, lse: torch.Tensor, options: LossOptions, g_lse: torch.Tensor | None = None
) -> torch.Tensor:
    """The backward coefficients (N, 4) [a, e = 0, beta, sigma] of the cross-entropy for the
    per-token upstream gradient ``g`` (module docstring). Ignored tokens get 0; a target outside
    [0, V) (only possible where targets are not checked on the host) gets NaN, like its loss.
    ``g_lse``: the upstream gradient of a returned (differentiable) lse, every token's own;
    dlse/dz = p, so it adds to a."""
    eps, vocab = options.label_smoothing, t.vocab
    g = torch.where(t.valid, g, torch.zeros_like(g))
    in_range = (t.target >= 0) & (t.target < vocab)
    g = torch.where(t.valid & ~in_range, torch.full_like(g, math.nan), g)
    beta = g * ((1.0 - eps) * t.weight)
    a = beta
    if eps > 0.0:
        a = a + g * ((eps / vocab) * t.total_weight)
    if options.z_loss > 0.0:  # d(zeta lse^2)/dlse = 2 zeta lse (lse of ignored tokens may be anything: masked)
        scale = 2.0 * options.z_loss * z_loss_scale(t, options)
        a = a + g * scale * torch.where(t.valid, lse, torch.zeros_like(lse))
    if g_lse is not None:
        check_real_grad(g_lse)
        a = a + g_lse.to(a.dtype).reshape(a.shape)
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


class CrossEntropyOutput(NamedTuple):
    """What a loss returns when asked for more than the loss (``return_z_loss``,
    ``return_token_accuracy``): Liger's ``CrossEntropyOutput`` fields in Liger's order, then the
    log-sum-exp with ``return_lse``. Fields not asked for are None."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    lse: torch.Tensor | None = None


def reduced_z_loss(t: Targets, lse: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """The z-loss part of the reduced loss (Liger's ``return_z_loss``: for logging, not
    differentiable): zeta lse^2 reduced as the loss, "mean" over the non-ignored tokens."""
    return reduce_loss(z_loss_per_token(t, lse.detach(), options), t, options.reduction)


def token_accuracy(correct: torch.Tensor, t: Targets, reduction: str) -> torch.Tensor:
    """Liger's ``token_accuracy`` from a (N,) bool "argmax == target": "mean" the fraction of the
    non-ignored tokens (NaN when all are ignored), "sum" their count, "none" 1.0 / 0.0 per token
    (0 at ignored tokens). float32, not differentiable."""
    hit = (correct & t.valid).float()
    if reduction == "none":
        return hit
    if reduction == "sum":
        return hit.sum()
    return hit.sum() / t.valid.sum()


class OutputRequest(NamedTuple):
    """Which outputs a loss call asked for besides the loss, and the tokens' shape."""

    token_shape: torch.Size  # the shape of the (unshifted) target positions
    shift: bool
    return_lse: bool
    return_z_loss: bool
    return_token_accuracy: bool


def loss_outputs(
    loss: torch.Tensor,
    lse: torch.Tensor,
    t: Targets,
    options: LossOptions,
    correct: Callable[[], torch.Tensor],
    request: OutputRequest,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """What a loss returns: the loss; (loss, lse) with ``return_lse``; a
    :class:`CrossEntropyOutput` with ``return_z_loss`` or ``return_token_accuracy``. Per-token
    tensors (N,) get the tokens' shape, without the last position with ``shift``. ``correct()``
    gives the (N,) bool "argmax == target" (called only for the token accuracy)."""

    def per_token(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(request.token_shape)
        return x[..., :-1] if request.shift else x

    def reduced(x: torch.Tensor) -> torch.Tensor:
        return per_token(x) if options.reduction == "none" else x

    out = CrossEntropyOutput(reduced(loss))
    if request.return_lse:
        out = out._replace(lse=per_token(lse))
    if request.return_z_loss:
        out = out._replace(z_loss=reduced(reduced_z_loss(t, lse, options)))
    if request.return_token_accuracy:
        out = out._replace(token_accuracy=reduced(token_accuracy(correct(), t, options.reduction)))
    if request.return_z_loss or request.return_token_accuracy:
        return out
    return (out.loss, per_token(lse)) if request.return_lse else out.loss


def shifted_target(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``shift=True``: position t predicts target t + 1 along the last dimension of ``target``
    (B, T); the last position of each sequence predicts nothing (``ignore_index``). The inputs
    (hidden states, logits) are not sliced, so nothing of size T x D or T x V is copied."""
    if target.dim() < 1 or target.shape[-1] < 1:
        raise ValueError(f"logitkit: shift=True needs a target of shape (..., T) with T >= 1, got {list(target.shape)}")
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], -1)
