"""Cases of Top-H truncation (``top_h``, ``top_h_official``, ``top_h_exact``)
and Top-H sampling (``sample``), with their tie-aware correctness guards. The
rules are defined in docs/top_h.md; the references are
:func:`logitkit.testing.references.top_h_mask` in float64."""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

import logitkit

from ..testing import references
from .registry import DEFAULT_PARAMS, Case, CaseParams, itemsize, make_logits, register, row_to_row_bytes

#: The Top-H benchmark setting: alpha and temperature of the issue's target shape (cap: the rules' default).
TOP_H_ALPHA = 0.4
TOP_H_TEMPERATURE = 1.5


def _transformers_top_h_warper() -> Callable[..., Any] | None:
    """transformers' ``TopHLogitsWarper`` class, or None when transformers (>= 5) is missing."""
    try:
        from transformers.generation.logits_process import TopHLogitsWarper
    except Exception:  # not installed, or too old to have it
        return None
    return TopHLogitsWarper


def official_top_h_loop(x: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The authors' reference processor as its code runs it (docs/top_h.md, rule "official"): one
    row at a time, p = softmax(z) over the full vocabulary, the K = 100 most probable tokens, then
    a Python loop over them accumulating -p log p with a host read per token, stopping at the first
    token whose addition exceeds alpha * (the same sum over all K). Returns the logits with -inf
    outside the kept set. Written without the defects docs/top_h.md lists (any batch size, alpha = 1,
    p = 0, V < 100)."""
    out = torch.full_like(x, -math.inf)
    for r in range(x.shape[0]):
        p = torch.softmax(x[r].float() / temperature, -1)
        top_p, top_i = torch.topk(p, min(references.TOP_H_DEFAULT_CAP, x.shape[-1]))
        h = references.entropy_terms(top_p)
        tau = alpha * float(h.sum())
        kept, c = 1, float(h[0])
        while kept < top_p.numel() and float(top_p[kept]) > 0 and c + float(h[kept]) <= tau:
            c += float(h[kept])
            kept += 1
        out[r, top_i[:kept]] = x[r, top_i[:kept]]
    return out


def _top_h_keep_check(alpha: float) -> Callable[[Any, Any, tuple], tuple[float, float]]:
    """Guard of a Top-H mask case: the output's kept set (finite entries) against the reference's
    mask, row by row. At alpha = 1 the capped rules' last comparison is an equality, so a float32
    implementation may keep one token fewer (docs/top_h.md): one differing token per row is allowed
    there, none otherwise. Returns (max differing tokens in a row, that / (allowed + 1/2))."""
    allowed = 1 if alpha >= 1 else 0

    def check(out: torch.Tensor, ref_keep: torch.Tensor, inputs: tuple) -> tuple[float, float]:
        keep = out.isfinite()
        if keep.shape != ref_keep.shape:
            return math.inf, math.inf
        if not keep.numel():
            return 0.0, 0.0
        # Tokens kept by one side only, less the pairs of equal logits: low-precision logits (bf16)
        # hold exact ties, and which of two equal logits a baseline keeps is unspecified.
        x = inputs[0].to(keep.device).float()
        ref_keep_d = ref_keep.to(keep.device)
        only_out, only_ref = keep & ~ref_keep_d, ref_keep_d & ~keep
        worst = 0.0
        for r in (only_out | only_ref).any(-1).nonzero().flatten().tolist():
            a = collections.Counter(x[r][only_out[r]].tolist())
            b = collections.Counter(x[r][only_ref[r]].tolist())
            worst = max(worst, float(sum(((a - b) + (b - a)).values())))
        return worst, worst / (allowed + 0.5)

    return check


def _sample_check(out: torch.Tensor, ref_keep: torch.Tensor, inputs: tuple) -> tuple[float, float]:
    """Guard of a sampling case: every drawn token lies in its row's kept set (up to ties of equal
    logits). Returns (number of rows whose token was dropped or out of range, the same as the
    ratio)."""
    rows = ref_keep.shape[0]
    if out.shape != (rows,):
        return math.inf, math.inf
    tokens = out.to(ref_keep.device)
    valid = (tokens >= 0) & (tokens < ref_keep.shape[-1])
    # Tie-aware, as in the mask check: the kept set is a prefix by value, so a token is inside it
    # when its logit is at least the smallest kept logit of its row.
    x = inputs[0].to(ref_keep.device).float()
    smallest_kept = torch.where(ref_keep, x, math.inf).amin(-1)
    rows_index = torch.arange(rows, device=ref_keep.device)
    inside = x[rows_index, tokens.clamp(0, ref_keep.shape[-1] - 1)] >= smallest_kept
    bad = float((~(valid & inside)).sum())
    return bad, bad


def top_h_mask_bytes(rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS) -> int:
    """Bytes model of a Top-H mask (``top_h``): read the logits, write the filtered logits."""
    return row_to_row_bytes(rows, vocab, dtype)


def sample_bytes(rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS) -> int:
    """Bytes model of sampling: read the logits and one float32 uniform per row, write one int64
    token per row."""
    return rows * vocab * itemsize(dtype) + rows * (4 + 8)


def _sort_and_scan(rule: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sort-and-scan baseline of a rule in plain PyTorch (float32): the reference's own
    definition, run in the precision the logits arrive in."""

    def eager(x: torch.Tensor) -> torch.Tensor:
        keep = references.top_h_mask(x.float(), TOP_H_ALPHA, TOP_H_TEMPERATURE, rule, dtype=torch.float32)
        return x.masked_fill(~keep, -math.inf)

    return eager


