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

import torch

from . import _registration  # noqa: F401  (fake kernels of the ops)

# Bytes of transient memory per tile. Measured at N = 1024, D = 1024,
# V = 128256 on CPU (fp32, fwd+bwd, see bench/README.md): time is flat from
# 4 MiB up (tiles of 1024 tokens x 1024-2048 vocabulary entries keep the GEMMs
# compute-bound), so the default stays small.
DEFAULT_CHUNK_BUDGET = 4 * 1024 * 1024
_REDUCTIONS = ("none", "mean", "sum")


def _check_args(op, hidden, weight, target, reduction, label_smoothing, softcap, z_loss, temperature, chunk_budget):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"logitkit.{op}: hidden must be a tensor of shape (..., D)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"logitkit.{op}: weight must have shape (V, {hidden.shape[-1]}) to match hidden, got {list(weight.shape)}"
        )
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"logitkit.{op}: target must have shape {list(hidden.shape[:-1])} (hidden's leading dims), "
            f"got {list(target.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"logitkit.{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"logitkit.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"logitkit.{op}: softcap must be None or a finite number > 0, got {softcap}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"logitkit.{op}: z_loss must be a finite number >= 0, got {z_loss}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"logitkit.{op}: temperature must be a finite number > 0, got {temperature}")
    if int(chunk_budget) <= 0:
        raise ValueError(f"logitkit.{op}: chunk_budget must be > 0 bytes, got {chunk_budget}")


def _normaliser_from_stats(stats: torch.Tensor):
    """(m, log s) and lse = m + log s per token (see core::Normaliser)."""
    m, log_s = stats[:, 0], torch.log(stats[:, 1])
    return m, log_s, torch.where(m == math.inf, m, m + log_s)


def _target_weights(t1, valid, class_weight, vocab):
    """Per-token class weight of the target (0 at ignored tokens), fp32."""
    if class_weight is None:
        return valid.float()
    safe = torch.where(valid, t1, 0).clamp(0, vocab - 1)
    return class_weight.float()[safe] * valid


def _ce_coefficients(g, t1, w_y, lse, vocab, class_weight, ignore_index, eps, z_loss):
    """Backward coefficients of the cross-entropy for the per-token upstream gradient g.

    dL/dz_c = p_c (a + e (z_c - lse)) - beta [c = y] - sigma w_c (csrc/core/linear_ce.h) with
    e = 0: returns (N, 4) [a, 0, beta, sigma].
    """
    valid = t1 != ignore_index
    g = torch.where(valid, g, torch.zeros_like(g))
    # A target outside [0, V) (only possible on CUDA, where it is not checked
    # on the host) has a NaN loss; make its gradients NaN too.
    in_range = (t1 >= 0) & (t1 < vocab)
    g = torch.where(valid & ~in_range, torch.full_like(g, math.nan), g)
    beta = g * ((1.0 - eps) * w_y)  # (1 - eps) w_y: weight of -log p_y
    a = beta
    if eps > 0:  # eps/V sum_c w_c (lse - z_c): a += eps/V W, sigma = eps/V
        total_w = float(vocab) if class_weight is None else class_weight.float().sum()
        a = a + g * ((eps / vocab) * total_w)
    if z_loss > 0:  # d(zeta lse^2)/dlse = 2 zeta lse
        a = a + g * (2.0 * z_loss) * lse
    return torch.stack([a, torch.zeros_like(a), beta, g * (eps / vocab)], -1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: per-token state (linear_ce_stats); backward: the logits are
    recomputed tile by tile (linear_ce_backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, namespace, ignore_index, reduction, label_smoothing,
                softcap, z_loss, temperature, chunk_budget):
        ops = getattr(torch.ops, namespace)
        vocab, d = weight.shape
        h2 = hidden.reshape(-1, d)
        t1 = target.reshape(-1)
        valid = t1 != ignore_index
        w_y = _target_weights(t1, valid, class_weight, vocab)
        eps = label_smoothing
        stats = ops.linear_ce_stats(h2, weight, t1, bias, class_weight, ignore_index, softcap, temperature,
                                    chunk_budget)
        m, log_s, lse = _normaliser_from_stats(stats)
        # F.cross_entropy: (1 - eps) w_y (lse - z_y) + eps/V sum_c w_c (lse - z_c); plus the z-loss.
        # lse - z_y as (m - z_y) + log s: no ulp(lse) rounding when p_y -> 1.
        loss = (1.0 - eps) * w_y * ((m - stats[:, 3]) + log_s)
        if eps > 0:
            total_w = float(vocab) if class_weight is None else class_weight.float().sum()
            loss = loss + (eps / vocab) * (total_w * lse - stats[:, 4])
        if z_loss > 0:
            loss = loss + z_loss * lse * lse
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if reduction == "none":
            out = loss.reshape(target.shape)
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / w_y.sum()  # 0 / 0 = NaN for an all-ignored batch, as F.cross_entropy
        ctx.save_for_backward(h2, weight, bias, t1, class_weight, torch.stack([m, log_s], -1), w_y)
        ctx.config = (namespace, ignore_index, reduction, eps, softcap, z_loss, temperature, chunk_budget)
        ctx.hidden_shape = hidden.shape
        lse_out = lse.reshape(target.shape)
        ctx.mark_non_differentiable(lse_out)
        return out.to(hidden.dtype), lse_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        h2, weight, bias, t1, class_weight, normaliser, w_y = ctx.saved_tensors
        lse = normaliser[:, 0] + normaliser[:, 1]
        namespace, ignore_index, reduction, eps, softcap, z_loss, temperature, chunk_budget = ctx.config
        n = t1.shape[0]
        g = grad_loss.float()
        if reduction == "none":
            g = g.reshape(-1)
        elif reduction == "sum":
            g = g.expand(n)
        else:
            g = (g / w_y.sum()).expand(n)
        coefficients = _ce_coefficients(g, t1, w_y, lse, weight.shape[0], class_weight, ignore_index, eps, z_loss)
        bias_grad = bias is not None and ctx.needs_input_grad[2]
        grad_h, grad_w, grad_b = getattr(torch.ops, namespace).linear_ce_backward(
            h2, weight, t1, bias, class_weight, normaliser, coefficients, softcap, temperature, chunk_budget, bias_grad)
        return (
            grad_h.reshape(ctx.hidden_shape) if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if bias_grad else None,
            None, None, None, None, None, None, None, None, None, None,
        )


def _linear_cross_entropy(namespace, hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, class_weight=None, softcap=None, z_loss=0.0, temperature=1.0,
                          return_lse=False, chunk_budget=DEFAULT_CHUNK_BUDGET):
    _check_args("linear_cross_entropy", hidden, weight, target, reduction, label_smoothing, softcap, z_loss,
                temperature, chunk_budget)
    loss, lse = _LinearCrossEntropy.apply(
        hidden, weight, bias, target, class_weight, namespace, int(ignore_index), reduction, float(label_smoothing),
        0.0 if softcap is None else float(softcap), float(z_loss), float(temperature), int(chunk_budget))
    return (loss, lse) if return_lse else loss


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, class_weight=None, softcap=None, z_loss=0.0, temperature=1.0,
                         return_lse=False, chunk_budget=DEFAULT_CHUNK_BUDGET):
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
            class weights; the z-loss term is divided by the same number).
        return_lse: also return the per-token log-sum-exp of z (float32, shape of
            ``target``, not differentiable).
        chunk_budget: bytes of transient memory per tile (default 4 MiB):
            the fp32 logits tile, plus for bf16/fp16 inputs the fp32 copies
            of the tile's weight rows and grad_weight accumulator. Memory
            above inputs and gradients is this plus O(N) fp32 state, plus
            for bf16/fp16 inputs fp32 copies of hidden and grad_hidden
            (N x D each). The backward recomputes the logits tile by tile
            (four GEMM-equivalents in all).

    All-ignored batch: ``"sum"`` gives 0, ``"none"`` zeros, ``"mean"`` NaN (0/0,
    exactly as ``F.cross_entropy``); gradients are 0 in all three cases.

    Bad targets: on CPU a target outside [0, V) that is not ``ignore_index``
    raises ``ValueError`` naming ``target``. On CUDA there is no host
    synchronisation to check it: such a token's loss is NaN (so the reduced
    loss is NaN) and so are the gradients it touches.

    Returns the loss in ``hidden``'s dtype (computed in float32), and the
    log-sum-exp with ``return_lse=True``.
    """
    return _linear_cross_entropy("logitkit", hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                 reduction=reduction, label_smoothing=label_smoothing, class_weight=class_weight,
                                 softcap=softcap, z_loss=z_loss, temperature=temperature, return_lse=return_lse,
                                 chunk_budget=chunk_budget)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``loss(hidden, weight, target, bias=None)``."""

    def __init__(self, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, class_weight=None, softcap=None,
                 z_loss=0.0, temperature=1.0, chunk_budget=DEFAULT_CHUNK_BUDGET):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weight", class_weight)
        self.softcap = softcap
        self.z_loss = z_loss
        self.temperature = temperature
        self.chunk_budget = chunk_budget

    def forward(self, hidden, weight, target, bias=None):
        return linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    class_weight=self.class_weight, softcap=self.softcap, z_loss=self.z_loss,
                                    temperature=self.temperature, chunk_budget=self.chunk_budget)


