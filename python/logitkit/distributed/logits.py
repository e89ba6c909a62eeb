"""Row ops and cross-entropy on vocabulary-sharded logits.

Rank r holds ``logits[..., v0_r:v1_r]`` (its shard of the vocabulary, the
last dimension; shard sizes may differ). Every function reduces its shard to
the mergeable softmax state (m, s, b) with one read pass (logitkit's
``softmax_stats`` kernel), merges the O(rows) states over the group with one
collective, and finishes from the merged state: results equal the
single-device op on the concatenated logits to fp32 rounding.

Autograd. Per-row outputs (logsumexp, entropy, the loss) are replicated on
every rank, and their backward assumes the same upstream gradient on every
rank (as when every rank computes the same loss from them); it needs no
collective, because the global quantities follow from local kernels: with
c = exp(lse_local - lse_global), the global probabilities of the shard are
p = c p_local, so ``logsumexp_backward(g c, x)`` writes g p / T, and the
entropy gradient -(1/T) p (log p + H) is
``entropy_backward(g c, x) - (log c + H - H_local) logsumexp_backward(g c, x)``.
Per-element outputs (softmax, log_softmax: this rank's slice of the global
result) need one all-reduce of rows numbers in backward (the row sum of the
upstream gradient over the whole vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .. import _backend
from .._layout import LceCoefField, StatsField, column
from .._loss_math import (
    LossOptions,
    Targets,
    check_out_dtype,
    cross_entropy_coefficients,
    entropy_from_stats,
    loss_per_token,
    normaliser_from_stats,
    reduce_loss,
    upstream_per_token,
)
from . import _comm, _dtensor
from ._common import (
    MERGE_CODES,
    REDUCTION_CODES,
    check_ce_options,
    check_logits_arg,
    check_temperature_arg,
    first_error,
    range_error,
    row_blocks,
    target_error,
)
from ._merge import MERGE_STRATEGIES, merge_states

_NEG_INF = float("-inf")


@dataclasses.dataclass
class _Plan:
    op: str
    group: _comm.ProcessGroup
    layout: _comm.VocabLayout
    merge: str
    temperature: float
    shape: torch.Size
    n_checks: int
    options: LossOptions | None = None  # cross_entropy's
    out_dtype: torch.dtype = torch.float32  # cross_entropy's loss dtype (single-device ``out_dtype`` rule)


def _prologue(
    op: str,
    logits: Any,
    temperature: float,
    group: Any,
    vocab_start: int | None,
    merge: str,
    extra_checks: list[_comm.Check] | None = None,
    extra_error: Any = None,
    info: Any = None,
    vocab_size: int | None = None,
    validate: bool = True,
):
    """Unwraps a DTensor, checks the arguments, exchanges the metadata.
    Returns (x2 (rows, V_r), plan, DTensor info or None)."""
    if _dtensor.is_dtensor(logits):
        logits, info = _dtensor.unwrap_vocab_sharded(logits, -1, op, "logits")
        if group is not None and group != info.group:
            raise ValueError(f"logitkit.distributed.{op}: group= differs from the DTensor logits' mesh group")
        group = info.group
    group = _comm.resolve_group(group, op)
    local_error = first_error(
        lambda: check_logits_arg(logits, op, "logits"),
        lambda: check_temperature_arg(temperature, op),
        lambda: (
            None
            if merge in MERGE_STRATEGIES
            else f"logitkit.distributed.{op}: merge must be one of {MERGE_STRATEGIES}, got {merge!r}"
        ),
        extra_error or (lambda: None),
    )
    ok = local_error is None
    checks = [
        _comm.Check("the number of rows (logits.shape[:-1].numel())", logits.shape[:-1].numel() if ok else -1),
        _comm.Check("the number of dimensions of logits", logits.dim() if ok else -1),
        _comm.Check("the dtype of logits", _comm.dtype_code(logits.dtype) if ok else -1, render="dtype"),
        _comm.Check("temperature", _comm.float_bits(temperature) if ok else 0, render="float"),
        _comm.Check("merge", MERGE_CODES.get(merge, -1), names=tuple(MERGE_CODES)),
        *(extra_checks or []),
    ]
    device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
    layout = _comm.exchange_metadata(
        op,
        group,
        local_vocab=logits.shape[-1] if ok else 0,
        device=device,
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
        merge=merge,
        temperature=float(temperature),
        shape=logits.shape,
        n_checks=len(checks),
    )
    return logits, x2, plan, info


def _local_lse(state: torch.Tensor) -> torch.Tensor:
    """lse of this shard's part of each row, from its softmax state."""
    return normaliser_from_stats(column(state, StatsField.MAX), column(state, StatsField.SUM_EXP))[1]