def _transformers_mask(warper: Callable[..., Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' warper on logits / T. generate() casts the next-token logits to float32 before
    its processors run, so the baseline sees float32 (as the reference does)."""
    no_ids = torch.zeros(1, 1, dtype=torch.long)

    def mask(x: torch.Tensor) -> torch.Tensor:
        return warper(top_h=TOP_H_ALPHA)(no_ids, x.float() / TOP_H_TEMPERATURE)

    return mask


def _draw(filtered: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch sampling from filtered logits: softmax + multinomial."""
    return torch.multinomial(torch.softmax(filtered.float(), -1), 1).squeeze(-1)


def register_cases() -> None:
    """``top_h`` (rule "hf"), ``top_h_official``, ``top_h_exact`` and ``sample`` (Top-H "hf" sampling)
    at alpha :data:`TOP_H_ALPHA`, temperature :data:`TOP_H_TEMPERATURE`. Baselines: transformers'
    ``TopHLogitsWarper`` applied to logits / T (its place after the temperature warper) when
    transformers is installed, plus softmax + multinomial for sampling; the per-row loop of the
    authors' processor for the "official" rule; a sort-and-scan in plain PyTorch (float32) for
    "exact" and wherever transformers is missing."""
    alpha, T = TOP_H_ALPHA, TOP_H_TEMPERATURE
    warper = _transformers_top_h_warper()
    transformers_mask = _transformers_mask(warper) if warper is not None else None
    hf_baselines = {"transformers": transformers_mask} if transformers_mask else {"sort-scan": _sort_and_scan("hf")}
    check = _top_h_keep_check(alpha)
    for name, rule, baselines in (
        ("top_h", "hf", hf_baselines),
        ("top_h_official", "official", {"official-loop": lambda x: official_top_h_loop(x.float(), alpha, T)}),
        ("top_h_exact", "exact", {"sort-scan": _sort_and_scan("exact")}),
    ):
        fn = functools.partial(logitkit.top_h, alpha=alpha, temperature=T, rule=rule)
        reference = functools.partial(references.top_h_mask, alpha=alpha, temperature=T, rule=rule)
        register(Case(name, make_logits, fn, baselines, reference, top_h_mask_bytes, default=False, check=check))

    def sample_logitkit(x: torch.Tensor) -> torch.Tensor:
        tokens = logitkit.sample(x, temperature=T, top_h=alpha)
        assert isinstance(tokens, torch.Tensor)  # no return_* flag: the tokens alone
        return tokens

    if transformers_mask is not None:
        sample_baselines = {"transformers": lambda x: _draw(transformers_mask(x))}
    else:
        sample_baselines = {"sort-scan": lambda x: _draw(_sort_and_scan("hf")(x) / T)}
    reference = functools.partial(references.top_h_mask, alpha=alpha, temperature=T, rule="hf")
    register(
        Case(
            "sample",
            make_logits,
            sample_logitkit,
            sample_baselines,
            reference,
            sample_bytes,
            default=False,
            check=_sample_check,
        )
    )
