"""Merging per-rank softmax states (m, s, b) of vocabulary shards into the
state of the whole row, and carrying per-token side values along.

Two strategies, both exact up to float32 rounding and both giving bitwise the
same result on every rank:

``"allgather"`` (default)
    One all-gather of every rank's (rows, k) payload; each rank then merges
    the W states locally in group-rank order. 1 collective; each rank
    receives W * rows * k numbers.
``"allreduce"``
    A MAX all-reduce of m, then a SUM all-reduce of the states rescaled to
    the global max (f_r s_r, f_r (b_r + (m_r - M) s_r), f_r = exp(m_r - M))
    with the side values. 2 collectives; ring traffic 2 (W-1)/W * rows * k.

The per-token payload is a handful of floats (3-6), so at any W used for
tensor parallelism the all-gather moves at most a few MB even for 16K
tokens, and its single round trip beats the two of the all-reduce pair
(measured in docs/distributed.md).
"""

from __future__ import annotations

import dataclasses

import torch

from .._loss_math import entropy_from_stats, normaliser_from_stats
from ._comm import ProcessGroup, all_gather, all_reduce

MERGE_STRATEGIES = ("allgather", "allreduce")
_NEG_INF = float("-inf")


@dataclasses.dataclass
class Merged:
    m: torch.Tensor  # (rows,) global max of z
    s: torch.Tensor  # (rows,) sum exp(z - m)
    b: torch.Tensor | None  # (rows,) sum (z - m) exp(z - m), when asked for
    summed: torch.Tensor  # (rows, k) side values summed over the ranks
    scalars: torch.Tensor  # (j,) per-rank scalars summed over the ranks
    per_rank: torch.Tensor | None  # (W, rows, width) the gathered payload ("allgather" only)

    @property
    def log_s(self) -> torch.Tensor:
        return torch.log(self.s)

    @property
    def lse(self) -> torch.Tensor:
        """m + log s (+inf when m = +inf)."""
        return normaliser_from_stats(self.m, self.s)[1]

    @property
    def entropy(self) -> torch.Tensor:
        """log s - b / s (NaN when m = +inf: no distribution)."""
        if self.b is None:
            raise RuntimeError("logitkit.distributed: internal error, entropy needs b")
        h = entropy_from_stats(torch.log(self.s), self.s, self.b)
        return torch.where(self.m == float("inf"), torch.full_like(h, float("nan")), h)


def _factors(m: torch.Tensor, big_m: torch.Tensor) -> torch.Tensor:
    """exp(m_r - M), 0 for an empty shard (m_r = -inf) instead of NaN."""
    return torch.where(m == _NEG_INF, torch.zeros_like(m), torch.exp(m - big_m))


def merge_gathered(m: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None):
    """Merges stacked states (W, rows) along dim 0 (as logitkit.merge_stats)."""
    big_m = m.amax(0)
    f = _factors(m, big_m)
    merged_s = (f * s).sum(0)
    merged_b = None
    if b is not None:
        merged_b = torch.where(f == 0, torch.zeros_like(b), f * (b + (m - big_m) * s)).sum(0)
    return big_m, merged_s, merged_b, f


def merge_states(
    state: torch.Tensor,
    group: ProcessGroup,
    strategy: str,
    *,
    with_b: bool,
    summed: torch.Tensor | None = None,
    scalars: torch.Tensor | None = None,
    purpose: str = "state",
) -> Merged:
    """Merges this rank's per-row state ``state`` (rows, >= 2 or 3) fp32
    [m, s, (b)] with the other ranks'. ``summed`` (rows, k) fp32 side values
    are summed over the ranks (a value only its owner rank knows is sent as 0
    by the others); ``scalars`` (j,) fp32 per-rank numbers likewise."""
    rows = state.shape[0]
    m, s = state[:, 0].float(), state[:, 1].float()
    b = state[:, 2].float() if with_b else None
    side = summed.float() if summed is not None else state.new_zeros((rows, 0), dtype=torch.float32)
    extra = scalars.float() if scalars is not None else state.new_zeros((0,), dtype=torch.float32)
    k = side.shape[1]

    if strategy == "allgather":
        cols = [m, s] + ([b] if b is not None else [])
        payload = torch.cat([torch.stack(cols, -1), side], -1)
        width = payload.shape[1]
        if extra.numel():  # per-rank scalars ride in one extra row
            if extra.numel() > width:
                width = extra.numel()
                payload = torch.nn.functional.pad(payload, (0, width - payload.shape[1]))
            tail = torch.nn.functional.pad(extra, (0, width - extra.numel()))[None]
            payload = torch.cat([payload, tail], 0)
        gathered = all_gather(payload, group, purpose)  # (W, rows (+1), width)
        body = gathered[:, :rows]
        gm, gs = body[..., 0], body[..., 1]
        gb = body[..., 2] if b is not None else None
        big_m, merged_s, merged_b, _ = merge_gathered(gm, gs, gb)
        first_side = 3 if b is not None else 2
        side_sum = body[..., first_side : first_side + k].sum(0)
        scalar_sum = gathered[:, rows, : extra.numel()].sum(0) if extra.numel() else extra
        return Merged(big_m, merged_s, merged_b, side_sum, scalar_sum, body)

    if strategy != "allreduce":
        raise ValueError(f"logitkit.distributed: merge must be one of {MERGE_STRATEGIES}, got {strategy!r}")
    big_m = m.clone()
    all_reduce(big_m, group, purpose + "_max", op="max")
    f = _factors(m, big_m)
    cols = [f * s]
    if b is not None:
        cols.append(torch.where(f == 0, torch.zeros_like(b), f * (b + (m - big_m) * s)))
    payload = torch.cat([torch.stack(cols, -1), side], -1)
    width = payload.shape[1]
    if extra.numel():
        if extra.numel() > width:
            payload = torch.nn.functional.pad(payload, (0, extra.numel() - width))
            width = extra.numel()
        payload = torch.cat([payload, torch.nn.functional.pad(extra, (0, width - extra.numel()))[None]], 0)
    payload = payload.contiguous()
    all_reduce(payload, group, purpose + "_sum")
    body = payload[:rows]
    n_state = len(cols)
    merged_b = body[:, 1] if b is not None else None
    scalar_sum = payload[rows, : extra.numel()] if extra.numel() else extra
    return Merged(big_m, body[:, 0], merged_b, body[:, n_state : n_state + k], scalar_sum, None)
