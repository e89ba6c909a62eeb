"""Fake (meta) kernels and autograd formulas for every logitkit op, registered
with torch.library for each op namespace (``logitkit`` and, when built,
``logitkit_emulated``). The fake kernels repeat the C++ argument checks so that
``torch.compile`` reports bad input at trace time with the same messages."""
from __future__ import annotations

import math

import torch

from ._loader import OP_NAMESPACES

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(x: torch.Tensor, op: str, arg: str) -> None:
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logitkit.{op}: {arg} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(
            f"logitkit.{op}: {arg} must have at least one dimension (the last one is the vocabulary), got a 0-d tensor"
        )


def check_temperature(temperature: float, op: str) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"logitkit.{op}: temperature must be a finite number > 0, got {temperature}")


TOP_H_RULES = ("hf", "official", "exact")


def check_top_h_args(
    logits: torch.Tensor, alpha: float | None, temperature: float, rule: str, cap: int, op: str = "top_h_mask"
) -> None:
    """The argument checks of top_h_mask and sample (alpha None: no
    truncation), with the C++ kernels' messages."""
    check_logits(logits, op, "logits")
    if alpha is not None and not (alpha > 0 and alpha <= 1):
        raise ValueError(f"logitkit.{op}: alpha must be in (0, 1], got {alpha}")
    check_temperature(temperature, op)
    if rule not in TOP_H_RULES:
        raise ValueError(f"logitkit.{op}: rule must be 'hf', 'official' or 'exact', got '{rule}'")
    if cap != -1 and cap < 1:
        raise ValueError(f"logitkit.{op}: cap must be >= 1 (or -1 for the rule's default), got {cap}")


def _register(ns: str) -> None:
    ops = getattr(torch.ops, ns)
    lib = f"{ns}::"

    # ---- fake kernels -------------------------------------------------------
    def elementwise_fake(name: str, arg: str = "x"):
        def fake(x, temperature=1.0):
            check_logits(x, name, arg)
            check_temperature(temperature, name)
            return x.new_empty(x.shape)

        torch.library.register_fake(lib + name)(fake)

    elementwise_fake("softmax")
    elementwise_fake("log_softmax")

    @torch.library.register_fake(lib + "logsumexp")
    def _(x, temperature=1.0):
        check_logits(x, "logsumexp", "x")
        check_temperature(temperature, "logsumexp")
        return x.new_empty(x.shape[:-1])

    @torch.library.register_fake(lib + "entropy")
    def _(logits, temperature=1.0):
        check_logits(logits, "entropy", "logits")
        check_temperature(temperature, "entropy")
        return logits.new_empty(logits.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(lib + "softmax_stats")
    def _(x, temperature=1.0):
        check_logits(x, "softmax_stats", "x")
        check_temperature(temperature, "softmax_stats")
        return x.new_empty((*x.shape[:-1], 3), dtype=torch.float32)

    def backward_fake(name: str, arg: str, per_row_grad: bool):
        def fake(grad, x, temperature):
            check_logits(x, name, arg)
            check_temperature(temperature, name)
            expected = x.shape[:-1] if per_row_grad else x.shape
            if grad.shape != expected:
                raise ValueError(f"logitkit.{name}: grad must have shape {list(expected)}, got {list(grad.shape)}")
            return x.new_empty(x.shape)

        torch.library.register_fake(lib + name)(fake)

    backward_fake("softmax_backward", "output", per_row_grad=False)
    backward_fake("log_softmax_backward", "output", per_row_grad=False)
    backward_fake("logsumexp_backward", "x", per_row_grad=True)
    backward_fake("entropy_backward", "x", per_row_grad=True)

    @torch.library.register_fake(lib + "top_h_mask")
    def _(logits, alpha, temperature=1.0, rule="hf", cap=-1):
        check_top_h_args(logits, alpha, temperature, rule, cap)
        return logits.new_empty(logits.shape, dtype=torch.bool)

    # Linear cross-entropy (python/logitkit/linear_ce.py owns their autograd).
    def check_linear_ce(hidden, weight, target, op):
        check_logits(hidden, op, "hidden")
        if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
            raise ValueError(f"logitkit.{op}: hidden must be (N, D) and weight (V, D)")
        if target.dtype != torch.int64 or target.shape != hidden.shape[:1]:
            raise ValueError(f"logitkit.{op}: target must be torch.int64 of shape ({hidden.shape[0]})")

    @torch.library.register_fake(lib + "linear_ce_stats")
    def _(hidden, weight, target, bias, class_weight, ignore_index, softcap, temperature, chunk_budget):
        check_linear_ce(hidden, weight, target, "linear_cross_entropy")
        return hidden.new_empty((hidden.shape[0], 5), dtype=torch.float32)

    @torch.library.register_fake(lib + "linear_ce_backward")
    def _(hidden, weight, target, bias, class_weight, normaliser, coefficients, softcap, temperature, chunk_budget,
          bias_grad):
        check_linear_ce(hidden, weight, target, "linear_cross_entropy_backward")
        return (
            hidden.new_empty(hidden.shape),
            weight.new_empty(weight.shape),
            hidden.new_empty((weight.shape[0] if bias_grad else 0,)),
        )

    @torch.library.register_fake(lib + "sample")
    def _(logits, uniform, alpha, temperature=1.0, rule="hf", cap=-1):
        check_top_h_args(logits, alpha, temperature, rule, cap, "sample")
        batch = logits.shape[:-1]
        if uniform.device != logits.device:
            raise ValueError(f"logitkit.sample: uniform is on {uniform.device} but logits is on {logits.device}")
        if uniform.dtype != torch.float32:
            raise TypeError(f"logitkit.sample: uniform must be float32, got {uniform.dtype}")
        if uniform.shape != batch:
            raise ValueError(
                f"logitkit.sample: uniform must have shape {list(batch)} (one number per row), got {list(uniform.shape)}"
            )
        return logits.new_empty(batch, dtype=torch.int64)

    # ---- autograd -----------------------------------------------------------
    def save_output(ctx, inputs, output):
        ctx.temperature = inputs[1] if len(inputs) > 1 else 1.0
        ctx.save_for_backward(output)

    def save_input(ctx, inputs, output):
        ctx.temperature = inputs[1] if len(inputs) > 1 else 1.0
        ctx.save_for_backward(inputs[0])

    def backward_with(backward_op):
        def backward(ctx, grad):
            (saved,) = ctx.saved_tensors
            return backward_op(grad.to(saved.dtype), saved, ctx.temperature), None

        return backward

    torch.library.register_autograd(lib + "softmax", backward_with(ops.softmax_backward), setup_context=save_output)
    torch.library.register_autograd(
        lib + "log_softmax", backward_with(ops.log_softmax_backward), setup_context=save_output
    )
    torch.library.register_autograd(lib + "logsumexp", backward_with(ops.logsumexp_backward), setup_context=save_input)

    torch.library.register_autograd(lib + "entropy", backward_with(ops.entropy_backward), setup_context=save_input)


for _ns in OP_NAMESPACES:
    _register(_ns)
