"""Benchmark cases of the sampler family (docs/sampling.md), not run by default:

* ``sampling``: temperature -> top-k -> top-p -> min-p, per-row parameters and per-row seeds,
  one token per row. Baselines: transformers' chain (Temperature + TopK + TopP + MinP warpers
  with one value for the batch, then softmax + multinomial) and a sort-based torch sampler in
  the style of vLLM's native path (scale, sort, softmax, top-k, top-p and min-p on the sorted
  probabilities, exponential race).
* ``mirostat``: one Mirostat v2 step (:func:`logitkit.mirostat_sample`) against a
  straightforward torch implementation (softmax, sort, surprise cut, renormalise, multinomial,
  mu update).
* ``sample_edt``: sampling at the entropy-adaptive temperature (EDT) against a straightforward
  torch implementation (entropy from log_softmax, T, softmax, multinomial).

The correctness guard checks that every drawn token lies in its row's kept set (tie-aware).
"""

from __future__ import annotations

import math

import torch

import logitkit

from ..testing import references
from .registry import DEFAULT_PARAMS, Case, CaseParams, register
from .top_h_cases import _sample_check, sample_bytes

#: The chain's settings (per-row values spread around them).
TEMPERATURE, TOP_K, TOP_P, MIN_P = 0.8, 50, 0.9, 0.05
#: Mirostat v2 (Basu et al.'s defaults) and EDT (Zhang et al.'s N).
MIROSTAT_TAU, MIROSTAT_ETA, EDT_THETA, EDT_BASE = 5.0, 0.1, 1.0, 0.8


def make_chain_inputs(
    rows: int, vocab: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, params: CaseParams
) -> tuple:
    """(logits, temperature, top_k, top_p, min_p, seed) with per-row parameters."""
    x = (torch.randn(rows, vocab, device=device, generator=gen) * 3).to(dtype)
    jitter = torch.rand(rows, device=device, generator=gen)
    temperature = TEMPERATURE + 0.1 * jitter
    top_k = torch.full((rows,), TOP_K, dtype=torch.int64, device=device) + (jitter * 10).long()
    top_p = TOP_P - 0.05 * jitter
    min_p = torch.full((rows,), MIN_P, device=device)
    return x, temperature, top_k, top_p, min_p, torch.arange(rows, device=device)


def make_logits_only(
    rows: int, vocab: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, params: CaseParams
) -> tuple:
    """(logits,): the chain's logits."""
    return make_chain_inputs(rows, vocab, dtype, device, gen, params)[:1]


def make_mirostat_inputs(
    rows: int, vocab: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, params: CaseParams
) -> tuple:
    """(logits, mu): Zipf-like rows (a realistic surprise profile), mu spread around 2 tau."""
    ranks = torch.arange(1, vocab + 1, device=device, dtype=torch.float32)
    noise = torch.randn(rows, vocab, device=device, generator=gen)
    x = (-1.1 * ranks.log() + 0.5 * noise)[:, torch.randperm(vocab, generator=gen).to(device)]
    mu = 2 * MIROSTAT_TAU + torch.rand(rows, device=device, generator=gen) - 0.5
    return x.to(dtype), mu


def warpers_then_multinomial(x, warpers):
    """transformers' way: each warper on the float32 scores in turn, then softmax + multinomial."""
    scores = x.float()
    for warper in warpers:
        scores = warper(None, scores)
    return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(-1)


def sort_based_sample(x, temperature, min_p, top_k=None, top_p=None):
    """vLLM-style native path: scale, sort, [top-k on the ranks,] softmax, [top-p: drop the tokens
    whose preceding mass already reaches top_p,] min-p on the sorted probabilities (relative to the
    largest, so renormalising after top-p changes nothing), exponential-race draw (argmax of
    probs / Exp(1), which needs no normalisation) mapped back to the token."""
    z = x.float() / temperature.unsqueeze(-1)
    sorted_z, index = torch.sort(z, dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(z.shape[-1], device=z.device)
        sorted_z = sorted_z.masked_fill(ranks >= top_k.unsqueeze(-1), -math.inf)
    probs = torch.softmax(sorted_z, -1)
    if top_p is not None:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p.unsqueeze(-1), 0.0)
    probs = probs.masked_fill(probs < min_p.unsqueeze(-1) * probs[..., :1], 0.0)
    race = torch.empty_like(probs).exponential_()
    return index.gather(-1, (probs / race).argmax(-1, keepdim=True)).squeeze(-1)