def _zero_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows whose shard holds no probability (local logits all -inf, or no
    columns) get a zero gradient instead of the local kernels' 0 * NaN."""
    if grad.numel() and bool(rows.any()):
        grad.masked_fill_(rows[:, None], 0)
    return grad


# ---------------------------------------------------------------------------
# softmax_stats, logsumexp, entropy
# ---------------------------------------------------------------------------


def _merged_state(x2: torch.Tensor, plan: _Plan, with_b: bool, namespace: str | None = None):
    """This shard's softmax state (the current backend's kernel) and the merged one."""
    state = _backend.ops(namespace).softmax_stats(x2, plan.temperature)
    return state, merge_states(state, plan.group, plan.merge, with_b=with_b)


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, plan):
        ctx.namespace, ctx.temperature = _backend.namespace(), plan.temperature
        state, merged = _merged_state(x2, plan, with_b=False, namespace=ctx.namespace)
        lse = merged.lse
        lse_local = _local_lse(state)
        c = torch.exp(lse_local - lse)  # share of this shard in the row's mass
        ctx.save_for_backward(x2, c, lse_local == _NEG_INF)
        return lse.to(x2.dtype)

    @staticmethod
    def backward(ctx, grad):
        x2, c, empty = ctx.saved_tensors
        g = (grad.float() * c).to(x2.dtype)
        out = _backend.ops(ctx.namespace).logsumexp_backward(g, x2, ctx.temperature)  # g c p_local / T = g p / T
        return _zero_rows(out, empty), None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, plan):
        ctx.namespace, ctx.temperature = _backend.namespace(), plan.temperature
        state, merged = _merged_state(x2, plan, with_b=True, namespace=ctx.namespace)
        h = merged.entropy
        lse_local = _local_lse(state)
        c = torch.exp(lse_local - merged.lse)
        sum_exp = column(state, StatsField.SUM_EXP)
        h_local = entropy_from_stats(torch.log(sum_exp), sum_exp, column(state, StatsField.SUM_SHIFTED))
        empty = (lse_local == _NEG_INF) | (c == 0)
        shift = torch.where(empty, torch.zeros_like(h), (lse_local - merged.lse) + h - h_local)  # log c + H - H_local
        ctx.save_for_backward(x2, c, shift, empty)
        return h

    @staticmethod
    def backward(ctx, grad):
        x2, c, shift, empty = ctx.saved_tensors
        gc = grad.float() * c
        ops = _backend.ops(ctx.namespace)
        out = ops.entropy_backward(gc.to(x2.dtype), x2, ctx.temperature)  # c * local entropy gradient
        out.add_(ops.logsumexp_backward((-gc * shift).to(x2.dtype), x2, ctx.temperature))
        return _zero_rows(out, empty), None


