"""Top-H truncation and sampling on vocabulary-sharded logits.

Rank r holds ``logits[..., v0_r:v1_r]``. The kept sets (every rule, see
docs/top_h.md) and the drawn tokens are those of the single-device ops on the
concatenated logits; the threshold is found from per-rank summaries, never by
gathering the logits. All reads of the local logits are row-blocked torch ops
(fp32 temporaries within BLOCK_BYTES per block), except the softmax-state pass,
which is logitkit's ``softmax_stats`` kernel.

Capped rules ("hf", "official"). The kept set lies within the K = min(cap, V)
best tokens of the row (rank order: larger logit first, then lower index).
Each rank takes its own K best (``torch.topk`` of K + 1 values; a tie that
straddles the K-th place is re-resolved for that row by index, so the local
list is exactly the K first of the rank order), and one all-gather of
(value, global index) pairs (fp64, exact) gives every rank the global top K
(merged by (value desc, index asc)). The prefix scan is
``core::capped_keep_count`` in fp32, term by term in the same order. The kept
tokens are listed explicitly, so the mask is a scatter and ``sample`` draws
on every rank from the list, with no further pass or collective.
Read passes: "hf" 1 (topk), "official" 2 (+ the state, for the full
log-sum-exp). Collectives: one all-gather of (2K + 4) fp64 per row.

"exact". The kept set is {rank-order prefix with renormalised entropy <=
alpha H(p)} (no cap), found by a radix selection over 32-bit orderable keys
of the logits, digits of 11 + 11 + 10 bits, as the CUDA kernel does. Each
digit pass histograms (count, sum e, sum d e) of the candidate tokens
(e = exp(z - m), d = z - m) into 2048 bins; one SUM all-reduce of the
(rows, 2048, 3) fp64 histograms makes them global (fp64 sums of fp32 terms,
as the CPU kernel's bucket sums: a peaked row's H(p) ~ 1e-7 is below fp32
resolution of a sum ~ 1); every rank walks the same
bins from the largest key down and fixes the bin where H(q) first exceeds the
budget. The first digit is binned during the state pass, before the global
max is known: each bin's sums are taken relative to the bin's own upper end
(known from the key alone, so the bins of all ranks align and can be summed),
except the bins holding a rank's own max, which travel as softmax states in
the small all-gather of the per-rank states that runs concurrently; after it,
bins are rescaled to the global max (every bin below the global top bin has
its upper end below the max, so nothing that would not underflow anyway is
lost). The walk stops early when the cut bin holds one token (then dropped);
after the last digit the cut is one logit value, whose ties are kept in index
order across ranks (per-rank counts from one all-gather of rows x 2 numbers).
Read passes: 1 (state + digit 1) + 0-1 (digit 2, which computes only keys
for the whole row and keeps the tokens of the cut bin; digit 3 is binned
from those, without reading the logits) + 1 (write the mask, or the draw on
the rank that holds the drawn token) = 2-3 (CUDA single-device: at most 4).
Collectives: 2 concurrent after the first pass, 1 per further digit, 1 small
all-gather (per-rank kept mass and tie counts) when sampling or when a tie
group straddles the cut, and for ``sample`` one all-reduce of the tokens.

Plain sampling (``top_h=None``): the state pass, one all-gather of the
per-rank states, then the rank whose share of the mass holds the draw scans
its shard (1 pass), and one all-reduce of the tokens.

Per-row alpha (a tensor of the rows' shape, 0: Top-H off for that row, as
single-device): the capped scan and the "exact" budget take it per row; rows
at 0 get an all-True mask, and capped ``sample`` runs the plain draw on them.
Per-row temperature (rows at 0 greedy in ``sample``): z = x * (1/T) with each row's fp32 1/T,
per-row first-digit bin references, and the state kernel run at T = 1 on
row blocks scaled in fp32. Every rank's per-row values are compared through a
checksum in the metadata exchange.

The uniform numbers come from ``torch.rand(logits.shape[:-1],
generator=...)`` exactly as single-device ``logitkit.sample`` draws them;
every rank draws them (so generators stay in step) and the group uses those
of the first rank of the group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import _backend
from ..filters import scaled_rows
from . import _comm, _dtensor
from ._common import RULE_CODES, check_logits_arg, check_temperature_arg, first_error, row_blocks

_NEG_INF = float("-inf")
_POS_INF = float("inf")
_DEFAULT_CAP = 100
_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of the three radix digits, most significant first


@dataclasses.dataclass
class _Plan:
    op: str
    group: _comm.ProcessGroup
    layout: _comm.VocabLayout
    inv_t: float
    temperature: float
    inv_t_rows: torch.Tensor | None  # per-row 1 / T, fp32 (rows,) (then inv_t and temperature are unused)
    greedy_rows: torch.Tensor | None  # sample: rows of temperature 0 (1 in inv_t_rows), if any
    alpha: float | None  # one alpha for every row (None: no Top-H, or per row)
    alpha_rows: torch.Tensor | None  # per-row alpha, fp32 (rows,) on the logits' device (0: Top-H off)
    rule: str
    k: int  # K = min(cap, V) of the capped rules
    shape: torch.Size


# ---------------------------------------------------------------------------
# Orderable keys
# ---------------------------------------------------------------------------


def _keys(x32: torch.Tensor) -> torch.Tensor:
    """Signed int32 orderable keys of fp32 values (a < b iff key(a) < key(b));
    -0.0 is keyed as +0.0 (they compare equal as logits). The unsigned key of
    core::orderable_key is this + 2^31 (see _ukeys)."""
    bits = (x32 + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _ukeys(keys: torch.Tensor) -> torch.Tensor:
    """core::orderable_key (uint32, as int64) from _keys."""
    return keys.to(torch.int64) + 0x80000000


def _key_to_float(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key >= 0x80000000, key - 0x80000000, 0xFFFFFFFF - key)
    bits = torch.where(bits >= 0x80000000, bits - 0x100000000, bits)
    return bits.to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------------------
# Arguments, metadata
# ---------------------------------------------------------------------------


def _prologue(
    op: str,
    logits: Any,
    alpha: float | torch.Tensor | None,
    temperature: float | torch.Tensor,
    rule: str,
    cap: int | None,
    group: Any,
    vocab_start: int | None,
    vocab_size: int | None = None,
    validate: bool = True,
):
    info = None
    if _dtensor.is_dtensor(logits):
        logits, info = _dtensor.unwrap_vocab_sharded(logits, -1, op, "logits")
        group = info.group
    group = _comm.resolve_group(group, op)

    def args() -> str | None:
        prefix = f"logitkit.distributed.{op}"
        if isinstance(alpha, torch.Tensor):
            return _check_alpha_rows(alpha, logits, prefix)
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            return f"{prefix}: alpha must be in (0, 1], got {alpha}"
        if rule not in RULE_CODES:
            return f"{prefix}: rule must be 'hf', 'official' or 'exact', got {rule!r}"
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            return f"{prefix}: cap must be >= 1 (or None for the rule's default), got {cap}"
        return None

    allow_greedy = op == "sample"  # (as single-device: the mask ops take no greedy rows)
    greedy_number = allow_greedy and isinstance(temperature, (int, float)) and temperature == 0

    def temperature_arg() -> str | None:
        if isinstance(temperature, torch.Tensor):
            return _check_temperature_rows(temperature, logits, f"logitkit.distributed.{op}", allow_greedy)
        return None if greedy_number else check_temperature_arg(temperature, op)

    local_error = first_error(lambda: check_logits_arg(logits, op, "logits"), temperature_arg, args)
    ok = local_error is None
    f = _comm.float_bits
    # (Per-row values only once every local check passed: until the metadata exchange has
    # reported a rank's error, no rank may raise anything else.)
    per_row = isinstance(alpha, torch.Tensor)
    alpha_rows = alpha.detach().float().reshape(-1) if (ok and isinstance(alpha, torch.Tensor)) else None
    alpha_number = None if (alpha is None or per_row or not ok) else float(alpha)
    alpha_check: int | torch.Tensor = -1
    if alpha_rows is not None:
        alpha_check = _rows_checksum(alpha_rows)
    elif alpha_number is not None:
        alpha_check = f(alpha_number)
    t_per_row = isinstance(temperature, torch.Tensor) or greedy_number
    t_rows = None
    if ok and isinstance(temperature, torch.Tensor):
        t_rows = temperature.detach().float().reshape(-1)
    elif ok and greedy_number:  # temperature 0: every row greedy
        t_rows = torch.zeros(logits.shape[:-1].numel(), dtype=torch.float32, device=logits.device)
    t_check: int | torch.Tensor = 0
    if ok:
        t_check = _rows_checksum(t_rows) if t_rows is not None else f(float(temperature))
    checks = [
        _comm.Check("the number of rows (logits.shape[:-1].numel())", logits.shape[:-1].numel() if ok else -1),
        _comm.Check("the dtype of logits", _comm.dtype_code(logits.dtype) if ok else -1, render="dtype"),
        _comm.Check("temperature given per row", int(t_per_row), render="bool"),
        _comm.Check("temperature", t_check, render="int" if t_per_row else "float"),
        _comm.Check("alpha (top_h) given per row", int(per_row), render="bool"),
        _comm.Check("alpha (top_h)", alpha_check, render="int" if per_row else "float"),
        _comm.Check("rule", RULE_CODES.get(rule, -1), names=tuple(RULE_CODES)),
        _comm.Check("cap", -1 if cap is None else int(cap) if ok else -2),
    ]
    layout = _comm.exchange_metadata(
        op,
        group,
        local_vocab=logits.shape[-1] if ok else 0,
        device=logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu"),
        checks=checks,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        local_error=local_error,
        validate=validate,
    )
    x2 = logits.reshape(logits.shape[:-1].numel(), logits.shape[-1])
    plan = _Plan(
        op=op,
        group=group,
        layout=layout,
        inv_t=1.0 if t_rows is not None else 1.0 / float(temperature),
        temperature=1.0 if t_rows is not None else float(temperature),
        inv_t_rows=None,
        greedy_rows=None,
        alpha=alpha_number,
        alpha_rows=alpha_rows,
        rule=rule,
        k=min(_DEFAULT_CAP if cap is None else int(cap), layout.vocab),
        shape=logits.shape,
    )
    if t_rows is not None:
        # fp32 1 / T, as the kernels' 1.0f / t; greedy rows (T = 0, or 1 / T overflowing: the
        # kernels' rule, filters.scaled_rows) take 1 and keep the max (ties drawn uniformly), as
        # single-device
        inverse = t_rows.reciprocal()
        greedy = ~scaled_rows(t_rows)
        plan.inv_t_rows = torch.where(greedy, torch.ones_like(inverse), inverse)
        plan.greedy_rows = greedy if bool(greedy.any()) else None  # (one host read; every rank's T agree)
        if plan.greedy_rows is not None and (plan.alpha is not None or plan.alpha_rows is not None):
            # a greedy row skips Top-H, as single-device: alpha 0 there (every token of the row in
            # the draw, whose greedy weights keep those equal to the max)
            alpha_rows = plan.alpha_rows
            if alpha_rows is None:
                alpha_rows = torch.full_like(t_rows, float(plan.alpha))  # type: ignore[arg-type]
            plan.alpha_rows = torch.where(plan.greedy_rows, torch.zeros_like(alpha_rows), alpha_rows)
            plan.alpha = None
    return logits, x2, plan, info


def _rows_checksum(values: torch.Tensor) -> torch.Tensor:
    """A per-row parameter's checksum over its fp32 bits (exact; a tensor, so the metadata
    all-gather carries it with no host read)."""
    return _comm.target_checksum(values.contiguous().view(torch.int32))


def _check_row_tensor(value: torch.Tensor, name: str, logits: Any, prefix: str) -> str | None:
    """A per-row parameter: a plain floating-point tensor of the local shard's rows shape on its device."""
    if _dtensor.is_dtensor(value):
        return (
            f"{prefix}: a per-row {name} must be a plain tensor of this rank's rows (logits.shape[:-1]), not a DTensor"
        )
    if not value.dtype.is_floating_point:
        return f"{prefix}: {name} must be a number or a floating-point tensor, got {value.dtype}"
    if not isinstance(logits, torch.Tensor):
        return None  # (the logits check reports it)
    if value.device != logits.device:
        return f"{prefix}: {name} is on {value.device} but logits is on {logits.device}"
    if value.shape != logits.shape[:-1]:
        return (
            f"{prefix}: {name} must be a number or a tensor of shape {list(logits.shape[:-1])} (one value per row), "
            f"got shape {list(value.shape)}"
        )
    return None