def chain_logitkit(x, temperature, top_k, top_p, min_p, seed):
    return logitkit.sample(x, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)


def chain_transformers():
    """transformers' warpers (one value per batch), then softmax + multinomial; None without it."""
    try:
        from transformers.generation import logits_process as tlp
    except ImportError:
        return None
    warpers = [
        tlp.TemperatureLogitsWarper(TEMPERATURE),
        tlp.TopKLogitsWarper(TOP_K),
        tlp.TopPLogitsWarper(TOP_P),
        tlp.MinPLogitsWarper(MIN_P),
    ]

    def run(x, temperature, top_k, top_p, min_p, seed):
        return warpers_then_multinomial(x, warpers)

    return run


def chain_sort_based(x, temperature, top_k, top_p, min_p, seed):
    return sort_based_sample(x, temperature, min_p, top_k, top_p)


def chain_reference(x, temperature, top_k, top_p, min_p, seed):
    return references.truncation_mask(x, temperature=temperature, top_k=top_k.long(), top_p=top_p, min_p=min_p)


def mirostat_logitkit(x, mu):
    return logitkit.mirostat_sample(x, mu, tau=MIROSTAT_TAU, eta=MIROSTAT_ETA)[0]


def mirostat_torch(x, mu):
    """Mirostat v2 as written from the paper with torch ops: softmax, sort, keep the sorted
    prefix of surprise <= mu (at least one), renormalise, multinomial, mu update."""
    probs = torch.softmax(x.float(), -1)
    sorted_p, index = torch.sort(probs, dim=-1, descending=True)
    keep = -torch.log2(sorted_p) <= mu.unsqueeze(-1)
    keep[..., 0] = True
    kept = sorted_p * keep
    q = kept / kept.sum(-1, keepdim=True)
    choice = torch.multinomial(q, 1)
    surprise = -torch.log2(q.gather(-1, choice)).squeeze(-1)
    _new_mu = mu - MIROSTAT_ETA * (surprise - MIROSTAT_TAU)
    return index.gather(-1, choice).squeeze(-1)


def mirostat_reference(x, mu):
    return references.mirostat_keep(x, mu)


def edt_logitkit(x):
    return logitkit.sample(x, edt_theta=EDT_THETA, edt_base=EDT_BASE)


def edt_torch(x):
    """EDT from its formula with torch ops: H from log_softmax, T = N^(theta / H), softmax of
    x / T, multinomial."""
    log_p = torch.log_softmax(x.float(), -1)
    h = -(log_p.exp() * log_p).sum(-1)
    t = EDT_BASE ** (EDT_THETA / h)
    return torch.multinomial(torch.softmax(x.float() / t.unsqueeze(-1), -1), 1).squeeze(-1)


def edt_reference(x):
    return references.truncation_mask(x, edt_theta=EDT_THETA, edt_base=EDT_BASE)


def chain_bytes(rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS) -> int:
    """Sampling's bytes model plus the per-row parameters read: float32 temperature, top-p and
    min-p, int64 top-k and seed."""
    return sample_bytes(rows, vocab, dtype, params) + rows * (4 + 4 + 4 + 8 + 8)


def mirostat_bytes(rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS) -> int:
    """Sampling's bytes model plus the float32 mu read and written per row."""
    return sample_bytes(rows, vocab, dtype, params) + rows * (4 + 4)


def register_cases() -> None:
    """``sampling``, ``mirostat`` and ``sample_edt`` (see the module docstring)."""
    chain_baselines = {"sort-based": chain_sort_based}
    transformers_chain = chain_transformers()
    if transformers_chain is not None:
        chain_baselines = {"transformers": transformers_chain, **chain_baselines}
    register(
        Case(
            "sampling",
            make_chain_inputs,
            chain_logitkit,
            chain_baselines,
            chain_reference,
            chain_bytes,
            default=False,
            check=_sample_check,
        )
    )
    register(
        Case(
            "mirostat",
            make_mirostat_inputs,
            mirostat_logitkit,
            {"torch": mirostat_torch},
            mirostat_reference,
            mirostat_bytes,
            default=False,
            check=_sample_check,
        )
    )
    register(
        Case(
            "sample_edt",
            make_logits_only,
            edt_logitkit,
            {"torch": edt_torch},
            edt_reference,
            sample_bytes,
            default=False,
            check=_sample_check,
        )
    )
