"""Top-H truncation (:func:`top_h_mask`, :func:`top_h`) and fused sampling
(:func:`sample`), with the fake kernels of their ops.

The rules' exact definitions are in docs/top_h.md. (This module is not named
``top_h``: that is the name of the function :func:`logitkit.top_h`.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._registration import check_logits, register_fake
from .filters import (
    STAT_COLUMNS,
    STAT_ENTROPY,
    STAT_KEPT,
    STAT_LOG_PROB,
    STAT_RAW_LOG_PROB,
    RowParam,
    chain_params,
    check_top_h_args,
    check_top_h_keep,
    filter_params,
    is_default_keep,
    row_uniform,
    rules_given,
    top_h_mask_rows,
    top_h_off_when_greedy,
    top_h_rows,
)

__all__ = ["MirostatResult", "SampleResult", "mirostat_sample", "sample", "top_h", "top_h_mask"]


def top_h_mask(
    logits: torch.Tensor,
    alpha: float | torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
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

    Per row: ``alpha`` and ``temperature`` may be tensors of shape ``logits.shape[:-1]`` (the
    op ``top_h_mask_per_row``); a row whose alpha is 0 is not truncated (all True, whatever
    it holds). CPU tensors are checked (alpha in [0, 1], temperature a finite number > 0);
    CUDA tensors are not (a host synchronisation), and a row with such a value is not truncated.
    """
    return top_h_mask_rows(logits, alpha, temperature, rule, cap)


def top_h(
    logits: torch.Tensor,
    alpha: float | torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    rule: str = "hf",
    cap: int | None = None,
    filter_value: float = float("-inf"),
) -> torch.Tensor:
    """Top-H truncation: ``logits`` (unchanged, not divided by the temperature)
    where :func:`top_h_mask` keeps the token, ``filter_value`` elsewhere."""
    mask = top_h_mask(logits, alpha, temperature=temperature, rule=rule, cap=cap)
    return torch.where(mask, logits, torch.tensor(filter_value, dtype=logits.dtype, device=logits.device))


class SampleResult(NamedTuple):
    """What :func:`sample` returns when asked for more than the tokens; a field not asked for is None.

    * ``tokens`` (...) int64;
    * ``logprobs``: log q(token), q the processed distribution (temperature-scaled, truncated,
      renormalised), float32;
    * ``raw_logprobs``: log softmax(logits)(token) at temperature 1 without truncation, float32;
    * ``entropy``: H(q) in nats, float32;
    * ``kept``: the size of the kept set, int64.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    raw_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    kept: torch.Tensor | None = None


def _is_legacy_call(temperature: RowParam, extra: dict, seed: object) -> bool:
    """The Top-H / plain-temperature path of the original ``sample`` (scalar temperature > 0,
    no row-statistics rule, no extra output)."""
    if isinstance(temperature, torch.Tensor) or seed is not None:
        return False
    if float(temperature) == 0.0:  # type: ignore[arg-type]
        return False
    return not rules_given(extra.values())


def _fused_top_h(temperature: RowParam, outputs: dict) -> bool:
    """Whether Top-H alone takes the fused Top-H sampler (op ``sample``, or ``sample_per_row``
    for a per-row alpha or temperature): one temperature other than 0, or a per-row temperature
    without the optional outputs (its greedy rows then take a greedy draw). Temperature 0, or a
    per-row one with outputs, take the Top-H mask op and the chain's sampler."""
    if isinstance(temperature, torch.Tensor):
        return not any(outputs.values())
    return float(temperature) != 0.0  # type: ignore[arg-type]


