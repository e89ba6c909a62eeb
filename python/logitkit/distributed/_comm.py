"""Process-group plumbing of logitkit.distributed: the collectives every
function goes through (so they can be counted), the vocabulary layout of the
shards, and the fixed-size metadata exchange that derives it and checks that
the ranks agree before any O(N) collective is issued.

Only torch.distributed collectives are used (all_gather_into_tensor,
all_reduce); they run on whatever backend the group has (NCCL, gloo, ...), on
the device of the tensors involved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

# ---------------------------------------------------------------------------
# Counting collectives
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class CollectiveRecord:
    """One collective issued by logitkit.distributed on this rank."""

    kind: str  # "all_gather" or "all_reduce"
    purpose: str  # what it carries ("metadata", "state", "grad_hidden", ...)
    payload_bytes: int  # bytes this rank contributes
    result_bytes: int  # bytes this rank holds afterwards
    world_size: int

    @property
    def ring_bytes(self) -> int:
        """Bytes this rank sends on a ring implementation (NCCL/gloo ring):
        (W - 1) / W of the result for an all-gather, 2 (W - 1) / W of the
        payload for an all-reduce."""
        w = self.world_size
        if self.kind == "all_gather":
            return self.payload_bytes * (w - 1)
        return 2 * self.payload_bytes * (w - 1) // max(w, 1)


class CollectiveLog:
    """The collectives issued while a :func:`count_collectives` block is open."""

    def __init__(self) -> None:
        self.records: list[CollectiveRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def count(self, purpose: str | None = None) -> int:
        return sum(1 for r in self.records if purpose is None or r.purpose == purpose)

    def payload_bytes(self, purpose: str | None = None) -> int:
        return sum(r.payload_bytes for r in self.records if purpose is None or r.purpose == purpose)

    def result_bytes(self, purpose: str | None = None) -> int:
        return sum(r.result_bytes for r in self.records if purpose is None or r.purpose == purpose)

    def ring_bytes(self, purpose: str | None = None) -> int:
        return sum(r.ring_bytes for r in self.records if purpose is None or r.purpose == purpose)

    def summary(self) -> str:
        parts = [f"{r.kind}[{r.purpose}] {r.payload_bytes} B" for r in self.records]
        return f"{len(self.records)} collectives: " + ", ".join(parts)


_active_logs: list[CollectiveLog] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Records every collective logitkit.distributed issues on this rank
    inside the block (forward and backward)::

        with logitkit.distributed.count_collectives() as log:
            loss = ldist.linear_cross_entropy(hidden, w_shard, target)
            loss.backward()
        print(log.summary())
    """
    log = CollectiveLog()
    _active_logs.append(log)
    try:
        yield log
    finally:
        _active_logs.remove(log)


def _record(kind: str, purpose: str, payload: torch.Tensor, result_bytes: int, world: int) -> None:
    if _active_logs:
        rec = CollectiveRecord(kind, purpose, payload.numel() * payload.element_size(), result_bytes, world)
        for log in _active_logs:
            log.records.append(rec)


# ---------------------------------------------------------------------------
# Groups and collectives
# ---------------------------------------------------------------------------


def resolve_group(group: ProcessGroup | None, op: str) -> ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"logitkit.distributed.{op}: torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    if group is not None:
        return group
    world = dist.group.WORLD
    assert world is not None
    return world