def softmax_stats(
    logits: Any,
    temperature: float = 1.0,
    *,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
) -> Any:
    """The merged softmax state ``[m, s, b]`` (..., 3) fp32 of the whole row,
    on every rank, from this rank's shard (..., V_r). Equal to
    ``logitkit.softmax_stats`` of the concatenated logits (to fp32 rounding).
    Not differentiable. One read pass, one all-gather of 3 fp32 per row
    (plus the metadata all-gather)."""
    op = "softmax_stats"
    logits, x2, plan, info = _prologue(
        op, logits, temperature, group, vocab_start, merge, vocab_size=vocab_size, validate=validate
    )
    _, merged = _merged_state(x2, plan, with_b=True)
    out = torch.stack([merged.m, merged.s, merged.b], -1).reshape(*plan.shape[:-1], 3)
    if info is not None:
        return _dtensor.wrap_rowwise(out, info, torch.Size([*_global_rows_shape(info, plan), 3]))
    return out


def _global_rows_shape(info: Any, plan: _Plan) -> list[int]:
    """Global leading shape of a DTensor input (batch dims may be sharded on other mesh dims)."""
    return list(info.global_shape[:-1])


def logsumexp(
    logits: Any,
    temperature: float = 1.0,
    *,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
) -> Any:
    """``logsumexp(logits / temperature)`` over the whole (sharded) vocabulary,
    shape (...), logits' dtype (computed in fp32), on every rank.

    Backward (no collective): this rank's shard of ``g p / T``, written by
    the ``logsumexp_backward`` kernel in the logits' dtype."""
    logits, x2, plan, info = _prologue(
        "logsumexp", logits, temperature, group, vocab_start, merge, vocab_size=vocab_size, validate=validate
    )
    out = _LogSumExp.apply(x2, plan).reshape(plan.shape[:-1])
    return _wrap_rows(out, info, plan)


def entropy(
    logits: Any,
    temperature: float = 1.0,
    *,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
) -> Any:
    """Entropy (nats, fp32) of ``softmax(logits / temperature)`` over the whole
    vocabulary, shape (...), on every rank.

    Backward (no collective): ``-(1/T) p (log p + H)`` on this shard, from two
    local kernels (``entropy_backward`` and ``logsumexp_backward``, both in
    the logits' dtype) and one in-place add."""
    logits, x2, plan, info = _prologue(
        "entropy", logits, temperature, group, vocab_start, merge, vocab_size=vocab_size, validate=validate
    )
    out = _Entropy.apply(x2, plan).reshape(plan.shape[:-1])
    return _wrap_rows(out, info, plan)


def _wrap_rows(out: torch.Tensor, info: Any, plan: _Plan) -> Any:
    if info is None:
        return out
    return _dtensor.wrap_rowwise(out, info, torch.Size(_global_rows_shape(info, plan)))


# ---------------------------------------------------------------------------
# log_softmax, softmax: this rank's slice of the global result
# ---------------------------------------------------------------------------


