"""Train transformers causal LMs with logitkit's linear cross-entropy.

::

    from logitkit.integrations.causal_lm import apply_linear_cross_entropy

    patch = apply_linear_cross_entropy(model)       # model: e.g. LlamaForCausalLM
    out = model(input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()                             # out.logits is None
    patch.revert()                                  # or revert_linear_cross_entropy(model)

After :func:`apply_linear_cross_entropy`, a forward *with* ``labels`` computes
transformers' causal-LM loss (``ForCausalLMLoss``: labels shifted left by one,
``ignore_index`` tokens skipped, mean over the non-ignored tokens, or
``sum / num_items_in_batch`` when the Trainer passes ``num_items_in_batch``;
already-shifted ``shift_labels`` used as given) with
:func:`logitkit.linear_cross_entropy` straight from the hidden states the LM
head receives and the head's weight (and bias, if any): the ``N x V`` logits,
their float32 upcast and their gradient are never materialised. The decoder
runs unchanged (it is the model's own forward that runs), so every forward
argument keeps its meaning, ``logits_to_keep`` included. Tied embeddings need
nothing special: the head's weight *is* the embedding matrix, and its
gradient accumulates into the one parameter. Gemma 2/3's
``final_logit_softcapping`` becomes logitkit's ``softcap``.

Where this differs from transformers (and from Liger-Kernel / Cut
Cross-Entropy):

* ``.logits`` is ``None`` whenever ``labels`` is given (in the tuple form,
  ``return_dict=False``, the entry is left out, as transformers leaves out
  every ``None`` field). Liger returns ``None`` logits in training too; CCE
  can optionally still return them. Without ``labels`` nothing changes: the
  logits are computed as usual (``generate()``, evaluation without labels).
  To get both the loss and the logits, call the model without ``labels``.
* The loss is float32 (as transformers' upcast loss), whatever the model's
  dtype. For bf16/fp16 models logitkit computes the logits in float32 from the
  bf16/fp16 operands (the unpatched model rounds each logit to bf16 first), so
  the loss and gradients are closer to a float64 computation than the
  unpatched model's.
* Label smoothing and z-loss are options of the patch (``label_smoothing=``,
  ``z_loss=``). The Trainer's ``label_smoothing_factor`` pops ``labels`` and
  computes its smoothed loss from the logits outside the model: with the patch
  that path still works, but unpatched (the model sees no ``labels``).
* Forward hooks on the LM head see a ``(..., 0)`` stand-in tensor during a
  forward with labels, not the logits.
* Only the exact classes of :data:`SUPPORTED_MODELS` are patched; anything
  else raises ``TypeError`` naming the class. The model must use transformers'
  own ``ForCausalLMLoss`` (not a custom ``model.loss_function``), and its LM
  head must be a plain ``torch.nn.Linear``.

Autocast: if the forward runs under ``torch.autocast``, the head's operands
are cast to the autocast dtype (as autocast would for the head's matmul) and
logitkit runs with autocast off.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..linear_ce import linear_cross_entropy
from ._hf_head import (
    CHUNK_BUDGET,
    SUPPORTED_MODELS,
    CausalLMFamily,
    HeadCapture,
    acquire_interceptor,
    bound_method,
    head_operands,
    release_interceptor,
    resolve_causal_lm,
    unwrap_model,
)

__all__ = [
    "SUPPORTED_MODELS",
    "LinearCrossEntropyPatch",
    "apply_linear_cross_entropy",
    "causal_lm_loss",
    "get_patch",
    "revert_linear_cross_entropy",
]

_ATTR = "_logitkit_linear_ce_patch"


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_budget: int = CHUNK_BUDGET,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of ``hidden @ weight.T + bias``, without the logits.

    ``labels`` (..., T) are shifted left by one (the last position gets
    ``ignore_index``), unless ``shift_labels`` (already shifted, same number of
    tokens as ``hidden``) is given, which then wins. ``hidden`` (..., D) may be
    sliced by ``logits_to_keep``: the flattened hidden states and the flattened
    (shifted) labels must have the same number of tokens.

    Reduction, as ``ForCausalLMLoss``: the sum of the per-token losses divided
    by ``num_items_in_batch`` when given (gradient accumulation: the Trainer
    counts the non-ignored tokens of all micro-batches of a step), else by the
    number of non-ignored tokens (an all-ignored batch gives NaN, 0/0, as
    transformers). Float32 scalar.

    The shift and the external divisor are done here, on top of
    ``reduction="sum"`` (float32) with ``grad_in_forward=True``: the gradient of a
    scalar loss is formed in the forward pass, three GEMM-equivalents instead of
    four (float32 models; see ``linear_cross_entropy``).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("logitkit causal_lm_loss: give labels or shift_labels")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    target = shift_labels.reshape(-1).to(device=h.device, dtype=torch.long)
    if target.numel() != h.shape[0]:
        raise ValueError(
            f"logitkit causal_lm_loss: {h.shape[0]} hidden states (shape {list(hidden.shape)}, after logits_to_keep) "
            f"but {target.numel()} shifted labels (shape {list(shift_labels.shape)}); with logits_to_keep, pass "
            "labels (or shift_labels) for the kept positions only"
        )
    total = linear_cross_entropy(
        h,
        weight,
        target,
        bias=bias,
        ignore_index=ignore_index,
        reduction="sum",
        softcap=softcap,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_budget=chunk_budget,
        grad_in_forward=True,
    )
    assert isinstance(total, torch.Tensor)  # return_lse=False: the loss alone
    if num_items_in_batch is None:
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class LinearCrossEntropyPatch:
    """Handle returned by :func:`apply_linear_cross_entropy`.

    ``revert()`` restores the model (also available as a context manager:
    ``with apply_linear_cross_entropy(model): ...`` reverts on exit).
    """

    def __init__(self, model: torch.nn.Module, family: CausalLMFamily, head: torch.nn.Linear, options: dict[str, Any]):
        self.model = model
        self.family = family
        self.head = head
        self.options = options
        self.active = True
        self._original_forward: Callable[..., Any] = model.forward
        self._had_loss_function = "_loss_function" in model.__dict__
        self._original_loss_function: Callable[..., Any] = model.loss_function  # type: ignore[assignment]
        params = list(inspect.signature(self._original_forward).parameters)
        self._labels_position = params.index("labels") if "labels" in params else None
        self._interceptor = acquire_interceptor(head)
        patch = self

        def forward(self_model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return patch._forward(args, kwargs)

        def loss_function(self_model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
            return patch._loss(args, kwargs)

        # Keep the original signature visible: the Trainer drops dataset columns that are not parameters
        # of model.forward, and generate() checks it for logits_to_keep.
        signature = inspect.signature(self._original_forward)
        forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[
                inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                *signature.parameters.values(),
            ]
        )
        forward.__doc__ = self._original_forward.__doc__
        self._forward_method = bound_method(forward, model)
        self._loss_method = bound_method(loss_function, model)
        instance: Any = model  # attributes set on the instance only
        instance.forward = self._forward_method
        instance.loss_function = self._loss_method
        setattr(model, _ATTR, self)

    # -- the patched forward ------------------------------------------------------------------------
    def _labels(self, args: tuple, kwargs: dict) -> Any:
        if "labels" in kwargs:
            return kwargs["labels"]
        if self._labels_position is not None and len(args) > self._labels_position:
            return args[self._labels_position]
        return None

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        if self._labels(args, kwargs) is None:
            return self._original_forward(*args, **kwargs)
        config = self.model.config
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)
        kwargs["return_dict"] = True
        capture = HeadCapture()
        self._interceptor.stack.append(capture)
        try:
            out = self._original_forward(*args, **kwargs)
        finally:
            popped = self._interceptor.stack.pop()
            assert popped is capture
        if not capture.loss_computed:
            raise RuntimeError(
                f"logitkit: {type(self.model).__name__}.forward did not call model.loss_function with the LM "
                "head's output; the patched loss cannot be computed for this model"
            )
        # Rebuild the output without the stand-in logits (a ModelOutput cannot drop a key in place).
        out = type(out)(**{k: v for k, v in out.items() if k != "logits"})
        return out if return_dict else out.to_tuple()

    # -- the patched loss_function --------------------------------------------------------------------
    def _loss(self, args: tuple, kwargs: dict) -> torch.Tensor:
        stack = self._interceptor.stack
        capture = stack[-1] if stack else None
        if capture is None or capture.stub is None or capture.loss_computed:
            # Not inside a patched forward (someone calls model.loss_function on real logits).
            return self._original_loss_function(*args, **kwargs)
        bound = _LOSS_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        logits = a["logits"]  # other keyword arguments are ignored, as by ForCausalLMLoss
        config = self.model.config
        softcap = self.family.softcap(config)
        stub = capture.stub
        # Provenance: the loss must receive the head's output, unchanged unless the family softcaps it.
        if softcap is None:
            ok = logits is stub
        else:
            ok = isinstance(logits, torch.Tensor) and logits.shape == stub.shape and logits is not stub
        if not ok:
            raise RuntimeError(
                f"logitkit: {type(self.model).__name__}.forward changed the LM head's output before the loss in an "
                "unexpected way; refusing to compute a different loss"
            )
        vocab_size = a["vocab_size"]
        if vocab_size != self.head.out_features:
            raise ValueError(
                f"logitkit: vocab_size={vocab_size} passed to the loss but the LM head has "
                f"{self.head.out_features} outputs"
            )
        assert capture.hidden is not None
        hidden, weight, bias, context = head_operands(capture.hidden, self.head)
        with context():
            loss = causal_lm_loss(
                hidden,
                weight,
                a["labels"],
                bias=bias,
                shift_labels=a["shift_labels"],
                num_items_in_batch=a["num_items_in_batch"],
                ignore_index=a["ignore_index"],
                softcap=softcap,
                **self.options,
            )
        capture.loss_computed = True
        return loss

    # -- undo ---------------------------------------------------------------------------------------------
    def revert(self) -> None:
        """Restore the model's forward, loss_function and LM head. Idempotent."""
        if not self.active:
            return
        model: Any = self.model
        if model.__dict__.get("forward") is not self._forward_method:
            raise RuntimeError(
                f"logitkit: {type(model).__name__}.forward was wrapped by someone else after the logitkit patch "
                "(e.g. accelerate's autocast wrapper); unwrap it first"
            )
        del model.forward
        if self._had_loss_function:
            model.loss_function = self._original_loss_function
        else:
            del model._loss_function
        release_interceptor(self._interceptor)
        delattr(model, _ATTR)
        self.active = False

    def __enter__(self) -> LinearCrossEntropyPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"LinearCrossEntropyPatch({type(self.model).__name__}, {self.options}, {state})"