def group_rank_and_size(group: ProcessGroup) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(t: torch.Tensor, group: ProcessGroup, purpose: str) -> torch.Tensor:
    """(W, *t.shape): every rank's ``t`` in group-rank order."""
    t = t.detach().contiguous()
    world = dist.get_world_size(group)
    out = t.new_empty((world * t.numel(),))
    _record("all_gather", purpose, t, out.numel() * out.element_size(), world)
    with torch.no_grad():
        if world == 1:
            out.copy_(t.reshape(-1))
        else:
            _all_gather_single(out, t.reshape(-1), group=group)
    return out.view(world, *t.shape)


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(t: torch.Tensor, group: ProcessGroup, purpose: str, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of the contiguous tensor ``t`` (returned)."""
    if not t.is_contiguous():
        raise RuntimeError("logitkit.distributed: internal error, all_reduce needs a contiguous tensor")
    world = dist.get_world_size(group)
    _record("all_reduce", purpose, t, t.numel() * t.element_size(), world)
    if world > 1:
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        with torch.no_grad():
            dist.all_reduce(t, op=reduce_op, group=group)
    return t


def all_reduce_async(t: torch.Tensor, group: ProcessGroup, purpose: str):
    """Starts an in-place SUM all-reduce; returns an object with .wait()."""
    world = dist.get_world_size(group)
    _record("all_reduce", purpose, t, t.numel() * t.element_size(), world)
    if world == 1:
        return _Done()
    with torch.no_grad():
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)


class _Done:
    def wait(self) -> None:
        return None


# ---------------------------------------------------------------------------
# Vocabulary layout and the metadata exchange
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Where each rank's vocabulary shard lies: rank r holds [starts[r], starts[r] + sizes[r])."""

    rank: int
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    vocab: int  # V, the whole vocabulary
    meta: tuple[tuple[int, ...], ...] = ()  # every rank's metadata row (the checked fields)

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def v0(self) -> int:
        return self.starts[self.rank]

    @property
    def v1(self) -> int:
        return self.starts[self.rank] + self.sizes[self.rank]

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    def rank_order(self) -> list[int]:
        """Ranks sorted by where their shard starts (= vocabulary index order)."""
        return sorted(range(self.world), key=lambda r: (self.starts[r], r))


_META_WIDTH = 32  # int64 fields per rank, the same for every op (a mismatched op is detected, not hung on)
_MAGIC = 0x4C4B44  # "LKD"
# Fixed header fields
_F_MAGIC, _F_OP, _F_ERROR, _F_LOCAL_V, _F_START, _F_TOTAL, _F_NCHECK = range(7)
_HEADER = 7

_OP_CODES: dict[str, int] = {}


def _op_code(op: str) -> int:
    if op not in _OP_CODES:
        import zlib

        _OP_CODES[op] = zlib.crc32(op.encode()) & 0x7FFFFFFF
    return _OP_CODES[op]


def float_bits(x: float) -> int:
    """A float as the int64 of its float64 bits (exact equality test across ranks)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def dtype_code(dtype: torch.dtype) -> int:
    codes = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4, torch.int64: 5}
    return codes.get(dtype, 99)


_DTYPE_NAMES = {1: "float32", 2: "bfloat16", 3: "float16", 4: "float64", 5: "int64", 99: "other"}


def target_checksum(target: torch.Tensor) -> torch.Tensor:
    """An int64 checksum of a target tensor (0-d, on its device): two
    position-weighted sums of exact integers, no overflow for up to 2^31
    tokens of ids below 2^31."""
    t = target.reshape(-1)
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    pos = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.int64) % 65521
    v = torch.remainder(t.to(torch.int64), 2147483647)
    return ((v * pos) % 2147483647).sum() * 4099 + (v % 65521).sum()


@dataclasses.dataclass
class Check:
    """A value every rank must agree on (``agree=True``) or just report, and
    the argument it comes from (named in the error)."""

    name: str
    value: int | torch.Tensor
    agree: bool = True
    render: str = "int"  # "int", "float", "dtype", "bool"
    names: Sequence[str] = ()  # render a code as names[code]


def _render(value: int, render: str, names: Sequence[str] = ()) -> str:
    if names and 0 <= value < len(names):
        return repr(names[value])
    if render == "float":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if render == "dtype":
        return _DTYPE_NAMES.get(value, str(value))
    if render == "bool":
        return str(bool(value))
    return str(value)


def exchange_metadata(
    op: str,
    group: ProcessGroup,
    *,
    local_vocab: int,
    device: torch.device,
    checks: Sequence[Check],
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    local_error: str | None = None,
    validate: bool = True,
) -> VocabLayout:
    """One all-gather of _META_WIDTH int64 per rank: derives the shard layout
    and checks that the ranks agree on every ``Check``. Raises ``ValueError``
    on every rank (never only on some, which would leave the others waiting in
    the next collective) when they do not, or when a rank reports a
    ``local_error`` from its own argument checks.

    ``validate=False`` skips the exchange (and its host sync): the layout
    comes from ``vocab_start`` and ``vocab_size`` alone, and nothing is
    checked across ranks.
    """
    if not validate:  # the caller promises agreement: no collective, no host sync
        if local_error:
            raise ValueError(local_error)
        layout = static_layout(op, group, local_vocab=local_vocab, vocab_start=vocab_start, vocab_size=vocab_size)
        if layout is None:
            raise ValueError(
                f"logitkit.distributed.{op}: validate=False needs vocab_start and vocab_size (on every rank)"
            )
        return layout
    rank, world = group_rank_and_size(group)
    if _HEADER + len(checks) > _META_WIDTH:
        raise RuntimeError("logitkit.distributed: internal error, too many metadata fields")
    header = [
        _MAGIC,
        _op_code(op),
        1 if local_error else 0,
        int(local_vocab),
        -1 if vocab_start is None else int(vocab_start),
        -1 if vocab_size is None else int(vocab_size),
        len(checks),
    ]
    values: list[int] = []
    tensor_fields: list[tuple[int, torch.Tensor]] = []
    for i, c in enumerate(checks):
        if isinstance(c.value, torch.Tensor):
            tensor_fields.append((_HEADER + i, c.value))
            values.append(0)
        else:
            values.append(int(c.value))
    row = header + values + [0] * (_META_WIDTH - _HEADER - len(values))
    meta = torch.tensor(row, dtype=torch.int64, device=device)
    for index, value in tensor_fields:
        meta[index] = value.to(device=device, dtype=torch.int64)
    gathered = all_gather(meta, group, "metadata").cpu().tolist()
    prefix = f"logitkit.distributed.{op}"

    # Every rank evaluates the same gathered table, so every rank raises the same error.
    for r, g in enumerate(gathered):
        if g[_F_MAGIC] != _MAGIC or g[_F_OP] != _op_code(op):
            raise ValueError(f"{prefix}: rank {r} of the group is running another logitkit.distributed call")
    failed = [r for r, g in enumerate(gathered) if g[_F_ERROR]]
    if failed:
        if local_error:
            raise ValueError(local_error)
        raise ValueError(
            f"{prefix}: rank(s) {failed} of the group rejected their arguments (see the error on those ranks)"
        )
    for i, c in enumerate(checks):
        col = _HEADER + i
        vals = [g[col] for g in gathered]
        if c.agree and any(v != vals[0] for v in vals):
            listing = ", ".join(f"rank {r}: {_render(v, c.render, c.names)}" for r, v in enumerate(vals))
            raise ValueError(f"{prefix}: the ranks of the group disagree on {c.name} ({listing})")

    sizes = tuple(int(g[_F_LOCAL_V]) for g in gathered)
    starts_given = [int(g[_F_START]) for g in gathered]
    totals_given = [int(g[_F_TOTAL]) for g in gathered]
    if any(s >= 0 for s in starts_given) and any(s < 0 for s in starts_given):
        raise ValueError(f"{prefix}: vocab_start is given on some ranks but not on others ({starts_given})")
    if any(s >= 0 for s in starts_given):
        starts = tuple(starts_given)
        order = sorted(range(world), key=lambda r: (starts[r], r))
        expected = 0
        for r in order:
            if starts[r] != expected:
                listing = ", ".join(f"rank {q}: [{starts[q]}, {starts[q] + sizes[q]})" for q in order)
                raise ValueError(
                    f"{prefix}: the shards given by vocab_start do not tile [0, V) without gaps or overlaps ({listing})"
                )
            expected += sizes[r]
    else:
        acc, out = 0, []
        for s in sizes:
            out.append(acc)
            acc += s
        starts = tuple(out)
    vocab = sum(sizes)
    given_totals = {t for t in totals_given if t >= 0}
    if given_totals and given_totals != {vocab}:
        raise ValueError(
            f"{prefix}: vocab_size ({sorted(given_totals)}) does not match the sum of the shard sizes "
            f"{list(sizes)} = {vocab}"
        )
    rows = tuple(tuple(int(v) for v in g[_HEADER : _HEADER + len(checks)]) for g in gathered)
    return VocabLayout(rank=rank, starts=starts, sizes=sizes, vocab=vocab, meta=rows)


def static_layout(
    op: str, group: ProcessGroup, *, local_vocab: int, vocab_start: int | None, vocab_size: int | None
) -> VocabLayout | None:
    """The layout without any collective, when the caller gave everything
    (``validate=False`` with ``vocab_start`` and ``vocab_size``). Only this
    rank's range is known then; the other ranks' entries are placeholders."""
    if vocab_start is None or vocab_size is None:
        return None
    rank, world = group_rank_and_size(group)
    if vocab_start < 0 or vocab_start + local_vocab > vocab_size:
        raise ValueError(
            f"logitkit.distributed.{op}: vocab_start={vocab_start} with {local_vocab} local entries does not fit "
            f"vocab_size={vocab_size}"
        )
    starts = [0] * world
    sizes = [0] * world
    starts[rank], sizes[rank] = int(vocab_start), int(local_vocab)
    return _StaticLayout(rank=rank, starts=tuple(starts), sizes=tuple(sizes), vocab=int(vocab_size))


@dataclasses.dataclass(frozen=True)
class _StaticLayout(VocabLayout):
    """A layout that only knows this rank's shard (no metadata exchange)."""

    def rank_order(self) -> list[int]:
        # validate=False promises the Megatron layout: shards tile [0, V) in group-rank order.
        return list(range(self.world))


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