def sample(
    logits: torch.Tensor,
    *,
    temperature: RowParam = 1.0,
    top_h: float | torch.Tensor | None = None,
    rule: str = "hf",
    cap: int | None = None,
    generator: torch.Generator | None = None,
    top_k: RowParam = None,
    top_p: RowParam = None,
    typical_p: RowParam = None,
    min_p: RowParam = None,
    top_n_sigma: RowParam = None,
    p_less: RowParam = False,
    epsilon: RowParam = None,
    eta: RowParam = None,
    edt_theta: RowParam = None,
    edt_base: RowParam = None,
    min_tokens_to_keep: int | torch.Tensor = 1,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    return_kept: bool = False,
) -> torch.Tensor | SampleResult:
    """Draws one token per row from softmax(logits / temperature) restricted to the kept set of
    the truncation rules given: Top-H (``top_h`` = alpha, with ``rule`` and ``cap``), or the
    chain top-k -> top-p -> min-p / top-n-sigma / p-less -> typical -> epsilon -> eta
    (transformers' order), with an optional entropy-adaptive temperature (``edt_theta``,
    ``edt_base``) (docs/sampling.md; the same kept set as :func:`logitkit.truncation_mask`).
    Plain temperature sampling without any.

    Shape (..., V) -> (...), int64. Every parameter of the chain (and ``temperature``) is a
    number or a tensor of shape ``logits.shape[:-1]`` (per row); temperature 0 is greedy (the
    largest logit; ties drawn uniformly). Randomness: one uniform number per row, from
    ``generator`` (torch's default generator of the device when None), or counter-based from
    ``seed`` and ``offset`` (ints or int64 tensors per row; Philox4x32-10, the same number for
    the same pair on every backend and batch composition, no host synchronisation; see
    :func:`logitkit.philox_uniform`). The draw is by inverse CDF over the kept weights
    exp(z - max z) in vocabulary order, no softmax tensor, no sort. A dropped token, or one of
    probability 0, is never drawn. A row holding NaN or +inf gives -1; a row of only -inf gives 0.

    With ``return_logprobs`` / ``return_entropy`` / ``return_kept``, returns a
    :class:`SampleResult` (tokens, log q(token) and the raw log p(token), H(q), kept-set size;
    with ``top_h`` alone they come from :func:`top_h_mask` and row ops, a few more passes).

    ``top_h`` together with the chain's rules: Top-H first, as in transformers' order
    (temperature, Top-H, top-k, top-p, min-p, typical, epsilon, eta), the chain on Top-H's
    survivors renormalised. Rule "hf" with K = min(cap, V) <= 256 (the default cap is 100;
    ``logitkit.filters.FUSED_TOP_H_MAX_COUNT`` and ``TOP_H_DEFAULT_CAP``) runs inside the chain's
    sampler, as its first rule; the other rules, or a larger K, take the Top-H mask op and one
    masked copy of the rows first (docs/sampling.md). ``top_h`` may be a per-row tensor (0: Top-H
    off for that row; Top-H alone then stays on the fused Top-H sampler, op ``sample_per_row``),
    and so may the temperature (or EDT's): Top-H alone stays on the fused Top-H sampler there too,
    its greedy rows (T = 0) skipping Top-H and taking a greedy draw; with temperature 0, or a
    per-row one and the optional outputs, Top-H alone takes the chain's sampler. A greedy row
    skips Top-H (all its largest logits are kept). Top-H has no ``min_tokens_to_keep`` of its own
    (that applies to the rules after it).
    """
    chain = dict(top_k=top_k, top_p=top_p, min_p=min_p, top_n_sigma=top_n_sigma, p_less=p_less)
    chain.update(typical_p=typical_p, epsilon=epsilon, eta=eta)
    outputs = {"return_logprobs": return_logprobs or None, "return_entropy": return_entropy or None}
    outputs["return_kept"] = return_kept or None
    # min_tokens_to_keep = 1 (the default) changes nothing; any other value is a rule argument
    keep = {"min_tokens_to_keep": None if is_default_keep(min_tokens_to_keep) else min_tokens_to_keep}
    edt = {"edt_theta": edt_theta, "edt_base": edt_base}
    if top_h is None:
        if _is_legacy_call(temperature, {**chain, **edt, **keep, **outputs}, seed):
            return _sample_top_h(logits, temperature, None, rule, cap, generator, keep, outputs, seed, offset)
    elif not rules_given([*chain.values(), *edt.values()]) and _fused_top_h(temperature, outputs):
        return _sample_top_h(logits, temperature, top_h, rule, cap, generator, keep, outputs, seed, offset)
    # transformers' order: Top-H's stage, the chain's kernel calls but the last, then the last one here
    source, params, undefined = chain_params(
        logits, chain, temperature, edt_theta, edt_base, min_tokens_to_keep, top_h, rule, cap, "sample"
    )
    u = row_uniform(logits, seed, offset, generator, "sample")
    # (on a copy, the kernel would see the earlier stages' -inf entries)
    raw_in_kernel = bool(return_logprobs) and source is logits
    tokens, stats = _backend.ops().filter_sample(source, params, u, raw_in_kernel)
    if undefined is not None:  # rows with NaN / +inf, all -inf in the chain's copy: as one call gives them
        tokens = torch.where(undefined, -1, tokens)
        no_distribution = torch.full((len(STAT_COLUMNS),), math.nan, dtype=stats.dtype, device=stats.device)
        no_distribution[STAT_KEPT] = 0.0
        stats = torch.where(undefined.unsqueeze(-1), no_distribution, stats)
    if not (return_logprobs or return_entropy or return_kept):
        return tokens
    raw = None
    if return_logprobs:
        raw = stats[..., STAT_RAW_LOG_PROB] if raw_in_kernel else _raw_log_probs(logits, tokens)
    return SampleResult(
        tokens,
        logprobs=stats[..., STAT_LOG_PROB] if return_logprobs else None,
        raw_logprobs=raw,
        entropy=stats[..., STAT_ENTROPY] if return_entropy else None,
        kept=stats[..., STAT_KEPT].to(torch.int64) if return_kept else None,
    )


