"""Vocabulary-parallel memory-light linear cross-entropy and per-token
log-probabilities/entropies.

Each rank holds the same ``hidden`` (N x D) and its rows of the output
projection (``weight_shard``, V_r x D, rows [v0_r, v0_r + V_r) of the full
weight); targets are global vocabulary ids. Per rank, forward:

1. the local op ``linear_ce_stats`` on the shard (the target passed as
   ``t - v0`` where this shard holds it, else a sentinel the op ignores):
   per token (m, s, b, z_target, sum_c w_c z_c) over the shard, never the
   N x V_r logits (tiles within ``chunk_budget``);
2. one collective merging these O(N) states (see ``_merge``);
3. the loss from the merged state, the same formula as single-device.

Backward: ``linear_ce_backward`` on the shard with the *global* normaliser
(m, log s) and the per-token coefficients: the shard's logits get the
gradient of the global softmax, giving this shard's grad_weight / grad_bias
and this shard's part of grad_hidden, which one all-reduce (N x D) sums
over the group (``reduce_grad_hidden=False`` leaves it to the caller).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .. import _backend
from .._layout import LceStateField, column, normaliser_tensor
from .._loss_math import (
    LossOptions,
    Targets,
    check_out_dtype,
    cross_entropy_coefficients,
    entropy_from_stats,
    log_prob_entropy_coefficients,
    loss_per_token,
    normaliser_from_stats,
    reduce_loss,
    upstream_per_token,
)
from ..linear_ce import default_chunk_budget
from . import _comm, _dtensor
from ._common import (
    MERGE_CODES,
    REDUCTION_CODES,
    check_ce_options,
    check_logits_arg,
    first_error,
    range_error,
    target_error,
)
from ._merge import MERGE_STRATEGIES, merge_states

_SENTINEL = -1  # local target of a token whose class another rank holds (outside [0, V_r), passed as ignore_index)


@dataclasses.dataclass
class _Plan:
    """Everything the autograd functions need besides tensors."""

    layout: _comm.VocabLayout
    group: _comm.ProcessGroup
    merge: str
    options: LossOptions  # ignore_index, reduction, label_smoothing, z_loss, temperature
    chunk_budget: int
    reduce_grad_hidden: bool
    hidden_grad: bool
    softcap: float = 0.0  # 0: none
    out_dtype: torch.dtype = torch.float32  # the loss's dtype (single-device ``out_dtype`` rule)
    grad_filter_eps: float = 0.0  # 0: exact gradients (single-device ``grad_filter_eps``)


def _check_linear_args(
    op: str, hidden: Any, weight: Any, target: Any, bias: Any, chunk_budget: int | None
) -> str | None:
    prefix = f"logitkit.distributed.{op}"

    def shapes() -> str | None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            return f"{prefix}: weight_shard must have shape (V_local, {hidden.shape[-1]}) to match hidden, got {shape}"
        if weight.dtype != hidden.dtype or weight.device != hidden.device:
            return (
                f"{prefix}: weight_shard ({weight.dtype}, {weight.device}) must have hidden's dtype and device "
                f"({hidden.dtype}, {hidden.device})"
            )
        msg = target_error(op, target, hidden, "hidden")
        if msg:
            return msg
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            return f"{prefix}: bias must be this rank's shard of shape ({weight.shape[0]},), got {list(bias.shape)}"
        if chunk_budget is not None and int(chunk_budget) <= 0:
            return f"{prefix}: chunk_budget must be None or > 0 bytes, got {chunk_budget}"
        return None

    return first_error(lambda: check_logits_arg(hidden, op, "hidden"), shapes)


def _unwrap_dtensors(
    op: str, hidden: Any, weight: Any, bias: Any, class_weight: Any, group: Any, reduce_grad_hidden: bool
):
    """DTensor weight (Shard(0)) -> its local rows and its mesh's group. A
    Replicate DTensor hidden with ``reduce_grad_hidden=False`` gets its
    gradient as a Partial DTensor (DTensor then reduces it when needed)."""
    info = None
    if _dtensor.is_dtensor(weight):
        weight, info = _dtensor.unwrap_vocab_sharded(weight, 0, op, "weight_shard")
        if group is not None and group != info.group:
            raise ValueError(f"logitkit.distributed.{op}: group= differs from the DTensor weight's mesh group")
        group = info.group
        hidden = _dtensor.unwrap_replicated(hidden, info, op, "hidden", partial_grad=not reduce_grad_hidden)
        if _dtensor.is_dtensor(bias):
            bias, _ = _dtensor.unwrap_vocab_sharded(bias, 0, op, "bias")
        if class_weight is not None:
            class_weight = _dtensor.unwrap_class_vector(class_weight, info, op, "class_weight")
    return hidden, weight, bias, class_weight, group, info


def _slice_class_weight(op: str, class_weight: torch.Tensor | None, layout: _comm.VocabLayout, col: int):
    """class_weight may be this rank's slice (V_r,) or the whole vector (V,);
    its length on every rank was exchanged in metadata column ``col``."""
    if class_weight is None:
        return None
    for r, row in enumerate(layout.meta):
        n = row[col]
        if n not in (layout.sizes[r], layout.vocab):
            raise ValueError(
                f"logitkit.distributed.{op}: class_weight must be this rank's slice ({layout.sizes[r]},) or the "
                f"whole vector ({layout.vocab},); rank {r} passed length {n}"
            )
    if class_weight.shape[0] == layout.local:
        return class_weight
    if class_weight.shape[0] != layout.vocab:  # (validate=False: not checked across ranks above)
        raise ValueError(
            f"logitkit.distributed.{op}: class_weight must be this rank's slice ({layout.local},) or the whole "
            f"vector ({layout.vocab},), got length {class_weight.shape[0]}"
        )
    return class_weight[layout.v0 : layout.v1]


def _stats(namespace: str, h2, weight, local_t, bias, class_weight, softcap, temperature, chunk_budget):
    """linear_ce_stats on this shard, (N, 5) in LceStateField order; an empty
    shard (V_r = 0) contributes no mass."""
    if weight.shape[0] == 0:
        n = h2.shape[0]
        nan = torch.full((n,), float("nan"), device=h2.device)
        zeros = torch.zeros(n, device=h2.device)
        return torch.stack([torch.full_like(zeros, float("-inf")), zeros, zeros, nan, zeros], -1)
    return _backend.ops(namespace).linear_ce_stats(
        h2, weight, local_t, bias, class_weight, _SENTINEL, softcap, temperature, chunk_budget
    )


def _input_grads(ctx: Any, plan: _Plan, coefficients: torch.Tensor, class_weight: torch.Tensor | None) -> tuple:
    """linear_ce_backward on this shard with the global normaliser (zeros / empty
    for an empty shard), then the all-reduce of grad_hidden."""
    h2, weight, bias, local_t, normaliser = ctx.saved_tensors[:5]
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    if weight.shape[0] == 0:
        grad_h, grad_w, grad_b = h2.new_zeros(h2.shape), torch.empty_like(weight), h2.new_zeros((0,))
    else:
        grad_h, grad_w, grad_b = _backend.ops(ctx.namespace).linear_ce_backward(
            h2,
            weight,
            local_t,
            bias,
            class_weight,
            normaliser,
            coefficients,
            plan.softcap,
            plan.options.temperature,
            plan.chunk_budget,
            bias_grad,
            plan.grad_filter_eps,
        )
    if plan.reduce_grad_hidden and plan.hidden_grad:
        _comm.all_reduce(grad_h, plan.group, "grad_hidden")
    return (
        grad_h.reshape(ctx.hidden_shape) if ctx.needs_input_grad[0] else None,
        grad_w if ctx.needs_input_grad[1] else None,
        grad_b if bias_grad else None,
    )


def _local_targets(t1: torch.Tensor, valid: torch.Tensor, lay: _comm.VocabLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(owned, local target): t - v0 where this shard holds the (non-ignored) target, else the sentinel."""
    owned = valid & (t1 >= lay.v0) & (t1 < lay.v1)
    return owned, torch.where(owned, t1 - lay.v0, torch.full_like(t1, _SENTINEL))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, class_weight, target, plan):
        lay: _comm.VocabLayout = plan.layout
        options: LossOptions = plan.options
        ctx.namespace, ctx.plan, ctx.hidden_shape = _backend.namespace(), plan, hidden.shape
        h2, t1 = hidden.reshape(-1, weight.shape[1]), target.reshape(-1)
        valid = t1 != options.ignore_index
        owned, local_t = _local_targets(t1, valid, lay)
        eps = options.label_smoothing
        stats = _stats(
            ctx.namespace, h2, weight, local_t, bias, class_weight, plan.softcap, options.temperature, plan.chunk_budget
        )
        zeros = torch.zeros_like(column(stats, LceStateField.MAX))
        # Side values: z_y (owner only), w_y (owner only, with class weights), sum_c w_c z_c (every rank).
        side = [torch.where(owned, column(stats, LceStateField.TARGET_LOGIT), zeros)]
        if class_weight is not None:
            cw = class_weight.float()
            side.append(torch.where(owned, cw[local_t.clamp(min=0)], zeros) if cw.numel() else zeros)
        if eps > 0:
            side.append(column(stats, LceStateField.WEIGHTED_SUM))
        scalars = class_weight.float().sum()[None] if (class_weight is not None and eps > 0) else None
        merged = merge_states(
            stats, plan.group, plan.merge, with_b=False, summed=torch.stack(side, -1), scalars=scalars
        )
        t = Targets(
            target=t1,
            valid=valid,
            weight=merged.summed[:, 1] if class_weight is not None else valid.float(),
            vocab=lay.vocab,
            total_weight=merged.scalars[0] if scalars is not None else float(lay.vocab),
        )
        in_range = (t1 >= 0) & (t1 < lay.vocab)
        z_target = torch.where(valid & ~in_range, torch.full_like(zeros, float("nan")), merged.summed[:, 0])
        log_s, lse = normaliser_from_stats(merged.m, merged.s)
        # lse - z_y as (m - z_y) + log s: no ulp(lse) rounding when p_y -> 1.
        loss = loss_per_token(t, (merged.m - z_target) + log_s, lse, merged.summed[:, -1] if eps > 0 else None, options)
        out = reduce_loss(loss, t, options.reduction)
        normaliser = normaliser_tensor(max=merged.m, log_sum_exp=log_s)
        ctx.save_for_backward(h2, weight, bias, local_t, normaliser, class_weight, t1, valid, t.weight, lse)
        ctx.total_weight = t.total_weight
        lse_out = lse.reshape(target.shape)  # differentiable, as single-device (dlse/dz = p)
        return (out.reshape(target.shape) if options.reduction == "none" else out).to(plan.out_dtype), lse_out

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        class_weight, t1, valid, w_y, lse = ctx.saved_tensors[5:]
        plan = ctx.plan
        t = Targets(target=t1, valid=valid, weight=w_y, vocab=plan.layout.vocab, total_weight=ctx.total_weight)
        g = upstream_per_token(grad_loss, t, plan.options.reduction)
        coefficients = cross_entropy_coefficients(g, t, lse, plan.options, grad_lse)
        return (*_input_grads(ctx, plan, coefficients, class_weight), None, None, None)