def _check_temperature_rows(temperature: torch.Tensor, logits: Any, prefix: str, allow_greedy: bool) -> str | None:
    """A per-row temperature, as single-device: for ``sample`` every value a finite number >= 0
    (0: greedy); for the mask ops a finite number > 0 whose fp32 1 / T is finite. One host read
    of a flag."""
    error = _check_row_tensor(temperature, "temperature", logits, prefix)
    if error is None and temperature.numel():
        t32 = temperature.detach().float()
        if allow_greedy and not bool((t32.isfinite() & (t32 >= 0)).all()):
            return f"{prefix}: temperature must be a finite number >= 0 per row (0: greedy)"
        if not allow_greedy and not bool(((t32 > 0) & t32.isfinite() & t32.reciprocal().isfinite()).all()):
            return f"{prefix}: temperature must be a finite number > 0 per row (with a finite 1 / T)"
    return error


def _check_alpha_rows(alpha: torch.Tensor, logits: Any, prefix: str) -> str | None:
    """A per-row alpha: every value in [0, 1] (0: Top-H off for that row), as single-device
    ``top_h_mask``. One host read of a flag."""
    error = _check_row_tensor(alpha, "alpha", logits, prefix)
    if error is None and alpha.numel() and not bool(((alpha >= 0) & (alpha <= 1)).all()):
        return f"{prefix}: alpha must be in [0, 1] per row (0: Top-H off for that row)"
    return error