def _raw_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)(token) at temperature 1 (float32; NaN for token -1, and for an all -inf
    row, as the fused sampler gives): (x_token - m) - log s from the row's float32 softmax state
    (our softmax_stats op, one pass), as the fused sampler computes it. (Until December 5th this
    was x_token - logsumexp(x), whose result, in the logits' dtype, was off by up to ~0.03 for
    bf16 logits.)"""
    x = logits.detach()
    x_token = x.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    stats = _backend.ops().softmax_stats(x, 1.0)
    raw = (x_token - stats[..., 0]) - stats[..., 1].log()
    return torch.where(tokens < 0, math.nan, raw)


def mirostat_epsilon(mu: torch.Tensor) -> torch.Tensor:
    """Mirostat v2's kept set as the epsilon rule: surprise -log2 p <= mu  <=>  p >= 2^-mu.
    Kept below 1 (the rule's range): an epsilon at or above p_max keeps the most probable token
    alone either way. A NaN mu gives 0 (the rule off)."""
    return torch.exp2(-mu.detach().float()).clamp(max=1.0 - 2.0**-24).nan_to_num(nan=0.0)


def mirostat_update(mu: torch.Tensor, log_q: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    """mu - eta * (-log2 q(token) - tau), q the kept distribution the token was drawn from; mu
    unchanged where log q is not finite (no token drawn: a row without a distribution, or a token
    outside the kept set, as generate() pads finished rows)."""
    surprise = (log_q * (-1.0 / math.log(2.0))).to(mu.dtype)
    return torch.where(torch.isfinite(log_q), mu - eta * (surprise - tau), mu)


class MirostatResult(NamedTuple):
    """What :func:`mirostat_sample` returns when asked for more than (tokens, mu): the fields
    of :class:`SampleResult` (None where not asked for) and the updated ``mu``."""

    tokens: torch.Tensor
    mu: torch.Tensor
    logprobs: torch.Tensor | None = None
    raw_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    kept: torch.Tensor | None = None


def mirostat_sample(
    logits: torch.Tensor,
    mu: torch.Tensor,
    *,
    tau: float,
    eta: float = 0.1,
    temperature: RowParam = 1.0,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    return_kept: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | MirostatResult:
    """Mirostat v2 (Basu et al., 2021, "Mirostat: A Neural Text Decoding Algorithm that Directly
    Controls Perplexity", Algorithm 2): one step for every row, with its own state ``mu``.

    With p = softmax(logits / temperature): keep the tokens whose surprise -log2 p is at most
    mu (at least the most probable one), draw from them renormalised (q), then
    ``mu <- mu - eta * (-log2 q(token) - tau)``. ``mu`` is a float tensor of shape
    ``logits.shape[:-1]`` (start it at ``2 * tau``, as the paper does); the new mu is computed
    on the device, with no host synchronisation (the kept set is the epsilon rule's with
    epsilon = 2^-mu, in the fused sampler of :func:`sample`: 2 passes + the draw). ``tau``
    (target surprise, bits) > 0, ``eta`` (learning rate) >= 0. Randomness as in :func:`sample`
    (``generator``, or per-row ``seed`` / ``offset``). Returns ``(tokens, new_mu)``, or a
    :class:`MirostatResult` with the ``return_*`` outputs of :func:`sample`. A row without a
    distribution (NaN / +inf) gives token -1 and keeps its mu.
    """
    op = "mirostat_sample"
    check_logits(logits, op, "logits")
    if not isinstance(mu, torch.Tensor) or not mu.dtype.is_floating_point:
        raise TypeError(f"logitkit.{op}: mu must be a floating-point tensor of shape {list(logits.shape[:-1])}")
    if mu.device != logits.device:
        raise ValueError(f"logitkit.{op}: mu is on {mu.device} but logits is on {logits.device}")
    if mu.shape != logits.shape[:-1]:
        raise ValueError(
            f"logitkit.{op}: mu must have shape {list(logits.shape[:-1])} (one value per row), got {list(mu.shape)}"
        )
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
        raise ValueError(f"logitkit.{op}: tau must be a finite number > 0, got {tau!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0 <= eta < math.inf):
        raise ValueError(f"logitkit.{op}: eta must be a finite number >= 0, got {eta!r}")
    params = filter_params(logits, temperature=temperature, epsilon=mirostat_epsilon(mu), op=op)
    u = row_uniform(logits, seed, offset, generator, op)
    tokens, stats = _backend.ops().filter_sample(logits, params, u, bool(return_logprobs))
    new_mu = mirostat_update(mu, stats[..., STAT_LOG_PROB], tau, eta)  # token -1 <=> log q NaN
    if not (return_logprobs or return_entropy or return_kept):
        return tokens, new_mu
    return MirostatResult(
        tokens,
        new_mu,
        logprobs=stats[..., STAT_LOG_PROB] if return_logprobs else None,
        raw_logprobs=stats[..., STAT_RAW_LOG_PROB] if return_logprobs else None,
        entropy=stats[..., STAT_ENTROPY] if return_entropy else None,
        kept=stats[..., STAT_KEPT].to(torch.int64) if return_kept else None,
    )


def _sample_top_h(
    logits, temperature, top_h, rule, cap, generator, keep, outputs, seed, offset
) -> torch.Tensor | SampleResult:
    """The original Top-H / plain-temperature sampler (scalar temperature), with ``generator``
    or counter-based (seed, offset) uniforms. ``keep``: min_tokens_to_keep when not 1, which
    Top-H alone does not take (transformers' TopHLogitsWarper has none either)."""
    check_top_h_keep(1 if keep.get("min_tokens_to_keep") is None else keep["min_tokens_to_keep"], (), "sample")
    cap_arg = -1 if cap is None else int(cap)
    if isinstance(temperature, torch.Tensor):  # per row (with greedy rows), no outputs: _fused_top_h
        assert top_h is not None
        alpha_t, temperature_t, scaled = top_h_off_when_greedy(logits, top_h, temperature, rule, cap, "sample")
        assert isinstance(alpha_t, torch.Tensor) and isinstance(temperature_t, torch.Tensor) and scaled is not None
        u = row_uniform(logits, seed, offset, generator, "sample")
        tokens = _backend.ops().sample_per_row(logits, u, alpha_t, temperature_t, str(rule), cap_arg)
        if scaled.device.type == "cpu" and not torch.compiler.is_compiling() and bool(scaled.all()):
            return tokens  # no greedy row (a CPU tensor: reading it is no device synchronisation)
        # greedy rows (Top-H off there, T = 1 above): the largest logit, ties drawn with the same u
        # by the chain's sampler at temperature 0 (its max-only path: one read of the rows)
        greedy = filter_params(logits, temperature=0.0, op="sample")
        greedy_tokens, _ = _backend.ops().filter_sample(logits, greedy, u, False)
        return torch.where(scaled, tokens, greedy_tokens)
    if isinstance(top_h, torch.Tensor):  # alpha per row (0: that row untruncated)
        alpha: float | torch.Tensor | None = top_h
        check_top_h_args(logits, None, float(temperature), str(rule), cap_arg, "sample")
        alpha_rows, temperature_rows = top_h_rows(logits, top_h, float(temperature), "sample")
        u = row_uniform(logits, seed, offset, generator, "sample")
        tokens = _backend.ops().sample_per_row(logits, u, alpha_rows, temperature_rows, str(rule), cap_arg)
    else:
        alpha = None if top_h is None else float(top_h)
        check_top_h_args(logits, alpha, float(temperature), str(rule), cap_arg, "sample")
        u = row_uniform(logits, seed, offset, generator, "sample")
        tokens = _backend.ops().sample(logits, u, alpha, float(temperature), str(rule), cap_arg)
    if not any(outputs.values()):
        return tokens
    assert alpha is not None  # outputs without top_h take the row-statistics sampler
    return _top_h_outputs(logits, tokens, alpha, float(temperature), str(rule), cap, outputs)


def _top_h_outputs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    alpha: float | torch.Tensor,
    temperature: float,
    rule: str,
    cap: int | None,
    outputs: dict,
) -> SampleResult:
    """The optional outputs of a Top-H draw (``SampleResult``, float32 like the fused sampler's),
    from the kept set of ``top_h_mask`` (the sampler's own set: both ops share the cut) and our
    row ops on the rows with the dropped tokens set to -inf: log q(token) = z_token - log sum
    over the kept exp(z), H(q), |kept|, and the raw log p(token) at temperature 1. This costs the
    mask op, a float32 copy of the rows and up to three row passes over it, not the fused
    sampler's single statistics pass (docs/sampling.md). Special rows as the fused sampler:
    NaN / +inf (token -1): NaN and a kept count 0; all -inf (token 0): log q = 0, H = 0, count 1,
    raw log-prob NaN."""
    ops = _backend.ops()
    logits = logits.detach()
    mask = top_h_mask_rows(logits, alpha, temperature, rule, cap, "sample")
    x = logits.float()
    kept_logits = x.masked_fill(~mask, -math.inf)
    index = tokens.clamp(min=0).unsqueeze(-1)
    x_token = kept_logits.gather(-1, index).squeeze(-1)
    no_token = tokens < 0
    only_neg_inf = (x_token == -math.inf) & ~no_token  # an all -inf row: token 0 alone, q = 1
    nan = torch.full_like(x_token, math.nan)

    def special(value: torch.Tensor) -> torch.Tensor:
        return torch.where(no_token, nan, torch.where(only_neg_inf, 0.0, value))

    logprobs = raw = entropy = None
    if outputs.get("return_logprobs"):
        logprobs = special(x_token / temperature - ops.logsumexp(kept_logits, temperature))
        raw = _raw_log_probs(logits, tokens)
    if outputs.get("return_entropy"):
        entropy = special(ops.entropy(kept_logits, temperature))
    # (an untruncated row's mask is all True, also on a row without a distribution)
    kept = torch.where(no_token, 0, torch.where(only_neg_inf, 1, mask.sum(-1))) if outputs.get("return_kept") else None
    return SampleResult(tokens, logprobs=logprobs, raw_logprobs=raw, entropy=entropy, kept=kept)


# ---------------------------------------------------------------------------
# Fake kernels
# ---------------------------------------------------------------------------


@register_fake("top_h_mask")
def _top_h_mask_fake(
    logits: torch.Tensor, alpha: float, temperature: float = 1.0, rule: str = "hf", cap: int = -1
) -> torch.Tensor:
    check_top_h_args(logits, alpha, temperature, rule, cap)
    return logits.new_empty(logits.shape, dtype=torch.bool)


@register_fake("top_h_mask_per_row")
def _top_h_mask_per_row_fake(
    logits: torch.Tensor, alpha: torch.Tensor, temperature: torch.Tensor, rule: str = "hf", cap: int = -1
) -> torch.Tensor:
    _check_per_row_args(logits, alpha, temperature, rule, cap, "top_h_mask")
    return logits.new_empty(logits.shape, dtype=torch.bool)


def _check_per_row_args(
    logits: torch.Tensor, alpha: torch.Tensor, temperature: torch.Tensor, rule: str, cap: int, op: str
) -> None:
    """The checks of the per-row Top-H ops' C++ frontend (per_row_params) that need no values."""
    check_top_h_args(logits, None, 1.0, rule, cap, op)
    batch = logits.shape[:-1]
    for name, value in (("alpha", alpha), ("temperature", temperature)):
        if value.dtype != torch.float32:
            raise TypeError(f"logitkit.{op}: {name} must be float32, got {value.dtype}")
        if value.shape != batch:
            raise ValueError(
                f"logitkit.{op}: {name} must have shape {list(batch)} (one value per row), got {list(value.shape)}"
            )


@register_fake("sample_per_row")
def _sample_per_row_fake(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    alpha: torch.Tensor,
    temperature: torch.Tensor,
    rule: str = "hf",
    cap: int = -1,
) -> torch.Tensor:
    _check_per_row_args(logits, alpha, temperature, rule, cap, "sample")
    return _sample_fake(logits, uniform, None, 1.0, rule, cap)


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