class _LinearLogProbsAndEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, plan):
        lay: _comm.VocabLayout = plan.layout
        ctx.namespace, ctx.plan, ctx.hidden_shape = _backend.namespace(), plan, hidden.shape
        h2, t1 = hidden.reshape(-1, weight.shape[1]), target.reshape(-1)
        owned, local_t = _local_targets(t1, torch.ones_like(t1, dtype=torch.bool), lay)
        stats = _stats(ctx.namespace, h2, weight, local_t, bias, None, 0.0, plan.options.temperature, plan.chunk_budget)
        target_logit = column(stats, LceStateField.TARGET_LOGIT)
        z_local = torch.where(owned, target_logit, torch.zeros_like(target_logit))
        merged = merge_states(stats, plan.group, plan.merge, with_b=True, summed=z_local[:, None])
        in_range = (t1 >= 0) & (t1 < lay.vocab)
        z_target = torch.where(in_range, merged.summed[:, 0], torch.full_like(merged.m, float("nan")))
        log_s, _ = normaliser_from_stats(merged.m, merged.s)
        log_prob = (z_target - merged.m) - log_s
        assert merged.b is not None
        entropy = entropy_from_stats(log_s, merged.s, merged.b)
        ctx.save_for_backward(h2, weight, bias, local_t, normaliser_tensor(max=merged.m, log_sum_exp=log_s), entropy)
        return log_prob.reshape(target.shape), entropy.reshape(target.shape)

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        h2, entropy = ctx.saved_tensors[0], ctx.saved_tensors[5]
        n = h2.shape[0]
        zeros = h2.new_zeros(n, dtype=torch.float32)
        g_l = grad_log_prob.float().reshape(-1) if grad_log_prob is not None else zeros
        g_h = grad_entropy.float().reshape(-1) if grad_entropy is not None else zeros
        coefficients = log_prob_entropy_coefficients(g_l, g_h, entropy)
        return (*_input_grads(ctx, ctx.plan, coefficients, None), None, None)