class _LinearLogProbsAndEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, namespace, temperature, chunk_budget):
        ops = getattr(torch.ops, namespace)
        vocab, d = weight.shape
        h2 = hidden.reshape(-1, d)
        t1 = target.reshape(-1)
        stats = ops.linear_ce_stats(h2, weight, t1, bias, None, -100, 0.0, temperature, chunk_budget)
        m, log_s, _ = _normaliser_from_stats(stats)
        log_prob = (stats[:, 3] - m) - log_s
        entropy = log_s - stats[:, 2] / stats[:, 1]  # H = log s - b / s (softmax_state.h)
        ctx.save_for_backward(h2, weight, bias, t1, torch.stack([m, log_s], -1), entropy)
        ctx.config = (namespace, temperature, chunk_budget)
        ctx.hidden_shape = hidden.shape
        return log_prob.reshape(target.shape), entropy.reshape(target.shape)

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        h2, weight, bias, t1, normaliser, entropy = ctx.saved_tensors
        namespace, temperature, chunk_budget = ctx.config
        n = t1.shape[0]
        g_l = grad_log_prob.float().reshape(-1) if grad_log_prob is not None else h2.new_zeros(n, dtype=torch.float32)
        g_h = grad_entropy.float().reshape(-1) if grad_entropy is not None else h2.new_zeros(n, dtype=torch.float32)
        # d/dz_c [g_l (z_y - lse) + g_h H] = p_c (-g_l - g_h H - g_h (z_c - lse)) + g_l [c = y]
        coefficients = torch.stack([-g_l - g_h * entropy, -g_h, -g_l, torch.zeros_like(g_l)], -1)
        bias_grad = bias is not None and ctx.needs_input_grad[2]
        grad_h, grad_w, grad_b = getattr(torch.ops, namespace).linear_ce_backward(
            h2, weight, t1, bias, None, normaliser, coefficients, 0.0, temperature, chunk_budget, bias_grad)
        return (
            grad_h.reshape(ctx.hidden_shape) if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if bias_grad else None,
            None, None, None, None,
        )


