"""logitkit's Python API for the row ops over the vocabulary (last) dimension.

Every function accepts any leading shape, non-contiguous inputs, and logits in
float32, bfloat16 or float16; all arithmetic is float32. ``temperature`` T > 0
divides the logits first (z = x / T). The ops dispatch on the input's device:
CPU tensors run the vectorised multi-threaded CPU kernels, CUDA tensors the
CUDA kernels. All are differentiable (except :func:`softmax_stats`) and work
under ``torch.compile(fullgraph=True)``.

Special values (the same on every backend):

* ``-inf`` logits are masked tokens: probability 0.
* A row whose logits are all ``-inf``: logsumexp is ``-inf``; softmax,
  log_softmax and entropy are NaN (as ``torch.softmax`` gives NaN).
* A row holding ``+inf``: logsumexp is ``+inf``; softmax, log_softmax and
  entropy are NaN for the whole row.
* A NaN logit makes every output of its row NaN, and never touches other rows.
* An empty vocabulary (V = 0): logsumexp ``-inf``, entropy NaN.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _registration  # noqa: F401  (registers fake kernels and autograd)

_ops = torch.ops.logitkit


def softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(x / temperature)`` over the last dimension.

    Shape (..., V) -> (..., V), same dtype as ``x``. Two streaming passes over
    each row: one builds the per-row (max, sum of exp) state with the online
    rescaling merge, one writes ``exp(z - logsumexp(z))``.
    """
    return _ops.softmax(x, float(temperature))


def log_softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(x / temperature)`` = ``z - logsumexp(z)`` over the last dimension.

    Shape (..., V) -> (..., V), same dtype as ``x``.
    """
    return _ops.log_softmax(x, float(temperature))


def logsumexp(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log(sum(exp(x / temperature)))`` over the last dimension, in one read pass.

    Shape (..., V) -> (...), same dtype as ``x`` (computed in float32).
    """
    return _ops.logsumexp(x, float(temperature))


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy in nats of ``softmax(logits / temperature)`` per row.

    Shape (..., V) -> (...), float32. One read pass over the row, keeping
    m = max z, s = sum exp(z - m) and b = sum (z - m) exp(z - m); then
    ``H = log(s) - b / s`` (equal to ``logsumexp(z) - E_p[z]``, but without
    cancellation for large logits). Backward:
    ``dH/dx = -(1/T) * p * (log p + H)``.
    """
    return _ops.entropy(logits, float(temperature))


def softmax_stats(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The mergeable per-row softmax state of ``z = x / temperature``.

    Returns float32 of shape (..., 3) holding, per row,
    ``[m, s, b] = [max z, sum exp(z - m), sum (z - m) exp(z - m)]``.
    States of disjoint vocabulary shards combine with :func:`merge_stats`
    (e.g. after an all-gather in tensor-parallel decoding); then
    :func:`stats_logsumexp` and :func:`stats_entropy` finish the job.
    Not differentiable.
    """
    return _ops.softmax_stats(x, float(temperature))


def merge_stats(stats: Sequence[torch.Tensor] | torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Merges softmax states of disjoint vocabulary shards into one state.

    ``stats`` is a sequence of (..., 3) tensors from :func:`softmax_stats`,
    or one tensor with the shards along ``dim``. Uses the rescaling merge
    ``M = max_k m_k``, ``S = sum_k s_k e^{m_k - M}``,
    ``B = sum_k e^{m_k - M} (b_k + (m_k - M) s_k)``; empty shards
    (m = -inf) contribute nothing. The result is exact up to float32 rounding:
    merging the states of a row's shards gives the state of the whole row.
    """
    if isinstance(stats, torch.Tensor):
        if dim is None:
            raise ValueError("merge_stats: pass dim= when stats is a single tensor of stacked shard states")
        st = stats.movedim(dim, 0)
    else:
        if len(stats) == 0:
            raise ValueError("merge_stats: stats is empty")
        st = torch.stack(list(stats), 0)
    if st.shape[-1] != 3:
        raise ValueError(f"merge_stats: states must have a last dimension of 3, got shape {list(st.shape)}")
    st = st.float()
    m, s, b = st.unbind(-1)
    big_m = m.amax(0)
    neg_inf = float("-inf")
    factor = torch.where(m == neg_inf, torch.zeros_like(m), torch.exp(m - big_m))
    merged_s = (s * factor).sum(0)
    merged_b = torch.where(factor == 0, torch.zeros_like(b), factor * (b + (m - big_m) * s)).sum(0)
    return torch.stack([big_m, merged_s, merged_b], -1)


def stats_logsumexp(stats: torch.Tensor) -> torch.Tensor:
    """log-sum-exp from a (..., 3) softmax state: ``m + log(s)`` (+inf if m = +inf)."""
    m, s, _ = stats.unbind(-1)
    return torch.where(m == float("inf"), m, m + torch.log(s))


def stats_entropy(stats: torch.Tensor) -> torch.Tensor:
    """Entropy in nats from a (..., 3) softmax state: ``log(s) - b / s`` (NaN if m = +inf)."""
    m, s, b = stats.unbind(-1)
    h = torch.log(s) - b / s
    return torch.where(m == float("inf"), torch.full_like(h, float("nan")), h)


# ---------------------------------------------------------------------------
# Top-H truncation
# ---------------------------------------------------------------------------


def top_h_mask(
    logits: torch.Tensor,
    alpha: float,
    *,
    temperature: float = 1.0,
    rule: str = "hf",
    cap: int | None = None,
) -> torch.Tensor:
    """The boolean keep mask of Top-H truncation, same shape as ``logits``.

    Rules (exact definitions in shared/notes/top-h.md), with z = logits / T:

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
    return _ops.top_h_mask(logits, float(alpha), float(temperature), str(rule), -1 if cap is None else int(cap))


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
    from ._registration import check_top_h_args

    cap_arg = -1 if cap is None else int(cap)
    alpha = None if top_h is None else float(top_h)
    check_top_h_args(logits, alpha, float(temperature), str(rule), cap_arg, "sample")
    u = torch.rand(logits.shape[:-1], generator=generator, device=logits.device, dtype=torch.float32)
    return _ops.sample(logits, u, alpha, float(temperature), str(rule), cap_arg)
