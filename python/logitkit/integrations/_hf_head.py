"""Shared machinery of the transformers integrations: find a supported causal LM
and capture the hidden states its LM head receives, without running the head.

How the capture works. Every supported ``*ForCausalLM.forward`` ends with::

    hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    logits = self.lm_head(hidden_states)
    [Gemma 2/3 only: logits = softcap * tanh(logits / softcap)]
    loss = self.loss_function(logits, labels, vocab_size, **kwargs)   # when labels is given

While a capture is active, the LM head module's ``forward`` (overridden on the
instance, so module hooks still run) stores its input and returns a stand-in of
shape ``(..., 0)`` instead of the ``(..., V)`` logits. Everything between the
head and the loss (the softcap of Gemma) costs nothing on that stand-in, the
loss function (replaced by the causal-LM patch) recomputes the loss from the
stored hidden states, and the decoder runs exactly as the caller asked
(``attention_mask``, ``position_ids``, ``cache``, ``token_type_ids``,
``logits_to_keep`` ...), because it is the model's own forward that runs.

Only the classes of :data:`SUPPORTED_MODELS` are accepted: for each we know
what the forward does between the head and the loss. Other classes get a
``TypeError`` naming them (never a silently different loss).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "CHUNK_BUDGET",
    "SUPPORTED_MODELS",
    "CausalLMFamily",
    "HeadCapture",
    "capture_head",
    "resolve_causal_lm",
]

#: Default ``chunk_budget`` of the integrations: 128 MiB rather than the core's 8 MiB (CPU). The causal-LM
#: loss forms its gradient in the forward (``grad_in_forward``) over blocks of ``budget / (4 V)``
#: whole rows: at D = 256, N = 4096, V = 128256 (fp32, 2-core AVX2 Zen 1) the loss's fwd+bwd CPU
#: time was 45.2 s at 32 MiB (65-token blocks re-stream the 131 MB grad_weight per block), 35.7 s
#: at 128 MiB, against 40.9 s for the two-pass tiles at 32 MiB and 41.5 s for the materialised
#: loss (one interleaved run, bench/README.md). 128 MiB is small next to a training step's memory.
CHUNK_BUDGET = 128 * 1024 * 1024


def _no_softcap(config: Any) -> float | None:
    return None


def _final_logit_softcapping(config: Any) -> float | None:
    value = getattr(config, "final_logit_softcapping", None)
    return None if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class CausalLMFamily:
    """What one supported ``*ForCausalLM`` class does with its LM head's output.

    ``softcap(config)``: the ``final_logit_softcapping`` the forward applies to
    the logits between the head and the loss (``None``: the head's output goes
    to the loss unchanged, checked at run time).
    """

    module: str
    name: str
    softcap: Callable[[Any], float | None] = _no_softcap


_FAMILIES = (
    CausalLMFamily("transformers.models.llama.modeling_llama", "LlamaForCausalLM"),
    CausalLMFamily("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"),
    CausalLMFamily("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
    CausalLMFamily("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM"),
    CausalLMFamily("transformers.models.gemma.modeling_gemma", "GemmaForCausalLM"),
    CausalLMFamily("transformers.models.gemma2.modeling_gemma2", "Gemma2ForCausalLM", _final_logit_softcapping),
    CausalLMFamily("transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM", _final_logit_softcapping),
    CausalLMFamily("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel"),
)
_BY_CLASS = {(f.module, f.name): f for f in _FAMILIES}

#: Names of the transformers classes the integrations accept (exact classes,
#: not subclasses: a subclass may override ``forward``).
SUPPORTED_MODELS: tuple[str, ...] = tuple(f.name for f in _FAMILIES)


def unwrap_model(model: Any) -> Any:
    """The transformers model inside common wrappers: DDP/FSDP-style ``.module``
    and PEFT's ``get_base_model()``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(model, torch.nn.Module) and isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
    return model


