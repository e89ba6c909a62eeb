"""Per-token log-probabilities and entropies of a transformers causal LM, for
RL fine-tuning (PPO, GRPO, ...), without materialising the logits.

::

    from logitkit.integrations.rl import token_log_probs_and_entropy

    logps, entropies = token_log_probs_and_entropy(
        model, input_ids, attention_mask, logits_to_keep=completion_length, temperature=0.9)

The same numbers as TRL's ``_get_per_token_logps_and_entropies`` (logits of
``model(input_ids, attention_mask, logits_to_keep=k + 1)``, the last position
dropped, divided by the temperature; ``selective_log_softmax`` against the
last ``k`` tokens and ``entropy_from_logits``), computed by
:func:`logitkit.linear_log_probs_and_entropy` from the hidden states the LM
head receives: no ``B x k x V`` logits, no float32 copy of them, no softmax.
"""

from __future__ import annotations

from typing import Any

import torch

from ..linear_ce import linear_log_probs_and_entropy
from ._hf_head import CHUNK_BUDGET, capture_head, head_operands, resolve_causal_lm

__all__ = ["token_log_probs_and_entropy"]


def token_log_probs_and_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    logits_to_keep: int | None = None,
    temperature: float = 1.0,
    chunk_budget: int = CHUNK_BUDGET,
    group: Any = None,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(x_{t+1} | x_{<=t})`` and entropy of ``p(. | x_{<=t})``.

    Args:
        model: a transformers causal LM of one of the supported classes (see
            ``logitkit.integrations.causal_lm.SUPPORTED_MODELS``), possibly
            wrapped (DDP ``.module``, PEFT): the wrapper is what gets called, so
            its hooks run. Patched by ``apply_linear_cross_entropy`` or not.
        input_ids: (B, T) int64, prompt followed by completion.
        attention_mask: (B, T) or None, passed to the model.
        logits_to_keep: ``k``: score only the last ``k`` tokens (the
            completion), as TRL. ``None``: every token but the first.
        temperature: the logits are divided by it (as TRL before
            ``selective_log_softmax``).
        chunk_budget: see :func:`logitkit.linear_log_probs_and_entropy` (default here 128 MiB, as
            ``apply_linear_cross_entropy``).
        group: tensor-parallel process group, reserved (vocabulary-parallel
            heads land separately); must be ``None`` for now.
        **model_kwargs: further arguments of the model's forward (e.g.
            ``position_ids``); ``use_cache`` defaults to False.

    Returns ``(log_probs, entropies)``, both float32 of shape (B, k) (or
    (B, T - 1)) and differentiable w.r.t. the model's parameters. Entry ``j``
    scores token ``T - k + j`` given the tokens before it. Padded positions are
    computed like any other (mask them with your completion mask, as TRL does).

    Differences from TRL: the result is float32 whatever the model's dtype,
    and for bf16/fp16 models it is computed from float32 logits of the
    bf16/fp16 operands (TRL's reference rounds the logits to the model's dtype
    first). Models whose forward softcaps the logits (Gemma 2/3 with
    ``final_logit_softcapping``) raise ``NotImplementedError``:
    ``linear_log_probs_and_entropy`` has no ``softcap`` yet.
    """
    caller = "token_log_probs_and_entropy"
    if group is not None:
        raise NotImplementedError(f"{caller}: group (tensor-parallel process group) is reserved; pass None")
    inner, family, head = resolve_causal_lm(model, caller)
    softcap = family.softcap(inner.config)
    if softcap is not None:
        raise NotImplementedError(
            f"{caller}: {type(inner).__name__} applies final_logit_softcapping={softcap}, which "
            "logitkit.linear_log_probs_and_entropy does not support yet"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{caller}: input_ids must be a (B, T) tensor")
    seq_len = input_ids.shape[1]
    if seq_len < 2:
        raise ValueError(f"{caller}: input_ids needs at least 2 tokens, got T = {seq_len}")
    if logits_to_keep is None:
        keep = 0
        targets = input_ids[:, 1:]
    else:
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
            raise TypeError(f"{caller}: logits_to_keep must be an int or None, got {type(logits_to_keep).__name__}")
        if not (1 <= logits_to_keep < seq_len):
            raise ValueError(
                f"{caller}: logits_to_keep must be in [1, T - 1] = [1, {seq_len - 1}], got {logits_to_keep}"
            )
        keep = logits_to_keep + 1
        targets = input_ids[:, -logits_to_keep:]
    model_kwargs.setdefault("use_cache", False)
    with capture_head(head) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **model_kwargs)
    if capture.hidden is None:
        raise RuntimeError(f"{caller}: {type(inner).__name__}.forward did not call its LM head")
    hidden = capture.hidden[:, :-1]  # the last position predicts a token after the sequence
    hidden, weight, bias, context = head_operands(hidden, head)
    with context():
        return linear_log_probs_and_entropy(
            hidden, weight, targets.to(hidden.device), bias=bias, temperature=temperature, chunk_budget=chunk_budget
        )
