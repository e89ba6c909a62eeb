"""Per-token loss math shared by the vocabulary-parallel losses, written
against the merged (global) quantities. The same formulas as the
single-device losses (docs/numerics.md, csrc/core/linear_ce.h); kept private
here until the house-wide shared loss-math module lands.

With z the logits after temperature (and softcap), lse = m + log s over the
whole vocabulary, y the target, w the class weights (1 without them),
W = sum_c w_c, eps the label smoothing, zeta the z-loss coefficient:

    loss = (1 - eps) w_y (lse - z_y) + (eps / V) (W lse - sum_c w_c z_c) + zeta lse^2
    dL/dz_c = p_c (a + e (z_c - lse)) - beta [c = y] - sigma w_c
"""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("none", "mean", "sum")


def ce_token_loss(
    m: torch.Tensor,
    log_s: torch.Tensor,
    z_target: torch.Tensor,
    w_y: torch.Tensor,
    valid: torch.Tensor,
    *,
    eps: float,
    z_loss: float,
    vocab: int,
    total_weight: float | torch.Tensor,
    weighted_sum: torch.Tensor | None,
) -> torch.Tensor:
    """Per-token loss (0 at ignored tokens), fp32. ``lse - z_y`` is evaluated
    as ``(m - z_y) + log s`` (no ulp(lse) rounding when p_y -> 1)."""
    lse = torch.where(m == math.inf, m, m + log_s)
    loss = (1.0 - eps) * w_y * ((m - z_target) + log_s)
    if eps > 0:
        assert weighted_sum is not None
        loss = loss + (eps / vocab) * (total_weight * lse - weighted_sum)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def reduce_loss(loss: torch.Tensor, reduction: str, w_y: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w_y.sum()  # 0 / 0 = NaN for an all-ignored batch, as F.cross_entropy


def upstream_per_token(grad: torch.Tensor, reduction: str, n: int, w_y: torch.Tensor) -> torch.Tensor:
    """dL_reduced / dloss_i as an (n,) fp32 tensor."""
    g = grad.float()
    if reduction == "none":
        return g.reshape(-1)
    if reduction == "sum":
        return g.expand(n)
    return (g / w_y.sum()).expand(n)


def ce_coefficients(
    g: torch.Tensor,
    valid: torch.Tensor,
    in_range: torch.Tensor,
    w_y: torch.Tensor,
    lse: torch.Tensor,
    *,
    eps: float,
    z_loss: float,
    vocab: int,
    total_weight: float | torch.Tensor,
) -> torch.Tensor:
    """(N, 4) [a, e = 0, beta, sigma] of the cross-entropy for the upstream g.

    A target outside [0, V) (possible on CUDA, where targets are not checked
    on the host) has a NaN loss; its gradients are made NaN too."""
    g = torch.where(valid, g, torch.zeros_like(g))
    g = torch.where(valid & ~in_range, torch.full_like(g, math.nan), g)
    beta = g * ((1.0 - eps) * w_y)
    a = beta
    if eps > 0:
        a = a + g * ((eps / vocab) * total_weight)
    if z_loss > 0:
        a = a + g * (2.0 * z_loss) * torch.where(valid, lse, torch.zeros_like(lse))
    return torch.stack([a, torch.zeros_like(a), beta, g * (eps / vocab)], -1)


def logprob_entropy_coefficients(g_l: torch.Tensor, g_h: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """(N, 4) coefficients of g_l log p_y + g_h H:
    d/dz_c = p_c (-g_l - g_h H - g_h (z_c - lse)) + g_l [c = y]."""
    return torch.stack([-g_l - g_h * entropy, -g_h, -g_l, torch.zeros_like(g_l)], -1)


def check_ce_options(
    op: str, reduction: str, label_smoothing: float, z_loss: float, temperature: float, softcap: float | None
) -> str | None:
    """The single-device argument checks, returned as a message (not raised:
    the caller reports it through the metadata exchange so every rank fails)."""
    prefix = f"logitkit.distributed.{op}"
    if reduction not in REDUCTIONS:
        return f"{prefix}: reduction must be one of {REDUCTIONS}, got {reduction!r}"
    if not (0.0 <= label_smoothing <= 1.0):
        return f"{prefix}: label_smoothing must be in [0, 1], got {label_smoothing}"
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        return f"{prefix}: softcap must be None or a finite number > 0, got {softcap}"
    if not (math.isfinite(z_loss) and z_loss >= 0):
        return f"{prefix}: z_loss must be a finite number >= 0, got {z_loss}"
    if not (math.isfinite(temperature) and temperature > 0):
        return f"{prefix}: temperature must be a finite number > 0, got {temperature}"
    return None