def _alpha(plan: _Plan) -> float | torch.Tensor:
    """alpha for the selections: the number, or the per-row fp32 tensor."""
    if plan.alpha_rows is not None:
        return plan.alpha_rows
    assert plan.alpha is not None
    return plan.alpha


def _top_h_off(plan: _Plan) -> torch.Tensor | None:
    """Rows whose per-row alpha is 0 (Top-H off: every token kept, plain sampling), if any
    (one host read: the same decision on every rank, whose alphas agree)."""
    if plan.alpha_rows is None:
        return None
    off = plan.alpha_rows == 0
    return off if bool(off.any()) else None


def _inv_t32(plan: _Plan) -> torch.Tensor:
    """1 / T rounded to fp32, as the kernels use it (z = x * (1/T) in fp32)."""
    return torch.tensor(plan.inv_t, dtype=torch.float32)


def _scaled(x32: torch.Tensor, plan: _Plan, rows: Any = None) -> torch.Tensor:
    """z = x * (1/T) in fp32. With a per-row temperature, ``rows`` names the rows of x's first
    dimension (None: all rows; a slice or an index tensor); a 1-D x holds one value per row."""
    if plan.inv_t_rows is None:
        return x32 * _inv_t32(plan).to(x32.device)
    inv = plan.inv_t_rows if rows is None else plan.inv_t_rows[rows]
    return x32 * (inv if x32.dim() == 1 else inv.reshape(-1, *([1] * (x32.dim() - 1))))


