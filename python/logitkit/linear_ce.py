"""Memory-light linear cross-entropy: the loss of ``hidden @ weight.T + bias``
without ever materialising the N x V logits.

The forward walks the logits in tiles (vocabulary chunks outer, token chunks
inner; everything transient fits ``chunk_budget`` bytes): an ATen GEMM per
tile into one reused fp32 workspace, then a fused logitkit kernel that applies
temperature and softcap, merges the tile into each token's online softmax
state, gathers the target logit and the label-smoothing sum. It keeps five
fp32 numbers per token for the backward, which recomputes each tile's logits,
turns them into ``dL/dlogits`` in place (fused kernel) and accumulates
``grad_hidden``, ``grad_weight`` (and ``grad_bias``) with GEMMs in fp32: four
GEMM-equivalents in all, each on large tiles. Memory above the inputs and
gradients: ``chunk_budget`` (the tile, and for bf16/fp16 inputs the fp32
copies of a chunk's weight rows and its grad_weight accumulator), O(N) per-token
state, and for bf16/fp16 inputs fp32 copies of hidden and of grad_hidden
(N x D each).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import _backend, _loader
from ._layout import (
    LCE_COEF_WIDTH,
    LCE_STATE_WIDTH,
    LceCoefField,
    LceStateField,
    NormaliserField,
    column,
    normaliser_tensor,
)
from ._loss_math import (
    REDUCTIONS,
    CrossEntropyOutput,
    LossOptions,
    OutputRequest,
    Targets,
    check_out_dtype,
    check_real_grad,
    cross_entropy_coefficients,
    entropy_from_stats,
    log_prob_entropy_coefficients,
    loss_outputs,
    loss_per_token,
    normaliser_from_stats,
    reduce_loss,
    shifted_target,
    targets,
    upstream_per_token,
)
from ._registration import check_logits, check_temperature, cpp_float, register_fake
from .cross_entropy import cross_entropy as _cross_entropy

# Bytes of transient memory per tile on CPU. Measured at N = D = 1024,
# V = 128256, fwd+bwd (bench/README.md, "December 6th"): fp32 time is flat
# from 4 MiB up; bf16 on logitkit's AMX-BF16 GEMM took 0.78x the time at 8 MiB
# than at 4 MiB (tiles of 1024 tokens x 819 rather than 409 vocabulary
# entries; the GEMMs ran at the same rate at both widths, so the gain is the
# per-tile work done half as often: hidden packed for two GEMMs and
# grad_hidden's 4 MiB fp32 accumulator read and written), and 16 MiB was no
# faster. The transient memory at 8 MiB (the tile, plus grad_hidden's fp32
# accumulator for bf16/fp16) stays near 1% of the materialised loss's.
DEFAULT_CHUNK_BUDGET = 8 * 1024 * 1024

# CUDA: few large GEMMs keep the GPU busy. The budget is 1/256 of the device's
# memory, clamped to [32 MiB, 256 MiB]: 256 MiB on an 80 GB H100. At
# Llama-3-8B's N = 16384, V = 128256, D = 4096 (bf16, native route: 6 bytes per
# tile element + 4 D bytes per vocabulary column) the tiling (the most
# rows cols / (rows + cols) within the budget) gives tiles of 8192 tokens x
# 4096 vocabulary entries: 2 x 32 tiles, each GEMM 8192 x 4096 x 4096
# (~0.28 ms of tensor cores at ~990 TFLOP/s, enough to fill 132 SMs), and a
# transient memory of ~2% of the materialised loss's peak (bf16 logits 4.2 GB,
# their fp32 log-softmax and the gradient: > 12 GB). Read from the device
# properties, no host synchronisation. Launch counts in bench/README.md.
CUDA_CHUNK_BUDGET_RANGE = (32 * 1024 * 1024, 256 * 1024 * 1024)


def default_chunk_budget(device: torch.device | str) -> int:
    """The ``chunk_budget`` that ``chunk_budget=None`` means on ``device``: 8 MiB on CPU
    (:data:`DEFAULT_CHUNK_BUDGET`, measured), on CUDA 1/256 of the device memory within
    :data:`CUDA_CHUNK_BUDGET_RANGE`."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_CHUNK_BUDGET
    low, high = CUDA_CHUNK_BUDGET_RANGE
    total = torch.cuda.get_device_properties(device).total_memory
    return int(min(high, max(low, total // 256)))


def _resolve_budget(chunk_budget: int | None, hidden: torch.Tensor) -> int:
    return default_chunk_budget(hidden.device) if chunk_budget is None else int(chunk_budget)


class GemmPath(NamedTuple):
    """How linear_cross_entropy runs its GEMMs for a dtype on a device (:func:`gemm_path`)."""

    path: str  # "fp32", "native" (input-dtype operands, fp32 accumulation and output) or "fp32_upcast"
    reason: str


def gemm_path(dtype: torch.dtype, device: torch.device | str = "cpu") -> GemmPath:
    """The GEMM route of :func:`linear_cross_entropy` (and
    :func:`linear_log_probs_and_entropy`) for inputs of ``dtype`` on ``device``.

    * float32: ``"fp32"``, ``torch.mm``'s own precision settings
      (``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision``:
      TF32 on CUDA only where the user allowed it; IEEE by default).
    * bf16/fp16 on CUDA: ``"native"``, cuBLAS with operands in the input dtype on the
      tensor cores, fp32 accumulation and output (the logits stay fp32).
    * bf16 on CPU: ``"native"`` where the CPU has AMX-BF16 (by capability), or AVX512-BF16 only
      and it wins a one-time probe (512^3, interleaved medians), else ``"fp32_upcast"`` (fp32
      GEMMs on exact fp32 copies). The native bf16 GEMM is
      logitkit's own, on the best bf16 units of the CPU: AMX-BF16 tiles (``tdpbf16ps``; Intel
      Sapphire Rapids and later) or AVX512-BF16 (``vdpbf16ps``; AMD Zen 4, Intel Cooper Lake
      and later), fp32 accumulation and output either way.
    * fp16 on CPU: ``"fp32_upcast"``. No CPU unit that logitkit drives multiplies fp16 with fp32
      accumulation (AVX512-FP16 accumulates in fp16), and ATen's reference fp16 GEMM, the
      ``"native"`` route, is slower than the upcast at the loss's shapes.
    * ``LOGITKIT_CPU_GEMM=native|fp32`` forces a CPU route (tests, measurements). The
      emulated-CUDA test backend always takes the CPU native route.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logitkit.gemm_path: dtype must be float32, bfloat16 or float16, got {dtype}")
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return GemmPath("fp32", "float32 inputs: torch.mm in float32 under torch's matmul precision settings")
    if device_type == "cuda":
        return GemmPath("native", "cuBLAS with bf16/fp16 operands on the tensor cores, fp32 accumulation and output")
    if device_type != "cpu":
        raise ValueError(f"logitkit.gemm_path: device must be cpu or cuda, got {device}")
    path, reason = _loader._C.cpu_gemm_path(str(dtype).removeprefix("torch."))
    return GemmPath(path, reason)


# ---------------------------------------------------------------------------
# Fake kernels: the checks of LinearCeFrontends in csrc/common/linear_ce_driver.h
# ---------------------------------------------------------------------------


class _OpInputs(NamedTuple):
    """The arguments both tiled ops check (``check_inputs``), in the order of their schemas."""

    hidden: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    bias: torch.Tensor | None
    class_weight: torch.Tensor | None
    softcap: float
    temperature: float
    chunk_budget: int


def _check_vocab_vector(t: torch.Tensor | None, arg: str, hidden: torch.Tensor, vocab: int, op: str) -> None:
    """An optional (V,) floating-point tensor on hidden's device (bias, class_weight)."""
    if t is None:
        return
    if t.device != hidden.device:
        raise ValueError(f"logitkit.{op}: {arg} is on {t.device} but hidden is on {hidden.device}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"logitkit.{op}: {arg} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != vocab:
        raise ValueError(f"logitkit.{op}: {arg} must have shape ({vocab}), got {list(t.shape)}")


def _check_weight(weight: torch.Tensor, hidden: torch.Tensor, op: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"logitkit.{op}: weight must be 2-D (V, D), got shape {list(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"logitkit.{op}: weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"logitkit.{op}: weight has dtype {weight.dtype} but hidden has dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"logitkit.{op}: weight must have shape (V, {hidden.shape[1]}) to match hidden's last dimension, "
            f"got {list(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"logitkit.{op}: weight must have at least one row (V >= 1)")


def _check_target(target: torch.Tensor, hidden: torch.Tensor, op: str) -> None:
    if target.device != hidden.device:
        raise ValueError(f"logitkit.{op}: target is on {target.device} but hidden is on {hidden.device}")
    if target.dtype != torch.int64:
        raise TypeError(f"logitkit.{op}: target must be torch.int64, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(f"logitkit.{op}: target must have shape ({hidden.shape[0]}), got {list(target.shape)}")


def _check_op_inputs(a: _OpInputs, op: str) -> None:
    """``check_inputs`` of the C++ ops, in the same order and with the same messages."""
    check_logits(a.hidden, op, "hidden")
    if a.hidden.dim() != 2:
        raise ValueError(f"logitkit.{op}: hidden must be 2-D (N, D), got shape {list(a.hidden.shape)}")
    _check_weight(a.weight, a.hidden, op)
    _check_target(a.target, a.hidden, op)
    if not (math.isfinite(a.softcap) and a.softcap >= 0.0):
        raise ValueError(
            f"logitkit.{op}: softcap must be a finite number > 0 (or 0 for none), got {cpp_float(a.softcap)}"
        )
    check_temperature(a.temperature, op)
    if a.chunk_budget <= 0:
        raise ValueError(f"logitkit.{op}: chunk_budget must be > 0 bytes, got {a.chunk_budget}")
    _check_vocab_vector(a.bias, "bias", a.hidden, a.weight.shape[0], op)
    _check_vocab_vector(a.class_weight, "class_weight", a.hidden, a.weight.shape[0], op)


def _check_per_token(t: torch.Tensor, hidden: torch.Tensor, width: int, op: str, arg: str) -> None:
    """``check_per_token`` of the C++ backward: float32 (N, width) on hidden's device."""
    n = hidden.shape[0]
    if t.device != hidden.device or t.dtype != torch.float32 or t.dim() != 2 or tuple(t.shape) != (n, width):
        raise ValueError(f"logitkit.{op}: {arg} must be float32 of shape ({n}, {width}) on {hidden.device}")


# (The fake kernels take the arguments of the schemas in csrc/ops/schemas.h.)


@register_fake("linear_ce_stats")
def _linear_ce_stats_fake(hidden, weight, target, bias, class_weight, ignore_index, softcap, temperature, chunk_budget):
    inputs = _OpInputs(hidden, weight, target, bias, class_weight, softcap, temperature, chunk_budget)
    _check_op_inputs(inputs, "linear_cross_entropy")
    return hidden.new_empty((hidden.shape[0], LCE_STATE_WIDTH), dtype=torch.float32)


@register_fake("linear_ce_backward")
def _linear_ce_backward_fake(
    hidden,
    weight,
    target,
    bias,
    class_weight,
    normaliser,
    coefficients,
    softcap,
    temperature,
    chunk_budget,
    bias_grad,
    grad_filter_eps=0.0,
):
    op = "linear_cross_entropy_backward"
    if not (math.isfinite(grad_filter_eps) and grad_filter_eps >= 0.0):
        raise ValueError(
            f"logitkit.{op}: grad_filter_eps must be a finite number >= 0 (0: exact), got {cpp_float(grad_filter_eps)}"
        )
    _check_op_inputs(_OpInputs(hidden, weight, target, bias, class_weight, softcap, temperature, chunk_budget), op)
    _check_per_token(normaliser, hidden, len(NormaliserField), op, "normaliser")
    _check_per_token(coefficients, hidden, LCE_COEF_WIDTH, op, "coefficients")
    return (
        hidden.new_empty(hidden.shape),
        weight.new_empty(weight.shape),
        hidden.new_empty((weight.shape[0] if bias_grad else 0,)),
    )


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------


class _Tiles(NamedTuple):
    """The non-tensor arguments of the tiled ops: the logit transform and the memory budget."""

    softcap: float  # 0: none
    temperature: float
    chunk_budget: int
    grad_filter_eps: float = 0.0  # 0: exact gradients


class _Forward(NamedTuple):
    """What linear_ce_stats gives the forward: the flattened inputs and the per-token state."""

    hidden2d: torch.Tensor  # (N, D)
    target1d: torch.Tensor  # (N,)
    stats: torch.Tensor  # (N, 5), LceStateField
    m: torch.Tensor
    log_s: torch.Tensor
    lse: torch.Tensor


def _forward_stats(
    ctx: Any,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    ignore_index: int,
    tiles: _Tiles,
) -> _Forward:
    """Runs linear_ce_stats (in the current backend) on the tokens flattened to (N, D) and (N,),
    and keeps in ``ctx`` what the backward needs besides its tensors."""
    ctx.namespace, ctx.tiles, ctx.hidden_shape = _backend.namespace(), tiles, hidden.shape
    h2, t1 = hidden.reshape(-1, weight.shape[1]), target.reshape(-1)
    stats = _backend.ops(ctx.namespace).linear_ce_stats(
        h2, weight, t1, bias, class_weight, ignore_index, tiles.softcap, tiles.temperature, tiles.chunk_budget
    )
    m = column(stats, LceStateField.MAX)
    log_s, lse = normaliser_from_stats(m, column(stats, LceStateField.SUM_EXP))
    return _Forward(h2, t1, stats, m, log_s, lse)


def _save_for_tiles(
    ctx: Any, f: _Forward, weight: torch.Tensor, bias: torch.Tensor | None, *more: torch.Tensor | None
) -> None:
    """Saves what linear_ce_backward takes (the flattened inputs and the normaliser), then ``more``."""
    ctx.save_for_backward(f.hidden2d, weight, bias, f.target1d, normaliser_tensor(max=f.m, log_sum_exp=f.log_s), *more)


def _input_grads(ctx: Any, coefficients: torch.Tensor, class_weight: torch.Tensor | None) -> tuple:
    """(grad_hidden, grad_weight, grad_bias) of the tiled backward for the per-token coefficients."""
    h2, weight, bias, t1, normaliser = ctx.saved_tensors[:5]
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    tiles = ctx.tiles
    grad_h, grad_w, grad_b = _backend.ops(ctx.namespace).linear_ce_backward(
        h2,
        weight,
        t1,
        bias,
        class_weight,
        normaliser,
        coefficients,
        tiles.softcap,
        tiles.temperature,
        tiles.chunk_budget,
        bias_grad,
        tiles.grad_filter_eps,
    )
    return (
        grad_h.reshape(ctx.hidden_shape) if ctx.needs_input_grad[0] else None,
        grad_w if ctx.needs_input_grad[1] else None,
        grad_b if bias_grad else None,
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: per-token state (linear_ce_stats); backward: the logits are
    recomputed tile by tile (linear_ce_backward)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, class_weight, options: LossOptions, tiles: _Tiles, out_dtype: torch.dtype
    ):
        f = _forward_stats(ctx, hidden, weight, bias, target, class_weight, options.ignore_index, tiles)
        t = targets(f.target1d, class_weight, options.ignore_index, weight.shape[0])
        # lse - z_y as (m - z_y) + log s: no ulp(lse) rounding when p_y -> 1.
        target_nll = (f.m - column(f.stats, LceStateField.TARGET_LOGIT)) + f.log_s
        loss = loss_per_token(t, target_nll, f.lse, column(f.stats, LceStateField.WEIGHTED_SUM), options)
        out = reduce_loss(loss, t, options.reduction)
        _save_for_tiles(ctx, f, weight, bias, class_weight, f.lse)
        ctx.options = options
        # (N,) per-token outputs: the loss ("none"), lse (differentiable) and target hit (z_y = max z)
        hit = column(f.stats, LceStateField.TARGET_LOGIT) == f.m
        ctx.mark_non_differentiable(hit)
        return out.to(out_dtype), f.lse, hit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_lse, _grad_hit):
        _, weight, _, t1, _, class_weight, lse = ctx.saved_tensors
        options = ctx.options
        t = targets(t1, class_weight, options.ignore_index, weight.shape[0])
        g = upstream_per_token(grad_loss, t, options.reduction)
        coefficients = cross_entropy_coefficients(g, t, lse, options, grad_lse)
        return (*_input_grads(ctx, coefficients, class_weight), None, None, None, None, None)


def _gradient_rows_in_place(
    z: torch.Tensor,
    y: torch.Tensor,
    k: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor],
    class_weight: torch.Tensor | None,
    tiles: _Tiles,
    smoothing: bool,
) -> torch.Tensor:
    """Turns a (rows, V) fp32 tile of z into dL/dx in place (csrc/core/linear_ce.h in torch ops):
    p (a) - beta [c = y] - sigma w_c, the target column as beta expm1(z_y - lse) + (a - beta) p_y,
    times dz/dx."""
    m, log_s = norm
    a, beta, sigma = (column(k, f)[:, None] for f in (LceCoefField.PROB, LceCoefField.TARGET, LceCoefField.SMOOTH))
    derivative = None
    if tiles.softcap > 0.0:  # dz/dx = (1 - (z / c)^2) / T
        derivative = (z / tiles.softcap).square_().neg_().add_(1.0).mul_(1.0 / tiles.temperature)
    shifted = z.sub_(m[:, None]).sub_(log_s[:, None])  # z - lse, exact near the max
    s_y = shifted.gather(1, y)
    grad = shifted.exp_().mul_(a)  # p a (p = 0 at masked logits: 0)
    w = None if class_weight is None else class_weight.float()
    w_y = 1.0 if w is None else w[y]
    if smoothing:
        grad.addr_(sigma[:, 0], w if w is not None else torch.ones_like(grad[0]), alpha=-1)
    grad.scatter_(1, y, beta * torch.expm1(s_y) + (a - beta) * s_y.exp() - sigma * w_y)
    return grad.mul_(derivative) if derivative is not None else grad.mul_(1.0 / tiles.temperature)


class _LinearCrossEntropyGradInForward(torch.autograd.Function):
    """``grad_in_forward=True``: for a reduced (scalar) loss the upstream gradient only rescales
    the gradient, so it is formed in the forward pass, Liger's scheme: blocks of tokens with
    their whole rows of logits (one GEMM each), the row state, the loss, dL/dlogits in place,
    and the two gradient GEMMs; the backward multiplies by the upstream gradient. Three
    GEMM-equivalents instead of four, no recomputation; the fp32 grad_hidden and grad_weight
    (and grad_bias) are held from the forward to the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, options: LossOptions, tiles: _Tiles, out_dtype):
        ops = _backend.ops(_backend.namespace())
        h2, t1 = hidden.reshape(-1, weight.shape[1]), target.reshape(-1)
        n, vocab = h2.shape[0], weight.shape[0]
        t = targets(t1, class_weight, options.ignore_index, vocab)
        unit = upstream_per_token(torch.ones((), device=h2.device), t, options.reduction)
        grad_h, grad_w = torch.empty_like(h2), torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias) if bias is not None else None
        losses, lses, hits = [], [], []
        step = max(1, tiles.chunk_budget // (4 * vocab))
        for r in range(0, n, step):
            hc, rows = h2[r : r + step], slice(r, r + step)
            x = hc @ weight.T if bias is None else torch.addmm(bias, hc, weight.T)
            z = x.mul_(1.0 / tiles.temperature)
            if tiles.softcap > 0.0:
                z = z.div_(tiles.softcap).tanh_().mul_(tiles.softcap)
            stats = ops.softmax_stats(z, 1.0)
            m = column(stats, LceStateField.MAX)
            log_s, lse = normaliser_from_stats(m, column(stats, LceStateField.SUM_EXP))
            tc = Targets(t1[rows], t.valid[rows], t.weight[rows], vocab, t.total_weight)
            y = torch.where(tc.valid, tc.target, 0)[:, None]
            weighted = None
            if options.label_smoothing > 0.0:
                weighted = z.sum(-1) if class_weight is None else z @ class_weight.float()
            z_target = z.gather(1, y)[:, 0]
            losses.append(loss_per_token(tc, (m - z_target) + log_s, lse, weighted, options))
            lses.append(lse)
            hits.append(z_target == m)
            k = cross_entropy_coefficients(unit[rows], tc, lse, options)
            grad = _gradient_rows_in_place(z, y, k, (m, log_s), class_weight, tiles, options.label_smoothing > 0.0)
            torch.mm(grad, weight, out=grad_h[rows])
            grad_w.addmm_(grad.T, hc)
            if grad_b is not None:
                grad_b.add_(grad.sum(0))
        loss = reduce_loss(torch.cat(losses), t, options.reduction)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.hidden_shape = hidden.shape
        lse_all, hit = torch.cat(lses), torch.cat(hits)
        ctx.mark_non_differentiable(lse_all, hit)
        return loss.to(out_dtype), lse_all, hit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_lse, _grad_hit):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        check_real_grad(grad_loss)
        g = grad_loss.float()  # (not in place: a retained graph may run the backward again)
        return (
            (grad_h * g).reshape(ctx.hidden_shape) if ctx.needs_input_grad[0] else None,
            grad_w * g if ctx.needs_input_grad[1] else None,
            grad_b * g if grad_b is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_args(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    z_loss: float,
    temperature: float,
    chunk_budget: int | None,
) -> None:
    """The Python API's checks (before the leading dimensions are flattened for the ops)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"logitkit.{op}: hidden must be a tensor of shape (..., D)")
    if hidden.shape[-1] < 1:
        raise ValueError(f"logitkit.{op}: hidden must have a hidden size D >= 1, got shape {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"logitkit.{op}: weight must have shape (V, {hidden.shape[-1]}) to match hidden, got {list(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"logitkit.{op}: weight must have at least one row (V >= 1), got shape {list(weight.shape)}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"logitkit.{op}: target must have shape {list(hidden.shape[:-1])} (hidden's leading dims), "
            f"got {list(target.shape)}"
        )
    if hidden.dtype == torch.float64 and hidden.device.type != "cpu":
        raise TypeError(f"logitkit.{op}: float64 inputs are supported on CPU only (gradcheck, references)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"logitkit.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"logitkit.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"logitkit.{op}: softcap must be None or a finite number > 0, got {softcap}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"logitkit.{op}: z_loss must be a finite number >= 0, got {z_loss}")
    check_temperature(temperature, op)
    if chunk_budget is not None and int(chunk_budget) <= 0:
        raise ValueError(f"logitkit.{op}: chunk_budget must be None or > 0 bytes, got {chunk_budget}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    return_lse: bool = False,
    shift: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    chunk_budget: int | None = None,
    out_dtype: torch.dtype | None = None,
    grad_filter_eps: float | None = None,
    grad_in_forward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Equal to::

        z = (hidden @ weight.T + bias) / temperature
        if softcap is not None: z = softcap * tanh(z / softcap)
        loss = F.cross_entropy(z, target, weight=class_weight, ignore_index=ignore_index,
                               reduction=..., label_smoothing=label_smoothing)
               + z_loss * logsumexp(z) ** 2     (per non-ignored token)

    Args:
        hidden: (..., D) float32, bfloat16 or float16.
        weight: (V, D) as in ``nn.Linear``, same dtype and device.
        target: (...) int64 class indices in [0, V), or ``ignore_index``.
        bias: optional (V,).
        class_weight: optional (V,) per-class weights (``weight=`` of F.cross_entropy).
        reduction: ``"none"`` (per-token losses, shape of ``target``, 0 at ignored
            tokens), ``"sum"``, or ``"mean"`` (sum divided by the sum of the target
            class weights of the non-ignored tokens, i.e. their count without
            class weights). The z-loss term is divided by the number of non-ignored
            tokens, with class weights too, as Liger and PaLM (not by the sum of the
            target weights: it penalises every token's normaliser alike).
        return_lse: also return the per-token log-sum-exp of z (float32, shape of
            ``target``). Differentiable, as Cut Cross-Entropy's: a gradient ``g_lse`` on
            it adds ``g_lse * softmax(z)`` to dL/dz (folded into the backward's per-token
            coefficient of p: no extra pass), so a user's own z-loss on it trains.
        shift: Cut Cross-Entropy's ``shift``: hidden (..., T, D) at position t predicts
            ``target[..., t + 1]`` (target (..., T)), the causal-LM shift. Done by
            shifting the targets (the last position of each sequence predicts nothing,
            ``ignore_index``), never by slicing (copying) the hidden states: the logits of
            those B positions are computed and ignored. Per-token outputs then have the
            shape of ``target[..., 1:]``.
        return_z_loss: Liger's option: return a :class:`~logitkit.CrossEntropyOutput`
            whose ``z_loss`` is the z-loss part of ``loss`` (``loss`` includes it),
            reduced as the loss, not differentiable (for logging).
        return_token_accuracy: Liger's option: ``token_accuracy`` in the
            :class:`~logitkit.CrossEntropyOutput`: whether argmax z == target over the
            non-ignored tokens ("mean": their fraction, "sum": their count, "none": 1/0
            per token), from the streamed state (no logits, no extra pass): a token counts
            as correct when its target's z equals the row maximum. Ties: where another
            class has exactly the same maximal z, the target counts as correct, where
            ``torch.argmax`` would pick the lowest index (a difference only on exact ties
            at the maximum).
        chunk_budget: bytes of transient memory per tile; ``None`` (default):
            the device's default (:func:`default_chunk_budget`: 8 MiB on CPU,
            1/256 of the GPU's memory within [32, 256] MiB on CUDA). It holds
            the fp32 logits tile, plus for bf16/fp16 inputs the fp32
            grad_weight accumulator of the tile's weight rows and either
            their fp32 copies (``fp32_upcast`` route) or the gradient tile
            rounded to the input dtype (``native`` route, see
            :func:`gemm_path`). Memory above inputs and gradients is this
            plus O(N) fp32 state, plus for bf16/fp16 inputs an fp32
            grad_hidden (N x D) and, on the ``fp32_upcast`` route, an fp32
            copy of hidden. The backward recomputes the logits tile by tile
            (four GEMM-equivalents in all).
        out_dtype: the loss's dtype. ``None`` (default): float32 for every
            input dtype, as Cut Cross-Entropy and transformers' upcast loss
            return it (a bf16-rounded per-token loss is off by up to ~0.024 at
            a loss of ~10). Pass ``hidden.dtype`` for the loss in the input
            dtype (rounded once, from the float32 loss).
        grad_filter_eps: ``None`` (default): exact gradients. A number > 0:
            Cut Cross-Entropy's gradient filtering; the backward leaves out
            both gradient GEMMs of a logits tile where every |dL/dlogit| is
            below ``grad_filter_eps * max_t |a_t|`` (a_t: the token's
            coefficient of p in dL/dz, so off the target this is
            p < grad_filter_eps, whatever the reduction's scale). The loss
            is unchanged; gradients lose those tiny terms (error measured in
            bench/README.md). On CUDA the decision costs one device-to-host
            synchronisation per tile.
        grad_in_forward: for a reduced loss ("mean"/"sum") of float32 inputs under
            autograd, form the gradients in the forward pass (as Liger does): blocks of
            ``chunk_budget / (4 V)`` tokens with their whole rows, three GEMM-equivalents
            in all instead of four (no recomputation); the backward only rescales. Costs
            the fp32 grad_hidden and grad_weight held from forward to backward, and the
            gradient GEMMs even if no backward follows. Ignored (the two-pass route) for
            ``reduction="none"``, ``return_lse``, ``grad_filter_eps``, other dtypes, or
            without autograd. The causal-LM integration turns it on (bench/README.md).

    All-ignored batch: ``"sum"`` gives 0, ``"none"`` zeros, ``"mean"`` NaN (0/0,
    exactly as ``F.cross_entropy``); gradients are 0 in all three cases.

    Bad targets: on CPU a target outside [0, V) that is not ``ignore_index``
    raises ``ValueError`` naming ``target``. On CUDA there is no host
    synchronisation to check it: such a token's loss is NaN (so the reduced
    loss is NaN) and so are the gradients it touches.

    float64 inputs (CPU only: ``torch.autograd.gradcheck`` and references) take the
    materialised route: the logits in float64 and :func:`logitkit.cross_entropy` on them
    (no memory saving; the tiled kernels are fp32).

    Returns the loss (computed in float32, returned in ``out_dtype``), and the
    log-sum-exp with ``return_lse=True``; a :class:`~logitkit.CrossEntropyOutput`
    (loss, z_loss, token_accuracy, lse) with ``return_z_loss`` or
    ``return_token_accuracy``.
    """
    _check_args(
        "linear_cross_entropy",
        hidden,
        weight,
        target,
        reduction,
        label_smoothing,
        softcap,
        z_loss,
        temperature,
        chunk_budget,
    )
    dtype = check_out_dtype(out_dtype, "linear_cross_entropy", hidden.dtype)
    if grad_filter_eps is not None and not (math.isfinite(grad_filter_eps) and grad_filter_eps > 0):
        raise ValueError(
            f"logitkit.linear_cross_entropy: grad_filter_eps must be None or a finite number > 0, got {grad_filter_eps}"
        )
    if hidden.dtype == torch.float64:
        logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden.reshape(-1, weight.shape[1]), weight.T)
        return _cross_entropy(
            logits.reshape(*hidden.shape[:-1], -1),
            target,
            class_weight=class_weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            temperature=temperature,
            softcap=softcap,
            shift=shift,
            return_lse=return_lse,
            return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy,
            out_dtype=dtype,
        )
    options = LossOptions(int(ignore_index), reduction, float(label_smoothing), float(z_loss), float(temperature))
    softcap_value, filter_eps = 0.0 if softcap is None else float(softcap), float(grad_filter_eps or 0.0)
    tiles = _Tiles(softcap_value, float(temperature), _resolve_budget(chunk_budget, hidden), filter_eps)
    labels = shifted_target(target, ignore_index) if shift else target
    fused = grad_in_forward and reduction != "none" and not return_lse and filter_eps == 0.0
    fused = fused and hidden.dtype == torch.float32 and torch.is_grad_enabled()
    fused = fused and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    function = _LinearCrossEntropyGradInForward if fused else _LinearCrossEntropy
    loss, lse, hit = function.apply(hidden, weight, bias, labels, class_weight, options, tiles, dtype)
    t = targets(labels.reshape(-1), class_weight, options.ignore_index, weight.shape[0])
    request = OutputRequest(target.shape, shift, return_lse, return_z_loss, return_token_accuracy)
    return loss_outputs(loss, lse, t, options, lambda: hit, request)


_MODULE_OPTIONS = (
    "ignore_index",
    "reduction",
    "label_smoothing",
    "softcap",
    "z_loss",
    "temperature",
    "chunk_budget",
    "out_dtype",
)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``loss(hidden, weight, target, bias=None)``."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        class_weight: torch.Tensor | None = None,
        softcap: float | None = None,
        z_loss: float = 0.0,
        temperature: float = 1.0,
        chunk_budget: int | None = None,
        out_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.class_weight: torch.Tensor | None
        self.register_buffer("class_weight", class_weight)
        self.softcap = softcap
        self.z_loss = z_loss
        self.temperature = temperature
        self.chunk_budget = chunk_budget
        self.out_dtype = out_dtype

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
        options = {name: getattr(self, name) for name in _MODULE_OPTIONS}  # read at each call: attributes may change
        return linear_cross_entropy(hidden, weight, target, bias=bias, class_weight=self.class_weight, **options)


class _LinearLogProbsAndEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index: int, tiles: _Tiles, out_dtype: torch.dtype):
        f = _forward_stats(ctx, hidden, weight, bias, target, None, ignore_index, tiles)
        valid = f.target1d != ignore_index
        log_prob = (column(f.stats, LceStateField.TARGET_LOGIT) - f.m) - f.log_s
        log_prob = torch.where(valid, log_prob, torch.zeros_like(log_prob))  # ignored: 0 (masked), not NaN
        entropy = entropy_from_stats(
            f.log_s, column(f.stats, LceStateField.SUM_EXP), column(f.stats, LceStateField.SUM_SHIFTED)
        )
        _save_for_tiles(ctx, f, weight, bias, entropy, valid)
        return log_prob.reshape(target.shape).to(out_dtype), entropy.reshape(target.shape).to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_prob, grad_entropy):
        entropy, valid = ctx.saved_tensors[5:7]
        zeros = entropy.new_zeros(entropy.shape)
        check_real_grad(grad_log_prob)
        check_real_grad(grad_entropy)
        g_l = grad_log_prob.float().reshape(-1) if grad_log_prob is not None else zeros
        g_l = torch.where(valid, g_l, zeros)  # an ignored token's log-prob is the constant 0
        g_h = grad_entropy.float().reshape(-1) if grad_entropy is not None else zeros
        coefficients = log_prob_entropy_coefficients(g_l, g_h, entropy)
        return (*_input_grads(ctx, coefficients, None), None, None, None, None)


def _materialised_log_probs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (CPU): the logits materialised and logitkit's float64 row ops on them."""
    from . import row_ops

    z = (hidden @ weight.T if bias is None else hidden @ weight.T + bias) / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = target != ignore_index
    log_prob = row_ops.log_softmax(z).gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, log_prob, torch.zeros_like(log_prob)), row_ops.entropy(z)


def linear_log_probs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_budget: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(z)[target]`` and entropy of ``softmax(z)``, with
    ``z = (hidden @ weight.T + bias) / temperature`` (and, with ``softcap``,
    ``z = softcap * tanh(z / softcap)``, as :func:`linear_cross_entropy`), without
    materialising z.

    What PPO/GRPO training needs: both outputs are float32 (or ``out_dtype``; float64 for
    float64 inputs) of ``target``'s shape, computed in float32, and both are differentiable
    (w.r.t. hidden, weight and bias). Targets must lie in [0, V) (checked on CPU; on CUDA an
    out-of-range target gives a NaN log-probability) or be ``ignore_index``: such a token
    (padding, prompt) gets log-probability 0 with no gradient, as the masked positions of
    TRL's and verl's per-token log-probs (they are multiplied by the mask anyway), and its
    entropy is still the row's entropy (it does not depend on the target). Memory as for
    :func:`linear_cross_entropy`; float64 inputs (CPU) take the materialised route.
    """
    _check_args(
        "linear_log_probs_and_entropy", hidden, weight, target, "none", 0.0, softcap, 0.0, temperature, chunk_budget
    )
    dtype = check_out_dtype(out_dtype, "linear_log_probs_and_entropy", hidden.dtype)
    if hidden.dtype == torch.float64:
        log_prob, entropy = _materialised_log_probs_and_entropy(
            hidden, weight, target, bias, softcap, float(temperature), int(ignore_index)
        )
        return log_prob.to(dtype), entropy.to(dtype)
    tiles = _Tiles(
        0.0 if softcap is None else float(softcap), float(temperature), _resolve_budget(chunk_budget, hidden)
    )
    return _LinearLogProbsAndEntropy.apply(hidden, weight, bias, target, int(ignore_index), tiles, dtype)