def _write_blocks(out: torch.Tensor, fn, *inputs: torch.Tensor) -> torch.Tensor:
    """out[rows] = fn(row block of each input in fp32, rows) in out's dtype,
    one row block at a time (fp32 temporaries bounded by BLOCK_BYTES)."""
    rows, cols = out.shape
    for a, b in row_blocks(rows, cols, 4 * (len(inputs) + 1)):
        out[a:b] = fn(*(t[a:b].float() for t in inputs), slice(a, b))
    return out


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_j x_ij y_ij per row in fp32 (row blocks, bounded temporaries)."""
    rows, cols = x.shape
    out = x.new_empty(rows, dtype=torch.float32)
    for a, b in row_blocks(rows, cols, 8):
        out[a:b] = torch.linalg.vecdot(x[a:b].float(), y[a:b].float())
    return out


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, plan):
        _, merged = _merged_state(x2, plan, with_b=False)
        inv_t = 1.0 / plan.temperature
        m, log_s = merged.m[:, None], merged.log_s[:, None]
        out = _write_blocks(torch.empty_like(x2), lambda x, r: (x * inv_t - m[r]) - log_s[r], x2)
        ctx.save_for_backward(out)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        plan = ctx.plan
        total = grad.sum(-1, dtype=torch.float32).contiguous()  # sum_j dy_j over this shard ...
        _comm.all_reduce(total, plan.group, "grad_row_sum")  # ... and over the vocabulary
        inv_t = 1.0 / plan.temperature
        tot = total[:, None]
        dx = _write_blocks(torch.empty_like(y), lambda dy, yy, r: (dy - torch.exp(yy) * tot[r]) * inv_t, grad, y)
        return dx, None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, plan):
        _, merged = _merged_state(x2, plan, with_b=False)
        inv_t = 1.0 / plan.temperature
        m, log_s = merged.m[:, None], merged.log_s[:, None]
        out = _write_blocks(torch.empty_like(x2), lambda x, r: torch.exp((x * inv_t - m[r]) - log_s[r]), x2)
        ctx.save_for_backward(out)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        plan = ctx.plan
        dot = _row_dot(grad, y).contiguous()  # sum_j dy_j y_j over this shard ...
        _comm.all_reduce(dot, plan.group, "grad_row_sum")  # ... and over the vocabulary
        inv_t = 1.0 / plan.temperature
        d = dot[:, None]
        dx = _write_blocks(torch.empty_like(y), lambda dy, yy, r: yy * (dy - d[r]) * inv_t, grad, y)
        return dx, None


def log_softmax(
    logits: Any,
    temperature: float = 1.0,
    *,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
) -> Any:
    """This rank's slice of ``log_softmax(logits / temperature)`` over the
    whole vocabulary: shape and dtype of the local shard.

    Forward: one read pass for the state (kernel), the merge, one write
    pass ``(z - m) - log s`` in fp32 row blocks rounded once to the logits'
    dtype. Backward: one all-reduce of the row sums of the upstream gradient
    (rows fp32), then ``(dy - exp(y) sum dy) / T`` in one pass."""
    logits, x2, plan, info = _prologue(
        "log_softmax", logits, temperature, group, vocab_start, merge, vocab_size=vocab_size, validate=validate
    )
    out = _LogSoftmax.apply(x2, plan).reshape(plan.shape)
    if info is not None:
        return _dtensor.wrap_like(out, info, info.global_shape)
    return out


def softmax(
    logits: Any,
    temperature: float = 1.0,
    *,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
) -> Any:
    """This rank's slice of ``softmax(logits / temperature)`` over the whole
    vocabulary: shape and dtype of the local shard. Backward: one all-reduce
    of ``sum_j dy_j y_j`` per row, then ``y (dy - that) / T``."""
    logits, x2, plan, info = _prologue(
        "softmax", logits, temperature, group, vocab_start, merge, vocab_size=vocab_size, validate=validate
    )
    out = _Softmax.apply(x2, plan).reshape(plan.shape)
    if info is not None:
        return _dtensor.wrap_like(out, info, info.global_shape)
    return out


# ---------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    """The single-device cross-entropy (logitkit.cross_entropy) on this shard,
    with the merged state: forward from softmax_stats + the owner's target
    logit; backward logsumexp_backward(a c) and in-place corrections."""

    @staticmethod
    def forward(ctx, x2, target, class_weight, plan):
        lay: _comm.VocabLayout = plan.layout
        options: LossOptions = plan.options
        temperature, eps = options.temperature, options.label_smoothing
        ctx.namespace, ctx.plan = _backend.namespace(), plan
        state = _backend.ops(ctx.namespace).softmax_stats(x2, temperature)  # one read pass
        valid = target != options.ignore_index
        in_range = (target >= 0) & (target < lay.vocab)
        owned = valid & (target >= lay.v0) & (target < lay.v1)
        local_t = torch.where(owned, target - lay.v0, torch.zeros_like(target))
        zeros = torch.zeros_like(column(state, StatsField.MAX))
        has_cols = x2.shape[1] > 0
        z_local = x2.gather(1, local_t[:, None]).squeeze(1).float() / temperature if has_cols else zeros
        side = [torch.where(owned, z_local, zeros)]
        weights = class_weight.float() if class_weight is not None else None
        if weights is not None:
            side.append(torch.where(owned, weights[local_t], zeros) if has_cols else zeros)
        if eps > 0:  # sum_c w_c z_c over this shard (one more read pass)
            if weights is not None:
                wsum = torch.cat([torch.mv(rows.float(), weights) for rows in x2.split(64)]) / temperature
            else:
                wsum = x2.sum(-1, dtype=torch.float32) / temperature
            side.append(wsum)
        scalars = weights.sum()[None] if (weights is not None and eps > 0) else None
        merged = merge_states(
            state, plan.group, plan.merge, with_b=False, summed=torch.stack(side, -1), scalars=scalars
        )
        t = Targets(
            target=target,
            valid=valid,
            weight=merged.summed[:, 1] if weights is not None else valid.float(),
            vocab=lay.vocab,
            total_weight=merged.scalars[0] if scalars is not None else float(lay.vocab),
        )
        z_target = torch.where(valid & ~in_range, torch.full_like(zeros, math.nan), merged.summed[:, 0])
        log_s, lse = normaliser_from_stats(merged.m, merged.s)
        loss = loss_per_token(t, (merged.m - z_target) + log_s, lse, merged.summed[:, -1] if eps > 0 else None, options)
        out = reduce_loss(loss, t, options.reduction)
        lse_local = _local_lse(state)
        c = torch.exp(lse_local - lse)
        ctx.save_for_backward(x2, target, local_t, owned, valid, t.weight, lse, c, lse_local == _NEG_INF, class_weight)
        ctx.total_weight = t.total_weight
        return out.to(plan.out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2, target, local_t, owned, valid, w_y, lse, c, empty, class_weight = ctx.saved_tensors
        plan = ctx.plan
        options, vocab = plan.options, plan.layout.vocab
        temperature = options.temperature
        t = Targets(target=target, valid=valid, weight=w_y, vocab=vocab, total_weight=ctx.total_weight)
        g = upstream_per_token(grad_out, t, options.reduction)
        coefficients = cross_entropy_coefficients(g, t, lse, options)
        # a c p_local / T = a p / T, written by the kernel into the logits' dtype ...
        prob_coef = (column(coefficients, LceCoefField.PROB) * c).to(x2.dtype)
        grad = _zero_rows(_backend.ops(ctx.namespace).logsumexp_backward(prob_coef, x2, temperature), empty)
        if grad.shape[1] > 0:
            # ... - beta / T at the targets this shard holds ...
            target_coef = column(coefficients, LceCoefField.TARGET) / temperature
            target_coef = torch.where(owned, target_coef, torch.zeros_like(target_coef)).to(grad.dtype)
            grad.scatter_add_(1, local_t[:, None], -target_coef[:, None])
            if options.label_smoothing > 0.0:
                # ... - sigma w_c / T for every class of the shard, in place.
                w = class_weight.float() if class_weight is not None else torch.ones(x2.shape[1], device=grad.device)
                smooth_coef = column(coefficients, LceCoefField.SMOOTH) / temperature
                grad.addr_(smooth_coef.to(grad.dtype), w.to(grad.dtype), alpha=-1)
        return grad, None, None, None


def cross_entropy(
    logits: Any,
    target: Any,
    *,
    class_weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    group: _comm.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
    out_dtype: torch.dtype | None = None,
) -> Any:
    """Vocabulary-parallel :func:`logitkit.cross_entropy`: rank r passes its
    shard ``logits[..., v0_r:v1_r]`` and the same global ``target`` (...);
    every rank gets the loss of the concatenated logits (computed in fp32,
    returned in float32 or ``out_dtype``, as single-device), for every option (``class_weight`` as this rank's slice
    (V_r,) or the whole vector (V,), ``ignore_index``, ``reduction``,
    ``label_smoothing``, ``z_loss``, ``temperature``).

    Forward: one read pass (state) plus one for label smoothing, one
    all-gather of 1-3 fp32 per row (plus the metadata all-gather). Backward,
    no collective: ``logsumexp_backward(A c, x)`` writes the gradient in the
    logits' dtype, then O(rows) in-place corrections at the targets this
    shard holds (and the label-smoothing rank-1 update), as single-device.

    Unlike ``torch.distributed.tensor.parallel.loss_parallel`` it supports
    label smoothing, z-loss, temperature and sharded class weights, and
    needs no DTensor (it accepts one: ``Shard(-1)`` logits).
    """
    op = "cross_entropy"
    loss_dtype = check_out_dtype(out_dtype, f"distributed.{op}")  # before any collective

    info = None
    if _dtensor.is_dtensor(logits):
        logits, info = _dtensor.unwrap_vocab_sharded(logits, -1, op, "logits")
        if group is not None and group != info.group:
            raise ValueError(f"logitkit.distributed.{op}: group= differs from the DTensor logits' mesh group")
        group = info.group
        if class_weight is not None:
            class_weight = _dtensor.unwrap_class_vector(class_weight, info, op, "class_weight")
    if _dtensor.is_dtensor(target):
        target = target.to_local()
    local_logits = logits

    def extra_error() -> str | None:
        msg = check_ce_options(op, reduction, label_smoothing, z_loss, temperature, None)
        if msg or not isinstance(local_logits, torch.Tensor):
            return msg
        msg = target_error(op, target, local_logits, "logits")
        if msg:
            return msg
        if class_weight is not None and (not isinstance(class_weight, torch.Tensor) or class_weight.dim() != 1):
            return f"logitkit.distributed.{op}: class_weight must be a 1-D tensor"
        return None

    cw = class_weight
    ok_shapes = isinstance(local_logits, torch.Tensor) and isinstance(target, torch.Tensor)
    f = _comm.float_bits
    checks = [
        _comm.Check("ignore_index", int(ignore_index)),
        _comm.Check("reduction", REDUCTION_CODES.get(reduction, -1), names=tuple(REDUCTION_CODES)),
        _comm.Check("label_smoothing", f(label_smoothing), render="float"),
        _comm.Check("z_loss", f(z_loss), render="float"),
        _comm.Check("whether class_weight is given", int(cw is not None), render="bool"),
        _comm.Check(
            "target (its contents; every rank must pass the same global ids)",
            _comm.target_checksum(target) if ok_shapes and target.dtype == torch.int64 else 0,
        ),
        _comm.Check(
            "class_weight length", cw.shape[0] if isinstance(cw, torch.Tensor) and cw.dim() else -1, agree=False
        ),
    ]

    logits, x2, plan, info = _prologue(
        op,
        logits,
        temperature,
        group,
        vocab_start,
        merge,
        extra_checks=checks,
        extra_error=extra_error,
        info=info,
        vocab_size=vocab_size,
        validate=validate,
    )
    lay = plan.layout
    if cw is not None:
        col = plan.n_checks - 1
        for r, row in enumerate(lay.meta):
            if row[col] not in (lay.sizes[r], lay.vocab):
                raise ValueError(
                    f"logitkit.distributed.{op}: class_weight must be this rank's slice ({lay.sizes[r]},) or the "
                    f"whole vector ({lay.vocab},); rank {r} passed length {row[col]}"
                )
        if cw.shape[0] != lay.local:
            if cw.shape[0] != lay.vocab:  # (validate=False: not checked across ranks above)
                raise ValueError(
                    f"logitkit.distributed.{op}: class_weight must be this rank's slice ({lay.local},) or the whole "
                    f"vector ({lay.vocab},), got length {cw.shape[0]}"
                )
            cw = cw[lay.v0 : lay.v1]
    msg = range_error(op, target, lay.vocab, int(ignore_index))
    if msg:
        raise ValueError(msg)
    plan.out_dtype = loss_dtype
    plan.options = LossOptions(
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        temperature=float(temperature),
    )
    loss = _CrossEntropy.apply(x2, target.reshape(-1), cw, plan)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if info is not None:
        return _dtensor.wrap_scalar(loss, info) if loss.dim() == 0 else _wrap_rows(loss, info, plan)
    return loss