def _exchange(
    op: str,
    group: Any,
    hidden: Any,
    weight: Any,
    target: Any,
    local_error: str | None,
    extra_checks: list[_comm.Check],
    vocab_start: int | None,
    hidden_grad: bool,
    merge: str,
    class_weight_len: int = -1,
    vocab_size: int | None = None,
    validate: bool = True,
) -> _comm.VocabLayout:
    ok = local_error is None
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    if isinstance(group, _comm.ProcessGroup) and dist_backend_is_nccl(group) and device.type == "cpu":
        device = torch.device("cuda", torch.cuda.current_device())
    checks = [
        _comm.Check("the number of tokens (hidden.shape[:-1].numel())", hidden.shape[:-1].numel() if ok else -1),
        _comm.Check("the hidden size D (hidden.shape[-1])", hidden.shape[-1] if ok else -1),
        _comm.Check("the dtype of hidden", _comm.dtype_code(hidden.dtype) if ok else -1, render="dtype"),
        _comm.Check("merge", MERGE_CODES.get(merge, -1), names=tuple(MERGE_CODES)),
        _comm.Check("whether hidden needs a gradient (hidden.requires_grad)", int(hidden_grad), render="bool"),
        _comm.Check(
            "target (its contents; every rank must pass the same global ids)",
            _comm.target_checksum(target) if ok else 0,
        ),
        *extra_checks,
        _comm.Check("class_weight length", class_weight_len, agree=False),
    ]
    return _comm.exchange_metadata(
        op,
        group,
        local_vocab=weight.shape[0] if ok else 0,
        device=device,
        checks=checks,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        local_error=local_error,
        validate=validate,
    )