def _for_causal_lm_loss_signature(
    logits: Any,
    labels: Any,
    vocab_size: int,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift_labels: Any = None,
    **kwargs: Any,
) -> None:
    """The signature of transformers' ``ForCausalLMLoss`` (arguments are bound against it)."""


_LOSS_SIGNATURE = inspect.signature(_for_causal_lm_loss_signature)


def apply_linear_cross_entropy(
    model: torch.nn.Module,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_budget: int = CHUNK_BUDGET,
) -> LinearCrossEntropyPatch:
    """Make ``model(..., labels=...)`` compute its causal-LM loss with
    :func:`logitkit.linear_cross_entropy`, never materialising the logits.

    Args:
        model: a loaded transformers causal LM of one of the
            :data:`SUPPORTED_MODELS` classes (also inside PEFT's ``PeftModel``
            or a ``.module`` wrapper such as DDP: the inner model is patched).
        label_smoothing: as ``F.cross_entropy`` (transformers' own loss has none).
        z_loss: coefficient of ``logsumexp(z)**2`` per token (0: off), divided like the loss.
        chunk_budget: bytes of transient memory per tile (default 128 MiB, the core default is 8 MiB on CPU;
            see ``_hf_head.CHUNK_BUDGET``), see ``linear_cross_entropy``.

    Returns a :class:`LinearCrossEntropyPatch`; ``revert()`` it (or call
    :func:`revert_linear_cross_entropy`) to undo. Patching happens on the
    instance only (``forward``, ``loss_function`` and the head's ``forward``);
    the class and other instances are untouched. See the module docstring for
    the semantics (``.logits`` is ``None`` when ``labels`` is given).

    Raises ``TypeError`` for an unsupported class, a head that is not a plain
    ``nn.Linear`` or a custom ``model.loss_function``; ``RuntimeError`` if the
    model is already patched.
    """
    caller = "apply_linear_cross_entropy"
    inner, family, head = resolve_causal_lm(model, caller)
    if getattr(inner, _ATTR, None) is not None:
        raise RuntimeError(f"{caller}: this {type(inner).__name__} is already patched; revert it first")
    from transformers.loss.loss_utils import ForCausalLMLoss

    if inner.loss_function is not ForCausalLMLoss:
        raise TypeError(
            f"{caller}: {type(inner).__name__}.loss_function is {inner.loss_function!r}, not transformers' "
            "ForCausalLMLoss; logitkit only replaces the standard causal-LM loss"
        )
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{caller}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0:
        raise ValueError(f"{caller}: z_loss must be >= 0, got {z_loss}")
    if int(chunk_budget) <= 0:
        raise ValueError(f"{caller}: chunk_budget must be > 0 bytes, got {chunk_budget}")
    options = {"label_smoothing": float(label_smoothing), "z_loss": float(z_loss), "chunk_budget": int(chunk_budget)}
    return LinearCrossEntropyPatch(inner, family, head, options)


def revert_linear_cross_entropy(model: torch.nn.Module) -> None:
    """Undo :func:`apply_linear_cross_entropy` on ``model``; ``ValueError`` if it is not patched."""
    patch = getattr(unwrap_model(model), _ATTR, None)
    if patch is None:
        raise ValueError(f"revert_linear_cross_entropy: this {type(model).__name__} is not patched by logitkit")
    patch.revert()


def get_patch(model: torch.nn.Module) -> LinearCrossEntropyPatch | None:
    """The active patch of ``model``, or ``None``."""
    return getattr(unwrap_model(model), _ATTR, None)