def _softmax_stats(x2: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The per-row softmax states (m, s, b) of x / T (logitkit's kernel; a per-row T scales each
    row block in fp32 first, as the kernel would, and runs it at T = 1)."""
    if x2.shape[1] == 0:
        return _empty_state(x2)
    if plan.inv_t_rows is None:
        return _backend.ops().softmax_stats(x2, plan.temperature)
    out = torch.empty((x2.shape[0], 3), dtype=torch.float32, device=x2.device)
    for a, b in row_blocks(x2.shape[0], x2.shape[1]):
        out[a:b] = _backend.ops().softmax_stats(_scaled(x2[a:b].float(), plan, slice(a, b)), 1.0)
    return out


# ---------------------------------------------------------------------------
# Capped rules
# ---------------------------------------------------------------------------


def _local_top(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's first ``k`` tokens in rank order (value desc, index asc):
    fp32 values and local indices, (rows, min(k, V_r)), ordered."""
    rows, cols = x2.shape
    if cols <= k:
        vals = x2.float()
        idx = torch.arange(cols, device=x2.device).expand(rows, cols)
    else:
        v, i = torch.topk(x2, k + 1, dim=-1, sorted=True)
        straddle = v[:, k - 1] == v[:, k]  # a tie across the K-th place: topk may have kept a higher index
        vals, idx = v[:, :k].float(), i[:, :k]
        if bool(straddle.any()):
            vals, idx = vals.clone(), idx.clone()
            bad = straddle.nonzero().squeeze(1)
            for a, b in row_blocks(bad.numel(), cols, 16):
                r = bad[a:b]
                xr = x2[r].float()
                thr = vals[r, k - 1][:, None]
                gt = (xr > thr) | xr.isnan()  # NaN ranks first, as in topk (the row is then undefined)
                eq = xr == thr
                room = k - gt.sum(-1, keepdim=True)
                keep = gt | (eq & (eq.cumsum(-1) <= room))
                cols_kept = keep.nonzero()[:, 1].reshape(-1, k)
                idx[r] = cols_kept
                vals[r] = xr.gather(1, cols_kept)
    return _rank_sort(vals, idx)


def _rank_sort(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orders each row by (value desc, index asc); NaN first."""
    order = torch.argsort(idx, dim=-1, stable=True)
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    order = torch.argsort(vals, dim=-1, descending=True, stable=True)
    return vals.gather(-1, order), idx.gather(-1, order)


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in fp32, term by term in order (as the
    C++ loops of core::capped_keep_count)."""
    acc = torch.zeros(t.shape[:-1], dtype=torch.float32, device=t.device)
    for i in range(t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def _capped_keep_count(
    z: torch.Tensor, rule: str, full_lse: torch.Tensor | None, alpha: float | torch.Tensor
) -> torch.Tensor:
    """core::capped_keep_count for every row of the sorted top-K scaled logits z (rows, K);
    alpha a number or one fp32 value per row."""
    rows, k = z.shape
    if rule == "hf":
        top = z[:, 0]
        lse = top + torch.log(_seq_sum(torch.exp(z - top[:, None])))
    else:
        assert full_lse is not None
        lse = full_lse
    p = torch.exp(z - lse[:, None])
    h = torch.where(p == 0, torch.zeros_like(p), p * (lse[:, None] - z))
    tau = alpha * _seq_sum(h)
    kept = torch.ones(rows, dtype=torch.int64, device=z.device)
    alive = torch.ones(rows, dtype=torch.bool, device=z.device)
    c = h[:, 0]
    for i in range(1, k):
        c = c + h[:, i]
        ok = alive & (p[:, i] != 0) & (c <= tau)
        kept = kept + ok.to(torch.int64)
        alive = ok
    return kept


class _CappedCut:
    """The explicit kept list of every row (capped rules)."""

    def __init__(
        self, gidx: torch.Tensor, z: torch.Tensor, kept: torch.Tensor, defined: torch.Tensor, u: torch.Tensor | None
    ):
        self.gidx, self.z, self.kept, self.defined, self.u = gidx, z, kept, defined, u


def _capped_select(x2: torch.Tensor, plan: _Plan, u: torch.Tensor | None) -> _CappedCut:
    lay = plan.layout
    rows = x2.shape[0]
    k = plan.k
    vals, idx = _local_top(x2, k)
    n_local = vals.shape[1]
    big = float(lay.vocab + 1 + lay.rank)  # placeholder index: ranks after every real token
    pad = k - n_local
    gidx = (idx + lay.v0).double()
    vals64 = vals.double()
    if pad > 0:
        vals64 = torch.nn.functional.pad(vals64, (0, pad), value=_NEG_INF)
        gidx = torch.nn.functional.pad(gidx, (0, pad), value=big)
    extra = []
    if plan.rule == "official":
        state = _softmax_stats(x2, plan)
        extra += [state[:, 0].double(), state[:, 1].double()]
    if u is not None:
        extra.append(u.double())
    payload = torch.cat([vals64, gidx] + [e[:, None] for e in extra], -1)
    gathered = _comm.all_gather(payload, plan.group, "top_k")  # (W, rows, 2k + extra)
    cand_v = gathered[:, :, :k].permute(1, 0, 2).reshape(rows, -1)
    cand_i = gathered[:, :, k : 2 * k].permute(1, 0, 2).reshape(rows, -1)
    cand_v, cand_i = _rank_sort(cand_v, cand_i)
    top_v, top_i = cand_v[:, :k].float(), cand_i[:, :k].to(torch.int64)
    first = top_v[:, 0]
    defined = ~(torch.isnan(first) | (first == _POS_INF))
    col = 2 * k
    full_lse = None
    if plan.rule == "official":
        from ._merge import merge_gathered

        m, s, _, _ = merge_gathered(gathered[:, :, col].float(), gathered[:, :, col + 1].float(), None)
        full_lse = torch.where(m == _POS_INF, m, m + torch.log(s))
        col += 2
    u_group = gathered[0, :, col].float() if u is not None else None
    z = _scaled(top_v, plan)
    safe_z = torch.where(defined[:, None], z, torch.zeros_like(z))
    if plan.alpha is None and plan.alpha_rows is None:
        kept = torch.full((rows,), k, dtype=torch.int64, device=x2.device)
    else:
        kept = _capped_keep_count(safe_z, plan.rule, full_lse, _alpha(plan))
    all_neg_inf = first == _NEG_INF
    kept = torch.where(all_neg_inf, torch.ones_like(kept), kept)  # only -inf: token 0 (index order breaks the tie)
    return _CappedCut(top_i, z, kept, defined, u_group)


def _empty_state(x2: torch.Tensor) -> torch.Tensor:
    st = x2.new_zeros((x2.shape[0], 3), dtype=torch.float32)
    st[:, 0] = _NEG_INF
    return st


def _capped_mask(x2: torch.Tensor, cut: _CappedCut, plan: _Plan) -> torch.Tensor:
    lay = plan.layout
    rows, cols = x2.shape
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=x2.device)
    k = cut.gidx.shape[1]
    sel = torch.arange(k, device=x2.device)[None] < cut.kept[:, None]
    sel &= (cut.gidx >= lay.v0) & (cut.gidx < lay.v1) & cut.defined[:, None]
    r, j = sel.nonzero(as_tuple=True)
    mask[r, cut.gidx[r, j] - lay.v0] = True
    return mask


def _capped_sample(cut: _CappedCut, greedy_rows: torch.Tensor | None) -> torch.Tensor:
    """Inverse CDF over the kept list in vocabulary-index order (as the
    single-device draw walks the row): the first kept token whose running
    weight exp(z - max z) exceeds u * (kept mass), else the last one of
    positive weight."""
    rows, k = cut.gidx.shape
    order = torch.argsort(cut.gidx, dim=-1)
    gidx = cut.gidx.gather(1, order)
    z = cut.z.gather(1, order)
    in_set = (torch.arange(k, device=z.device)[None] < cut.kept[:, None]).gather(1, order)
    top = cut.z[:, 0:1]
    w = torch.where(in_set, torch.exp(z - top), torch.zeros_like(z))
    if greedy_rows is not None:  # the kept tokens equal to the max, each of weight 1
        w = torch.where(greedy_rows[:, None], (in_set & (z == top)).to(w.dtype), w)
    running = torch.zeros(rows, dtype=torch.float32, device=z.device)
    cums = []
    for i in range(k):
        running = running + w[:, i]
        cums.append(running)
    cum = torch.stack(cums, -1)
    assert cut.u is not None
    target = cut.u * running
    hit = (cum > target[:, None]) & (w > 0)
    positive = w > 0
    pos = torch.where(hit.any(-1), hit.int().argmax(-1), k - 1 - positive.flip(-1).int().argmax(-1))
    token = gidx.gather(1, pos[:, None]).squeeze(1)
    all_neg_inf = cut.z[:, 0] == _NEG_INF
    token = torch.where(all_neg_inf, torch.zeros_like(token), token)
    return torch.where(cut.defined, token, torch.full_like(token, -1))


# ---------------------------------------------------------------------------
# "exact": radix selection over orderable keys
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _ExactCut:
    """Per row: keep x > thr, plus the first ``quota`` local tokens equal to
    thr (index order); ``allfit`` rows keep every token of positive
    probability; undefined rows keep nothing; ``neg_inf`` rows keep global
    token 0 only. ``m``: the global max of z; ``per_rank_mass`` (W, rows):
    each rank's kept mass relative to m (sampling); ``u``: the group's
    uniform numbers (sampling)."""

    thr: torch.Tensor
    quota: torch.Tensor
    allfit: torch.Tensor
    undefined: torch.Tensor
    neg_inf: torch.Tensor
    m: torch.Tensor
    per_rank_mass: torch.Tensor | None
    u: torch.Tensor | None


def _bin_refs(plan: _Plan, device: torch.device) -> torch.Tensor:
    """z at the upper end of every first-digit bin: fp32 (2048,), or (rows, 2048) with a
    per-row temperature."""
    upper = _key_to_float((torch.arange(2048, device=device, dtype=torch.int64) << 21) | ((1 << 21) - 1))
    if plan.inv_t_rows is None:
        return _scaled(upper, plan)
    return upper[None] * plan.inv_t_rows[:, None]


def _histogram(flat: torch.Tensor, e: torch.Tensor, de: torch.Tensor, bins: int) -> torch.Tensor:
    """(bins, 3) fp64 [count, sum e, sum d e] of the elements whose flat bin
    index is < bins (one bincount each; index ``bins`` collects the rest)."""
    flat = flat.reshape(-1)
    cnt = torch.bincount(flat, minlength=bins + 1)[:bins].double()
    se = torch.bincount(flat, weights=e.reshape(-1), minlength=bins + 1)[:bins]
    sd = torch.bincount(flat, weights=de.reshape(-1), minlength=bins + 1)[:bins]
    return torch.stack([cnt, se, sd], -1)


def _first_pass(x2: torch.Tensor, plan: _Plan):
    """State (m, s, b) per row and the first digit's histogram: bins relative
    to their upper end, the tokens of the rank's own top bin as a state.
    Sums are fp64 of fp32 terms (as the CPU kernel's bucket sums): a peaked
    row's H(p) ~ 1e-7 lives in digits an fp32 sum of e ~ 1 would drop."""
    rows, cols = x2.shape
    dev = x2.device
    refs = _bin_refs(plan, dev)
    hist = torch.zeros((rows, 2048, 3), dtype=torch.float64, device=dev)
    state = torch.zeros((rows, 7), dtype=torch.float64, device=dev)  # m, s, b, top bin, count, s_top, b_top
    state[:, 0] = _NEG_INF
    state[:, 3] = -1
    if cols == 0:
        return state, hist
    for a, b in row_blocks(rows, cols, 64):
        x = x2[a:b].float()
        z = _scaled(x, plan, slice(a, b))
        m = z.amax(-1, keepdim=True)
        d = z - m
        e = torch.exp(d).nan_to_num_(0.0)  # all -inf / NaN / +inf rows: no probability (flagged by m)
        pos = e > 0
        d.masked_fill_(~pos, 0.0)
        e64 = e.double()
        de = d.double() * e64
        digit = (_keys(x) >> 21) + 1024  # the top 11 bits of the unsigned key
        top = digit.amax(-1, keepdim=True)
        in_top = digit == top
        state[a:b, 0] = m.squeeze(1).double()
        state[a:b, 1] = e64.sum(-1)
        state[a:b, 2] = de.sum(-1)
        state[a:b, 3] = top.squeeze(1).double()
        state[a:b, 4] = (in_top & pos).sum(-1).double()
        state[a:b, 5] = (e64 * in_top).sum(-1)
        state[a:b, 6] = (de * in_top).sum(-1)
        # Every other token of positive probability, relative to its bin's upper end.
        dd = z - (refs[digit.long()] if refs.dim() == 1 else refs[a:b].gather(1, digit.long()))
        ee = torch.exp(dd).double()
        n = b - a
        flat = torch.arange(n, device=dev)[:, None] * 2048 + digit
        flat.masked_fill_(in_top | ~pos, n * 2048)
        hist[a:b] = _histogram(flat, ee, dd.double() * ee, n * 2048).view(n, 2048, 3)
    return state, hist


def _digit_pass(
    x2: torch.Tensor, rows_idx: torch.Tensor, prefix: torch.Tensor, m: torch.Tensor, plan: _Plan
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The second digit: histogram (len(rows_idx), 2048, 3) fp64 relative to
    the global max m of the tokens whose first digit is ``prefix``; those
    tokens are also returned as candidates (position in rows_idx, key,
    d = z - m), so that the last digit needs no further read of the logits.
    Only the keys are computed for the whole row; the rest for the candidates."""
    shift, bits = _DIGITS[1]
    nbins = 1 << bits
    n, cols = rows_idx.numel(), x2.shape[1]
    cand_r, cand_k, cand_d = [], [], []
    for a, b in row_blocks(n, cols if n else 0, 16):
        x = x2[rows_idx[a:b]].float()
        skey = _keys(x)
        r, c = ((skey >> 21) + 1024 == prefix[a:b, None]).nonzero(as_tuple=True)
        d = _scaled(x[r, c], plan, rows_idx[a:b][r]) - m[a + r]
        cand_r.append(r + a)
        cand_k.append(_ukeys(skey[r, c]))
        cand_d.append(d)
    dev = x2.device
    r = torch.cat(cand_r) if cand_r else torch.zeros(0, dtype=torch.int64, device=dev)
    key = torch.cat(cand_k) if cand_k else torch.zeros(0, dtype=torch.int64, device=dev)
    d = torch.cat(cand_d) if cand_d else torch.zeros(0, device=dev)
    e = torch.exp(d)
    keep = e > 0
    r, key, d, e = r[keep], key[keep], d[keep], e[keep]
    flat = r * nbins + ((key >> shift) & (nbins - 1))
    e64 = e.double()
    hist = _histogram(flat, e64, d.double() * e64, n * nbins).view(n, nbins, 3)
    return hist, (r, key, d)


def _candidate_pass(
    cands: tuple[torch.Tensor, torch.Tensor, torch.Tensor], pos: torch.Tensor, prefix: torch.Tensor, n: int
) -> torch.Tensor:
    """The last digit from the second digit's candidates: histogram (n, 1024, 3)
    of the candidates of rows with position ``pos[row] >= 0`` whose key
    matches ``prefix`` on the upper 22 bits."""
    shift, bits = _DIGITS[2]
    nbins = 1 << bits
    r, key, d = cands
    p = pos[r]
    sel = p >= 0
    p_safe = p.clamp(min=0)
    sel &= (key >> bits) == prefix[p_safe]
    flat = p_safe * nbins + (key & (nbins - 1))
    flat = flat.masked_fill(~sel, n * nbins)
    e64 = torch.exp(d).double()
    hist = _histogram(flat, e64, d.double().masked_fill(~sel, 0.0) * e64, n * nbins)
    del shift
    return hist.view(n, nbins, 3)


def _walk(hist: torch.Tensor, above_e: torch.Tensor, above_d: torch.Tensor, budget: torch.Tensor):
    """Walks the bins from the largest key down. Returns (cut bin, failed?,
    sums above the cut bin, count in the cut bin). Without a failing bin the
    cut is the last non-empty bin."""
    nb = hist.shape[1]
    flipped = hist.flip(1).double()
    cnt, e, de = flipped[..., 0], flipped[..., 1], flipped[..., 2]
    cum_e = above_e[:, None] + e.cumsum(1)
    cum_d = above_d[:, None] + de.cumsum(1)
    h = torch.log(cum_e) - cum_d / cum_e
    nonempty = cnt > 0
    fail = nonempty & (h > budget[:, None])
    failed = fail.any(1)
    pos_arange = torch.arange(nb, device=hist.device)
    first_fail = torch.where(fail, pos_arange, nb).amin(1)
    last_nonempty = torch.where(nonempty, pos_arange, -1).amax(1).clamp(min=0)
    pos = torch.where(failed, first_fail, last_nonempty)
    before = (pos_arange[None] < pos[:, None]).double()
    new_e = above_e + (e * before).sum(1)
    new_d = above_d + (de * before).sum(1)
    count = cnt.gather(1, pos[:, None]).squeeze(1)
    return (nb - 1 - pos), failed, new_e, new_d, count


def _local_above(hist_local: torch.Tensor, cut_bin: torch.Tensor) -> torch.Tensor:
    """sum e of this rank's bins above the cut bin, fp64 (hist relative to m)."""
    nb = hist_local.shape[1]
    above = torch.arange(nb, device=hist_local.device)[None] > cut_bin[:, None]
    return (hist_local[..., 1].double() * above).sum(1)


def _exact_select(x2: torch.Tensor, plan: _Plan, u: torch.Tensor | None, need_mass: bool) -> _ExactCut:
    lay = plan.layout
    rows, dev = x2.shape[0], x2.device
    state, hist_local = _first_pass(x2, plan)
    hist = hist_local.clone()
    payload = state if u is None else torch.cat([state, u[:, None].double()], -1)
    work = _comm.all_reduce_async(hist, plan.group, "histogram")
    gathered = _comm.all_gather(payload, plan.group, "state")  # (W, rows, 7 or 8)
    work.wait()
    gm, gs, gb = gathered[..., 0], gathered[..., 1], gathered[..., 2]  # fp64 (m exact: an fp32 value)
    from ._merge import merge_gathered

    big_m64, big_s, big_b, f = merge_gathered(gm, gs, gb)
    big_m = big_m64.float()
    # core::exact_budget(alpha, float(H(p))): the budget is an fp32 number, as single-device.
    h_p = (torch.log(big_s) - big_b / big_s).float()
    # alpha per row (fp32), or the one alpha in every row; alpha >= 1, or 0 (a row's Top-H off),
    # keeps every token: no budget
    if plan.alpha_rows is not None:
        a = plan.alpha_rows.to(h_p.device)
    else:
        a = torch.full_like(h_p, 1.0 if plan.alpha is None else plan.alpha)
    budget = torch.where((a >= 1.0) | (a == 0.0), _POS_INF, (a * h_p).clamp(min=0.0)).double()
    undefined = torch.isnan(big_m) | (big_m == _POS_INF) | torch.isnan(big_s)
    neg_inf = big_m == _NEG_INF
    live = ~(undefined | neg_inf)
    safe_m = torch.where(live, big_m, torch.zeros_like(big_m))
    # Global first-digit bins relative to the global max.
    refs = _bin_refs(plan, dev).double()
    shift = (refs[None] if refs.dim() == 1 else refs) - safe_m.double()[:, None]
    scale = torch.exp(shift)
    cnt1, e1, de1 = hist[..., 0], hist[..., 1], hist[..., 2]
    occupied = cnt1 > 0
    g_e = torch.where(occupied, e1 * scale, torch.zeros_like(e1))
    g_d = torch.where(occupied, scale * (de1 + shift * e1), torch.zeros_like(de1))
    # Each rank's top-bin state, rescaled and added at its bin.
    top_bin = gathered[..., 3].long().clamp(min=0)  # (W, rows)
    top_cnt = gathered[..., 4]
    sh = gm - safe_m.double()[None]
    top_e = torch.where(top_cnt > 0, f * gathered[..., 5], torch.zeros_like(top_cnt))
    top_d = torch.where(top_cnt > 0, f * (gathered[..., 6] + sh * gathered[..., 5]), torch.zeros_like(top_cnt))
    g_cnt = cnt1.clone()
    for w in range(gathered.shape[0]):
        g_cnt.scatter_add_(1, top_bin[w][:, None], top_cnt[w][:, None])
        g_e.scatter_add_(1, top_bin[w][:, None], top_e[w][:, None])
        g_d.scatter_add_(1, top_bin[w][:, None], top_d[w][:, None])
    hist1 = torch.stack([g_cnt, g_e, g_d], -1)
    zero = torch.zeros(rows, dtype=torch.float64, device=dev)
    cut1, failed1, above_e, above_d, count1 = _walk(hist1, zero, zero, budget)
    allfit = live & ~failed1
    resolved = ~live | allfit | (failed1 & (count1 == 1))
    # This rank's kept mass so far (relative to the global max), for sampling.
    my_f = f[lay.rank]
    my_scale = torch.where(occupied, scale, torch.zeros_like(scale))
    local_e1 = hist_local[..., 1] * my_scale
    my_top = state[:, 3].long()
    mass = (local_e1.double() * (torch.arange(2048, device=dev)[None] > cut1[:, None])).sum(1)
    mass += torch.where(my_top > cut1, (my_f * state[:, 5]).double(), torch.zeros_like(mass))
    thr = _key_to_float(((cut1 << 21) | ((1 << 21) - 1)).clamp(min=0))  # early exit: keep x > upper end of the cut bin
    prefix = cut1.clone()
    quota = torch.zeros(rows, dtype=torch.int64, device=dev)
    tie_count = torch.zeros(rows, dtype=torch.int64, device=dev)
    partial_tie = torch.zeros(rows, dtype=torch.bool, device=dev)
    j_total = torch.zeros(rows, dtype=torch.int64, device=dev)
    group_n = torch.zeros(rows, dtype=torch.int64, device=dev)
    group_e = torch.zeros(rows, dtype=torch.float64, device=dev)
    cands = None
    todo1 = None
    for digit in (1, 2):
        todo = (~resolved).nonzero().squeeze(1)
        if todo.numel() == 0:  # the same decision on every rank: it comes from reduced data
            break
        shift_d, bits = _DIGITS[digit]
        if digit == 1:  # a read pass over the rows still open; keeps the cut bin's tokens
            h_local, cands = _digit_pass(x2, todo, prefix[todo], big_m[todo], plan)
            todo1 = todo
        else:  # from those candidates: no read of the logits
            assert cands is not None and todo1 is not None
            pos = torch.full((rows,), -1, dtype=torch.int64, device=dev)
            pos[todo] = torch.arange(todo.numel(), device=dev)
            cand_rows = (todo1[cands[0]], cands[1], cands[2])
            h_local = _candidate_pass(cand_rows, pos, prefix[todo], todo.numel())
        h_glob = h_local.clone().contiguous()
        _comm.all_reduce(h_glob, plan.group, "histogram")
        cut, failed, ae, ad, cnt = _walk(h_glob, above_e[todo], above_d[todo], budget[todo])
        mass[todo] += _local_above(h_local, cut)
        above_e[todo], above_d[todo] = ae, ad
        prefix[todo] = (prefix[todo] << bits) | cut
        if digit == 1:
            early = failed & (cnt == 1)
            key_hi = (prefix[todo] << shift_d) | ((1 << shift_d) - 1)
            thr[todo] = torch.where(early, _key_to_float(key_hi), thr[todo])
            resolved[todo[early]] = True
            continue
        # Last digit: the cut bin is one logit value, a tie group of n tokens.
        x_c = _key_to_float(prefix[todo])
        z_c = _scaled(x_c, plan, todo)
        d_c = z_c - big_m[todo]
        e_c = torch.exp(d_c).double()
        de_c = d_c.double() * e_c
        n = cnt.to(torch.int64)
        lo = torch.where(ae > 0, torch.zeros_like(n), torch.ones_like(n)).minimum(n)  # at least one token
        hi = n.clone()
        bud = budget[todo]
        for _ in range(40):  # largest j in [lo, n] with H(above + j tokens) <= budget (H grows with j)
            active = lo < hi
            mid = (lo + hi + 1) // 2
            te = ae + mid.double() * e_c
            td = ad + mid.double() * de_c
            fits = (torch.log(te) - td / te) <= bud
            lo = torch.where(active & fits, mid, lo)
            hi = torch.where(active & ~fits, mid - 1, hi)
        j = lo.clamp(max=n)
        thr[todo] = x_c
        local_n = h_local[..., 0].gather(1, cut[:, None]).squeeze(1).to(torch.int64)
        tie_count[todo] = local_n
        j_total[todo] = j
        group_n[todo] = n
        group_e[todo] = e_c
        partial_tie[todo] = (j > 0) & (j < n)
        quota[todo] = torch.where(j >= n, local_n, torch.zeros_like(local_n))  # refined below if partial
        resolved[todo] = True
    per_rank_mass = None
    if need_mass or bool(partial_tie.any()):
        # One small all-gather: this rank's tie-group count (and kept mass before ties).
        info = torch.stack([tie_count.double(), mass], -1)
        g = _comm.all_gather(info, plan.group, "tie_counts")  # (W, rows, 2)
        order = lay.rank_order()
        counts = g[..., 0].to(torch.int64)
        before = torch.zeros(rows, dtype=torch.int64, device=dev)
        quotas = torch.zeros_like(counts)
        for r in order:
            quotas[r] = (j_total - before).clamp(min=0).minimum(counts[r])
            before = before + counts[r]
        tie = group_n > 0
        quota = torch.where(tie, quotas[lay.rank], quota)
        per_rank_mass = g[..., 1] + quotas.double() * group_e[None]
        # all-fit rows: every rank's mass is its whole (rescaled) state
        per_rank_mass = torch.where(allfit[None], (f * gs).double(), per_rank_mass)
    return _ExactCut(
        thr=thr,
        quota=quota,
        allfit=allfit,
        undefined=undefined,
        neg_inf=neg_inf,
        m=big_m,
        per_rank_mass=per_rank_mass,
        u=gathered[0, :, 7] if u is not None else None,
    )


def _keep_rows(x: torch.Tensor, ridx: torch.Tensor, cut: _ExactCut, plan: _Plan) -> torch.Tensor:
    """The kept mask of rows ``ridx`` of this rank's shard (x: their fp32 logits)."""
    lay = plan.layout
    thr = cut.thr[ridx][:, None]
    keep = x > thr
    quota = cut.quota[ridx]
    partial = quota > 0
    if bool(partial.any()):
        sub = partial.nonzero().squeeze(1)
        eq = x[sub] == thr[sub]
        keep[sub] |= eq & (eq.cumsum(-1) <= quota[sub][:, None])
    allfit = cut.allfit[ridx]
    if bool(allfit.any()):
        sub = allfit.nonzero().squeeze(1)
        keep[sub] = torch.exp(_scaled(x[sub], plan, ridx[sub]) - cut.m[ridx[sub]][:, None]) > 0
    keep &= ~(cut.undefined[ridx] | cut.neg_inf[ridx])[:, None]
    neg = cut.neg_inf[ridx]
    if lay.v0 == 0 and lay.local > 0 and bool(neg.any()):
        keep[:, 0] |= neg
    return keep


def _exact_mask(x2: torch.Tensor, cut: _ExactCut, plan: _Plan) -> torch.Tensor:
    rows, cols = x2.shape
    mask = torch.empty((rows, cols), dtype=torch.bool, device=x2.device)
    for a, b in row_blocks(rows, cols, 16):
        mask[a:b] = _keep_rows(x2[a:b].float(), torch.arange(a, b, device=x2.device), cut, plan)
    return mask


def _draw_in_shard(
    x2: torch.Tensor, rows_idx: torch.Tensor, target: torch.Tensor, m: torch.Tensor, cut: _ExactCut | None, plan: _Plan
) -> torch.Tensor:
    """Local index of the first kept token (index order) whose running weight
    exp(z - m) exceeds ``target`` on rows ``rows_idx`` of this shard; the last
    kept token of positive weight when rounding runs past the end."""
    cols = x2.shape[1]
    out = torch.full((rows_idx.numel(),), -1, dtype=torch.int64, device=x2.device)
    for a, b in row_blocks(rows_idx.numel(), cols, 24):
        r = rows_idx[a:b]
        x = x2[r].float()
        w = torch.exp(_scaled(x, plan, r) - m[a:b, None])
        if plan.greedy_rows is not None:  # greedy rows: weight 1 for the max (z = x there), 0 elsewhere
            w = torch.where(plan.greedy_rows[r][:, None], (x == m[a:b, None]).to(w.dtype), w)
        if cut is not None:
            w = torch.where(_keep_rows(x, r, cut, plan), w, torch.zeros_like(w))
        cum = w.double().cumsum(-1)
        t = target[a:b].double()
        pos = torch.searchsorted(cum, t[:, None].contiguous(), right=True).squeeze(1)
        positive = w > 0
        last = cols - 1 - positive.flip(-1).int().argmax(-1)
        out[a:b] = torch.where(pos < cols, pos, last)
    return out


def _finish_draw(
    x2: torch.Tensor, plan: _Plan, masses: torch.Tensor, u: torch.Tensor, m: torch.Tensor, cut: _ExactCut | None
) -> torch.Tensor:
    """From the per-rank kept masses (W, rows): the rank holding each row's
    draw scans its shard; one MAX all-reduce gives every rank the token."""
    lay = plan.layout
    rows = x2.shape[0]
    order = lay.rank_order()
    m_ordered = masses[order].double()  # (W, rows) in vocabulary order
    total = m_ordered.sum(0)
    target = u.double() * total
    cum = m_ordered.cumsum(0)
    hit = cum > target[None]
    positive = m_ordered > 0
    any_hit = hit.any(0)
    w_count = len(order)
    first = torch.where(hit, torch.arange(w_count, device=x2.device)[:, None], w_count).amin(0)
    last_pos = torch.where(positive, torch.arange(w_count, device=x2.device)[:, None], -1).amax(0)
    owner_pos = torch.where(any_hit, first, last_pos)
    my_pos = order.index(lay.rank)
    before = torch.where(
        owner_pos[None] > torch.arange(w_count, device=x2.device)[:, None], m_ordered, torch.zeros_like(m_ordered)
    ).sum(0)
    mine = (owner_pos == my_pos).nonzero().squeeze(1)
    token = torch.full((rows,), -1, dtype=torch.int64, device=x2.device)
    if mine.numel():
        local_target = torch.where(any_hit[mine], target[mine] - before[mine], torch.full_like(target[mine], _POS_INF))
        idx = _draw_in_shard(x2, mine, local_target, m[mine], cut, plan)
        token[mine] = torch.where(idx >= 0, idx + lay.v0, idx)
    _comm.all_reduce(token, plan.group, "token", op="max")
    return token


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def top_h_mask(
    logits: Any,
    alpha: float | torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    rule: str = "hf",
    cap: int | None = None,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
) -> Any:
    """This rank's slice (bool, shape of the local shard) of the Top-H keep
    mask of the concatenated logits: the same kept sets as
    :func:`logitkit.top_h_mask` for every rule ("hf", "official", "exact"),
    the same tie rule (equal logits: the lower global index ranks first) and
    special rows (NaN/+inf: nothing kept; only -inf: global token 0).

    ``alpha`` may be a tensor of shape ``logits.shape[:-1]`` (this rank's rows; the same values
    on every rank, which the metadata exchange checks by a checksum), one alpha per row in
    [0, 1]; a row whose alpha is 0 is not truncated (all True, whatever it holds), as
    single-device. ``temperature`` may also be such a tensor (every value a finite number > 0).
    Checking per-row values costs one host read each.

    Cost (read passes over the local logits / collectives besides the
    metadata all-gather): "hf" 1 / one all-gather of 2K fp64 per row
    (K = min(cap, V)); "official" 2 / the same with 2 more fp64 per row; "exact" 2-3 / 2-5 histogram
    and state collectives of at most (rows, 2048, 3) fp32. See the module
    documentation."""
    logits, x2, plan, info = _prologue(
        "top_h_mask", logits, alpha, temperature, rule, cap, group, vocab_start, vocab_size, validate
    )
    mask = _mask(x2, plan).reshape(plan.shape)
    if info is not None:
        return _dtensor.wrap_like(mask, info, info.global_shape)
    return mask


def _mask(x2: torch.Tensor, plan: _Plan) -> torch.Tensor:
    if plan.rule == "exact":
        mask = _exact_mask(x2, _exact_select(x2, plan, None, need_mass=False), plan)
    else:
        mask = _capped_mask(x2, _capped_select(x2, plan, None), plan)
    off = _top_h_off(plan)
    if off is not None:  # per-row alpha 0: not truncated, whatever the row holds (single-device's rule)
        mask[off] = True
    return mask


def top_h(
    logits: Any,
    alpha: float | torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    rule: str = "hf",
    cap: int | None = None,
    filter_value: float = _NEG_INF,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
) -> Any:
    """This rank's shard of Top-H truncated logits: unchanged where
    :func:`top_h_mask` keeps the token, ``filter_value`` elsewhere."""
    logits, x2, plan, info = _prologue(
        "top_h", logits, alpha, temperature, rule, cap, group, vocab_start, vocab_size, validate
    )
    mask = _mask(x2, plan)
    out = torch.where(mask, x2, torch.tensor(filter_value, dtype=x2.dtype, device=x2.device)).reshape(plan.shape)
    if info is not None:
        return _dtensor.wrap_like(out, info, info.global_shape)
    return out


def sample(
    logits: Any,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_h: float | torch.Tensor | None = None,
    rule: str = "hf",
    cap: int | None = None,
    generator: torch.Generator | None = None,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
) -> Any:
    """One token per row (int64 *global* vocabulary ids, shape (...), the same
    on every rank) from softmax(logits / temperature) over the whole
    vocabulary, restricted to the Top-H kept set when ``top_h`` (alpha) is
    given: the token :func:`logitkit.sample` draws from the concatenated
    logits with the same generator state.

    ``top_h`` and ``temperature`` may be per-row tensors as in :func:`top_h_mask` (alpha 0:
    Top-H off for that row, which then draws over its whole vocabulary). Temperature 0 (a
    number or rows of the tensor) is greedy, as single-device: such a row skips Top-H and draws
    uniformly among the tokens equal to its max.

    Every rank draws ``torch.rand(logits.shape[:-1], generator=generator)``
    (so every rank's generator advances as single-device), and the group
    uses the numbers of its first rank: generators seeded alike give the
    single-device tokens, and ranks whose generators differ still agree.

    Cost: plain sampling 2 read passes (state; the draw on the rank holding
    it) and 2 collectives (states all-gather, tokens all-reduce); "hf" 1 pass
    and "official" 2, 1 all-gather, no further pass or collective; "exact"
    2-3 passes (the last on the drawing rank only), 4-6 collectives."""
    op = "sample"
    logits, x2, plan, info = _prologue(
        op, logits, top_h, temperature, rule, cap, group, vocab_start, vocab_size, validate
    )
    dev = x2.device
    u = torch.rand(plan.shape[:-1], generator=generator, device=dev, dtype=torch.float32).reshape(-1)
    if top_h is not None and rule != "exact":
        tokens = _capped_sample(_capped_select(x2, plan, u), plan.greedy_rows)
        off = _top_h_off(plan)
        if off is not None:  # per-row alpha 0: plain draws for those rows only (the same uniform numbers)
            rows = off.nonzero().squeeze(1)
            tokens[rows] = _plain_sample(x2[rows], _rows_plan(plan, rows), u[rows])
    elif top_h is not None:  # (per-row alpha 0: no budget, every token of the row in the draw)
        cut = _exact_select(x2, plan, u, need_mass=True)
        tokens = _finish_sample(x2, plan, cut)
    else:
        tokens = _plain_sample(x2, plan, u)
    tokens = tokens.reshape(plan.shape[:-1])
    if info is not None:
        return _dtensor.wrap_rowwise(tokens, info, torch.Size(info.global_shape[:-1]))
    return tokens


def _rows_plan(plan: _Plan, rows: torch.Tensor) -> _Plan:
    """The plan for a subset of the rows (x2[rows]): the per-row parameters taken at those rows.
    (Every rank takes the same subset: it comes from per-row values the ranks agree on.)"""
    greedy = None if plan.greedy_rows is None else plan.greedy_rows[rows]
    return dataclasses.replace(
        plan,
        inv_t_rows=None if plan.inv_t_rows is None else plan.inv_t_rows[rows],
        greedy_rows=greedy if greedy is not None and bool(greedy.any()) else None,
        alpha_rows=None if plan.alpha_rows is None else plan.alpha_rows[rows],
        shape=torch.Size((rows.numel(), plan.shape[-1])),
    )


def _plain_sample(x2: torch.Tensor, plan: _Plan, u: torch.Tensor) -> torch.Tensor:
    """Plain temperature sampling over the whole vocabulary (the group's uniform numbers: the
    first rank's ``u``): the state pass, one all-gather of the states, the draw."""
    state = _softmax_stats(x2, plan)
    gathered = _comm.all_gather(torch.cat([state[:, :2], u[:, None]], -1), plan.group, "state")
    from ._merge import merge_gathered

    big_m, big_s, _, f = merge_gathered(gathered[..., 0], gathered[..., 1], None)
    cut = _ExactCut(
        thr=torch.full_like(big_m, _NEG_INF),  # every token (of positive weight)
        quota=torch.zeros_like(big_m, dtype=torch.int64),
        allfit=torch.zeros_like(big_m, dtype=torch.bool),
        undefined=torch.isnan(big_m) | (big_m == _POS_INF) | torch.isnan(big_s),
        neg_inf=big_m == _NEG_INF,
        m=big_m,
        per_rank_mass=f * gathered[..., 1],
        u=gathered[0, :, 2],
    )
    return _finish_sample(x2, plan, cut, plain=True)


def _greedy_counts(x2: torch.Tensor, plan: _Plan, cut: _ExactCut | None, m: torch.Tensor) -> torch.Tensor:
    """Every rank's count of kept tokens equal to the global max ``m`` on the greedy rows
    (W, rows), fp64: a pass over those rows and one all-gather."""
    assert plan.greedy_rows is not None
    rows, cols = x2.shape
    local = torch.zeros(rows, dtype=torch.float64, device=x2.device)
    greedy = plan.greedy_rows.nonzero().squeeze(1)
    for a, b in row_blocks(greedy.numel(), cols):
        r = greedy[a:b]
        x = x2[r].float()
        hit = x == m[r][:, None]
        if cut is not None:
            hit &= _keep_rows(x, r, cut, plan)
        local[r] = hit.sum(-1).double()
    return _comm.all_gather(local, plan.group, "greedy_counts")


def _finish_sample(x2: torch.Tensor, plan: _Plan, cut: _ExactCut, plain: bool = False) -> torch.Tensor:
    assert cut.per_rank_mass is not None and cut.u is not None, "selected with need_mass=True and u"
    live = ~(cut.undefined | cut.neg_inf)
    safe_m = torch.where(live, cut.m, torch.zeros_like(cut.m))
    masses = torch.where(live[None], cut.per_rank_mass, torch.zeros_like(cut.per_rank_mass))
    if plan.greedy_rows is not None:  # greedy rows draw among the kept tokens equal to the max
        counts = _greedy_counts(x2, plan, None if plain else cut, safe_m)
        masses = torch.where((plan.greedy_rows & live)[None], counts.to(masses.dtype), masses)
    tokens = _finish_draw(x2, plan, masses, cut.u, safe_m, None if plain else cut)
    tokens = torch.where(cut.neg_inf, torch.zeros_like(tokens), tokens)
    return torch.where(cut.undefined, torch.full_like(tokens, -1), tokens)