def dist_backend_is_nccl(group: Any) -> bool:
    try:
        return torch.distributed.get_backend(group) == "nccl"
    except Exception:  # pragma: no cover - exotic groups
        return False


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: _comm.ProcessGroup | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    return_lse: bool = False,
    chunk_budget: int | None = None,
    out_dtype: torch.dtype | None = None,
    grad_filter_eps: float | None = None,
    reduce_grad_hidden: bool = True,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
) -> Any:
    """Vocabulary-parallel :func:`logitkit.linear_cross_entropy`.

    Every rank of ``group`` (default: the world) passes the same ``hidden``
    (..., D) and ``target`` (...) of *global* class ids, and its own rows of
    the output projection: ``weight_shard`` (V_r, D) = rows [v0_r, v0_r + V_r)
    of the full (V, D) weight; ``bias`` (V_r,) likewise. ``class_weight`` may
    be this rank's slice (V_r,) or the whole vector (V,). Shard sizes may
    differ between ranks (and be 0). The shards tile the vocabulary in
    group-rank order unless ``vocab_start`` (Megatron's vocab_start_index) is
    given on every rank.

    Returns, on every rank, what ``logitkit.linear_cross_entropy`` returns on
    the full weight (the loss computed in fp32 and returned in float32, or
    in ``out_dtype``; with ``return_lse`` also the per-token log-sum-exp), for
    every option: ``ignore_index``, ``reduction`` ("none", "sum", "mean"),
    ``label_smoothing``, ``class_weight``, ``softcap``, ``z_loss``,
    ``temperature``, ``chunk_budget`` (per rank, as single-device; ``None``:
    the device's default), ``grad_filter_eps`` (decided per tile of this
    rank's shard, with the global per-token coefficients).

    Backward: ``weight_shard.grad`` / ``bias.grad`` get this shard's
    gradient; ``hidden.grad`` gets the full gradient (this rank's part summed
    over the group by one all-reduce of N x D in hidden's dtype). With
    ``reduce_grad_hidden=False`` it gets only this rank's part, for callers
    whose tensor-parallel region already all-reduces the input gradient
    (Megatron's ``copy_to_tensor_model_parallel_region``). The upstream
    gradient of the loss must be the same on every rank (it is when every
    rank backpropagates the same loss).

    ``validate=False`` with ``vocab_start`` and ``vocab_size`` (V) on every
    rank skips the metadata all-gather (and its host sync); nothing is then
    checked across ranks.

    Communication per call: forward one fixed-size metadata all-gather
    (32 int64 per rank: layout and agreement checks; ranks that disagree on
    shapes, dtypes, options or targets all raise ``ValueError``) and one
    all-gather of 1-3 fp32 per token (``merge="allreduce"``: a MAX and a SUM
    all-reduce instead); backward one all-reduce of grad_hidden (none with
    ``reduce_grad_hidden=False``). Never O(N x V).

    Differences from other implementations: Megatron's
    ``vocab_parallel_cross_entropy`` takes materialised logits, has no class
    weights / z-loss / softcap and returns per-token losses only; Liger's and
    CCE's fused linear cross-entropies are single-device (Liger's accepts TP
    only through full-vocabulary gathers). Targets outside [0, V) raise on CPU
    (on every rank); on CUDA their loss is NaN (no host sync), as
    single-device. The all-gather merge sums side values in group-rank order,
    so all ranks get bitwise the same loss.
    """
    op = "linear_cross_entropy"
    out_dtype_checked = check_out_dtype(out_dtype, f"distributed.{op}")  # before any collective
    hidden, weight_shard, bias, class_weight, group, info = _unwrap_dtensors(
        op, hidden, weight_shard, bias, class_weight, group, reduce_grad_hidden
    )
    group = _comm.resolve_group(group, op)
    local_error = first_error(
        lambda: _check_linear_args(op, hidden, weight_shard, target, bias, chunk_budget),
        lambda: check_ce_options(op, reduction, label_smoothing, z_loss, temperature, softcap),
        lambda: (
            None
            if grad_filter_eps is None or (math.isfinite(grad_filter_eps) and grad_filter_eps > 0)
            else f"logitkit.distributed.{op}: grad_filter_eps must be None or a finite number > 0, "
            f"got {grad_filter_eps}"
        ),
        lambda: (
            None
            if merge in MERGE_STRATEGIES
            else f"logitkit.distributed.{op}: merge must be one of {MERGE_STRATEGIES}, got {merge!r}"
        ),
        lambda: (
            None
            if class_weight is None or (isinstance(class_weight, torch.Tensor) and class_weight.dim() == 1)
            else f"logitkit.distributed.{op}: class_weight must be a 1-D tensor"
        ),
    )
    hidden_grad = isinstance(hidden, torch.Tensor) and torch.is_grad_enabled() and hidden.requires_grad
    f = _comm.float_bits
    checks = [
        _comm.Check("ignore_index", int(ignore_index)),
        _comm.Check("reduction", REDUCTION_CODES.get(reduction, -1), names=tuple(REDUCTION_CODES)),
        _comm.Check("label_smoothing", f(label_smoothing) if local_error is None else 0, render="float"),
        _comm.Check("z_loss", f(z_loss) if local_error is None else 0, render="float"),
        _comm.Check("softcap", f(softcap or 0.0) if local_error is None else 0, render="float"),
        _comm.Check("temperature", f(temperature) if local_error is None else 0, render="float"),
        _comm.Check("whether a bias is given", int(bias is not None), render="bool"),
        _comm.Check("whether class_weight is given", int(class_weight is not None), render="bool"),
        _comm.Check("reduce_grad_hidden", int(bool(reduce_grad_hidden)), render="bool"),
    ]
    layout = _exchange(
        op,
        group,
        hidden,
        weight_shard,
        target,
        local_error,
        checks,
        vocab_start,
        hidden_grad,
        merge,
        class_weight_len=class_weight.shape[0] if isinstance(class_weight, torch.Tensor) and class_weight.dim() else -1,
        vocab_size=vocab_size,
        validate=validate,
    )
    class_weight = _slice_class_weight(op, class_weight, layout, len(checks) + 6)
    msg = range_error(op, target, layout.vocab, int(ignore_index))
    if msg:
        raise ValueError(msg)
    plan = _Plan(
        layout=layout,
        group=group,
        merge=merge,
        options=LossOptions(
            ignore_index=int(ignore_index),
            reduction=reduction,
            label_smoothing=float(label_smoothing),
            z_loss=float(z_loss),
            temperature=float(temperature),
        ),
        chunk_budget=default_chunk_budget(hidden.device) if chunk_budget is None else int(chunk_budget),
        reduce_grad_hidden=bool(reduce_grad_hidden),
        hidden_grad=hidden_grad,
        softcap=0.0 if softcap is None else float(softcap),
        out_dtype=out_dtype_checked,
        grad_filter_eps=float(grad_filter_eps or 0.0),
    )
    loss, lse = _LinearCrossEntropy.apply(hidden, weight_shard, bias, class_weight, target, plan)
    if info is not None:
        loss = _dtensor.wrap_scalar(loss, info) if loss.dim() == 0 else _dtensor.wrap_rowwise(loss, info, loss.shape)
        lse = _dtensor.wrap_rowwise(lse, info, lse.shape)
    return (loss, lse) if return_lse else loss