def resolve_causal_lm(model: Any, caller: str) -> tuple[torch.nn.Module, CausalLMFamily, torch.nn.Linear]:
    """(the transformers model, its family, its LM head), or ``TypeError`` naming the class."""
    inner = unwrap_model(model)
    cls = type(inner)
    family = _BY_CLASS.get((cls.__module__, cls.__name__))
    if family is None:
        raise TypeError(
            f"{caller}: {cls.__module__}.{cls.__qualname__} is not supported; supported transformers classes: "
            f"{', '.join(SUPPORTED_MODELS)} (exact classes: a subclass may change what happens between the LM "
            "head and the loss)"
        )
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise TypeError(
            f"{caller}: the LM head of {cls.__name__} must be a plain torch.nn.Linear (its weight is passed to "
            f"logitkit as is), got {type(head).__module__}.{type(head).__qualname__}"
        )
    return inner, family, head


@dataclasses.dataclass
class HeadCapture:
    """One capture: filled in by the head's stand-in forward."""

    hidden: torch.Tensor | None = None
    stub: torch.Tensor | None = None
    loss_computed: bool = False


class _HeadInterceptor:
    """Overrides ``head.forward`` on the instance; passes through unless a capture is active."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head
        self.stack: list[HeadCapture] = []
        self.users = 0
        self._had_instance_forward = "forward" in head.__dict__
        self._previous_forward = head.__dict__.get("forward")
        original = head.forward

        def forward(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not self.stack:
                return original(input, *args, **kwargs)
            capture = self.stack[-1]
            if capture.hidden is not None:
                raise RuntimeError(
                    "logitkit: the LM head was called twice in one forward under a logitkit capture; "
                    "this model is not supported"
                )
            capture.hidden = input
            capture.stub = input.new_empty((*input.shape[:-1], 0))
            return capture.stub

        self.forward = forward
        head.forward = forward  # type: ignore[method-assign]
        head._logitkit_interceptor = self  # type: ignore[assignment]

    def remove(self) -> None:
        head: Any = self.head
        if head.__dict__.get("forward") is not self.forward:
            raise RuntimeError(
                "logitkit: the LM head's forward was replaced by someone else after logitkit patched it; "
                "cannot restore it"
            )
        if self._had_instance_forward:
            head.forward = self._previous_forward
        else:
            del head.forward
        del head._logitkit_interceptor


def acquire_interceptor(head: torch.nn.Linear) -> _HeadInterceptor:
    interceptor = head.__dict__.get("_logitkit_interceptor")
    if interceptor is None:
        interceptor = _HeadInterceptor(head)
    interceptor.users += 1
    return interceptor


def release_interceptor(interceptor: _HeadInterceptor) -> None:
    interceptor.users -= 1
    if interceptor.users == 0:
        interceptor.remove()


@contextmanager
def capture_head(head: torch.nn.Linear) -> Iterator[HeadCapture]:
    """Within the block, the next call of ``head`` records its input and returns
    a ``(..., 0)`` stand-in instead of the logits."""
    interceptor = acquire_interceptor(head)
    capture = HeadCapture()
    interceptor.stack.append(capture)
    try:
        yield capture
    finally:
        popped = interceptor.stack.pop()
        assert popped is capture
        release_interceptor(interceptor)


def head_operands(
    hidden: torch.Tensor, head: torch.nn.Linear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Callable[[], Any]]:
    """``(hidden, weight, bias, context)`` in the dtype the head itself would
    have run in. Under autocast the head's matmul would run in the autocast
    dtype: cast the operands to it (as autocast does) and return a context that
    disables autocast around logitkit's kernels. Otherwise hidden must already
    have the weight's dtype (as ``nn.Linear`` requires)."""
    weight: torch.Tensor = head.weight
    bias: torch.Tensor | None = head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        return hidden, weight, bias, lambda: torch.autocast(device_type, enabled=False)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"logitkit: the LM head's input is {hidden.dtype} but its weight is {weight.dtype} (outside autocast, "
            "nn.Linear would fail too)"
        )
    return hidden, weight, bias, _null_context


@contextmanager
def _null_context() -> Iterator[None]:
    yield


def bound_method(fn: Callable[..., Any], obj: Any) -> types.MethodType:
    return types.MethodType(fn, obj)
