"""Top-H truncation (:func:`top_h_mask`, :func:`top_h`) and fused sampling
(:func:`sample`), with the fake kernels of their ops.

The rules' exact definitions are in docs/top_h.md. (This module is not named
``top_h``: that is the name of the function :func:`logitkit.top_h`.)
"""

from __future__ import annotations

import torch

from . import _backend
from ._registration import check_logits, check_temperature, cpp_float, register_fake

__all__ = ["sample", "top_h", "top_h_mask"]

TOP_H_RULES = ("hf", "official", "exact")


def check_top_h_args(
    logits: torch.Tensor, alpha: float | None, temperature: float, rule: str, cap: int, op: str = "top_h_mask"
) -> None:
    """The argument checks of top_h_mask and sample (alpha None: no truncation), with the
    messages of csrc/common/top_h_frontend.h."""
    check_logits(logits, op, "logits")
    if alpha is not None and not (alpha > 0 and alpha <= 1):
        raise ValueError(f"logitkit.{op}: alpha must be in (0, 1], got {cpp_float(alpha)}")
    check_temperature(temperature, op)
    if rule not in TOP_H_RULES:
        raise ValueError(f"logitkit.{op}: rule must be 'hf', 'official' or 'exact', got '{rule}'")
    if cap != -1 and cap < 1:
        raise ValueError(f"logitkit.{op}: cap must be >= 1 (or -1 for the rule's default), got {cap}")


def top_h_mask(
    logits: torch.Tensor,
    alpha: float,
    *,
    temperature: float = 1.0,
    rule: str = "hf",
    cap: int | None = None,
) -> torch.Tensor:
    """The boolean keep mask of Top-H truncation, same shape as ``logits``.

    Rules (exact definitions in docs/top_h.md), with z = logits / T:

    * ``"hf"``: transformers' ``TopHLogitsWarper(top_h=alpha)`` applied to
      ``logits / temperature`` (in transformers' chain it runs after the
      temperature warper, so pass the raw logits and the temperature here):
      the K = min(cap, V) largest z, q = softmax over those K only, keep the
      sorted prefix whose cumulative sum of -q log q is <= alpha * H(q).
    * ``"official"``: the authors' reference processor: p = softmax(z) over the
      whole vocabulary, the K most probable tokens, keep the longest sorted
      prefix with sum -p log p <= alpha * (the same sum over the K tokens).
    * ``"exact"``: the paper's objective over the whole vocabulary (no cap):
      the largest sorted prefix whose renormalised entropy is <= alpha * H(p).

    ``cap`` (default 100) applies to "hf" and "official" and is ignored by
    "exact". At least one token (the most probable) is always kept; a token of
    probability exactly 0 (in float32) is never kept otherwise. Ties: among
    equal logits the lower vocabulary index ranks first. A row holding NaN or
    +inf has no defined distribution: its mask is all False. A row of only
    -inf keeps token 0. ``alpha`` must be in (0, 1], ``temperature`` > 0.
    Not differentiable.
    """
    cap_arg = -1 if cap is None else int(cap)
    return _backend.ops().top_h_mask(logits, float(alpha), float(temperature), str(rule), cap_arg)


def top_h(
    logits: torch.Tensor,
    alpha: float,
    *,
    temperature: float = 1.0,
    rule: str = "hf",
    cap: int | None = None,
    filter_value: float = float("-inf"),
) -> torch.Tensor:
    """Top-H truncation: ``logits`` (unchanged, not divided by the temperature)
    where :func:`top_h_mask` keeps the token, ``filter_value`` elsewhere."""
    mask = top_h_mask(logits, alpha, temperature=temperature, rule=rule, cap=cap)
    return torch.where(mask, logits, torch.tensor(filter_value, dtype=logits.dtype, device=logits.device))


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_h: float | None = None,
    rule: str = "hf",
    cap: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws one token per row from softmax(logits / temperature), restricted to
    the Top-H kept set when ``top_h`` (alpha) is given (plain temperature
    sampling otherwise).

    Shape (..., V) -> (...), int64. One uniform number per row comes from
    ``generator`` (or torch's default generator of the device), so the same
    generator state gives the same tokens; rows are independent. The fused
    kernel finds the kept set's threshold, then draws by inverse CDF over the
    kept weights exp(z - max z) (no softmax tensor, no host synchronisation):
    the first kept token whose running weight exceeds u * (kept mass). A
    dropped token, or one of probability 0, is never drawn. A row without a
    defined distribution (NaN or +inf logits) gives -1; a row of only -inf
    gives 0.
    """
    cap_arg = -1 if cap is None else int(cap)
    alpha = None if top_h is None else float(top_h)
    check_top_h_args(logits, alpha, float(temperature), str(rule), cap_arg, "sample")
    u = torch.rand(logits.shape[:-1], generator=generator, device=logits.device, dtype=torch.float32)
    return _backend.ops().sample(logits, u, alpha, float(temperature), str(rule), cap_arg)


# ---------------------------------------------------------------------------
# Fake kernels
# ---------------------------------------------------------------------------


@register_fake("top_h_mask")
def _top_h_mask_fake(
    logits: torch.Tensor, alpha: float, temperature: float = 1.0, rule: str = "hf", cap: int = -1
) -> torch.Tensor:
    check_top_h_args(logits, alpha, temperature, rule, cap)
    return logits.new_empty(logits.shape, dtype=torch.bool)


@register_fake("sample")
def _sample_fake(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    alpha: float | None,
    temperature: float = 1.0,
    rule: str = "hf",
    cap: int = -1,
) -> torch.Tensor:
    check_top_h_args(logits, alpha, temperature, rule, cap, "sample")
    batch = logits.shape[:-1]
    if uniform.device != logits.device:
        raise ValueError(f"logitkit.sample: uniform is on {uniform.device} but logits is on {logits.device}")
    if uniform.dtype != torch.float32:
        raise TypeError(f"logitkit.sample: uniform must be float32, got {uniform.dtype}")
    if uniform.shape != batch:
        raise ValueError(
            f"logitkit.sample: uniform must have shape {list(batch)} (one number per row), got {list(uniform.shape)}"
        )
    return logits.new_empty(batch, dtype=torch.int64)