def linear_log_probs_and_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: _comm.ProcessGroup | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_budget: int | None = None,
    reduce_grad_hidden: bool = True,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    validate: bool = True,
    merge: str = "allgather",
) -> tuple[Any, Any]:
    """Vocabulary-parallel :func:`logitkit.linear_log_probs_and_entropy`:
    per-token ``log softmax(z)[target]`` and entropy of ``softmax(z)``,
    ``z = (hidden @ weight.T + bias) / temperature`` over the whole
    vocabulary, both float32 and differentiable, on every rank.

    Arguments and communication as :func:`linear_cross_entropy` (the merge
    carries 4 fp32 per token: m, s, b, z_target); targets must be global ids
    in [0, V). Backward: the shard's weight/bias gradients, and grad_hidden
    summed over the group unless ``reduce_grad_hidden=False``.
    """
    op = "linear_log_probs_and_entropy"
    hidden, weight_shard, bias, _, group, info = _unwrap_dtensors(
        op, hidden, weight_shard, bias, None, group, reduce_grad_hidden
    )
    group = _comm.resolve_group(group, op)
    local_error = first_error(
        lambda: _check_linear_args(op, hidden, weight_shard, target, bias, chunk_budget),
        lambda: check_ce_options(op, "none", 0.0, 0.0, temperature, None),
        lambda: (
            None
            if merge in MERGE_STRATEGIES
            else f"logitkit.distributed.{op}: merge must be one of {MERGE_STRATEGIES}, got {merge!r}"
        ),
    )
    hidden_grad = isinstance(hidden, torch.Tensor) and torch.is_grad_enabled() and hidden.requires_grad
    checks = [
        _comm.Check("temperature", _comm.float_bits(temperature) if local_error is None else 0, render="float"),
        _comm.Check("whether a bias is given", int(bias is not None), render="bool"),
        _comm.Check("reduce_grad_hidden", int(bool(reduce_grad_hidden)), render="bool"),
    ]
    layout = _exchange(
        op,
        group,
        hidden,
        weight_shard,
        target,
        local_error,
        checks,
        vocab_start,
        hidden_grad,
        merge,
        vocab_size=vocab_size,
        validate=validate,
    )
    msg = range_error(op, target, layout.vocab, None)
    if msg:
        raise ValueError(msg)
    plan = _Plan(
        layout=layout,
        group=group,
        merge=merge,
        options=LossOptions(
            ignore_index=-100, reduction="none", label_smoothing=0.0, z_loss=0.0, temperature=float(temperature)
        ),
        chunk_budget=default_chunk_budget(hidden.device) if chunk_budget is None else int(chunk_budget),
        reduce_grad_hidden=bool(reduce_grad_hidden),
        hidden_grad=hidden_grad,
    )
    log_prob, entropy = _LinearLogProbsAndEntropy.apply(hidden, weight_shard, bias, target, plan)
    if info is not None:
        log_prob = _dtensor.wrap_rowwise(log_prob, info, log_prob.shape)
        entropy = _dtensor.wrap_rowwise(entropy, info, entropy.shape)
    return log_prob, entropy