def _linear_log_probs_and_entropy(namespace, hidden, weight, target, *, bias=None, temperature=1.0,
                                  chunk_budget=DEFAULT_CHUNK_BUDGET):
    _check_args("linear_log_probs_and_entropy", hidden, weight, target, "none", 0.0, None, 0.0, temperature,
                chunk_budget)
    return _LinearLogProbsAndEntropy.apply(hidden, weight, bias, target, namespace, float(temperature),
                                           int(chunk_budget))


def linear_log_probs_and_entropy(hidden, weight, target, *, bias=None, temperature=1.0,
                                 chunk_budget=DEFAULT_CHUNK_BUDGET):
    """Per-token ``log softmax(z)[target]`` and entropy of ``softmax(z)``, with
    ``z = (hidden @ weight.T + bias) / temperature``, without materialising z.

    What PPO/GRPO training needs: both outputs are float32 of ``target``'s shape
    and both are differentiable (w.r.t. hidden, weight and bias). Targets must
    lie in [0, V) (checked on CPU; on CUDA an out-of-range target gives a NaN
    log-probability). Memory as for :func:`linear_cross_entropy`.
    """
    return _linear_log_probs_and_entropy("logitkit", hidden, weight, target, bias=bias, temperature=temperature,
                                         chunk_budget=chunk_budget)
