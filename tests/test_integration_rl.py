"""token_log_probs_and_entropy equals TRL's computation on materialised logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from logitkit.integrations.causal_lm import apply_linear_cross_entropy  # noqa: E402
from logitkit.integrations.rl import token_log_probs_and_entropy  # noqa: E402

VOCAB = 257
CHUNK = 16 * 1024


def _model(name="Llama", **extra):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        **extra,
    )
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def selective_log_softmax(logits, index):
    """TRL's selective_log_softmax (the plain form): log_softmax, then gather."""
    return torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits):
    """TRL's entropy_from_logits: -(p log p) summed over the vocabulary."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def trl_reference(model, input_ids, attention_mask, logits_to_keep, temperature):
    """TRL's _get_per_token_logps_and_entropies on materialised logits."""
    if logits_to_keep is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets = input_ids[:, 1:]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
        logits = logits[:, :-1]
        targets = input_ids[:, -logits_to_keep:]
    logits = logits / temperature
    return selective_log_softmax(logits, targets), entropy_from_logits(logits)


def _inputs(batch=3, seq=10):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    return ids, mask


def _grads(model, outputs, weights):
    model.zero_grad(set_to_none=True)
    (outputs[0] * weights[0]).sum().add((outputs[1] * weights[1]).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("family", "logits_to_keep", "temperature", "patched"),
    [("Llama", 4, 1.0, False), ("Qwen2", None, 0.7, False), ("Qwen3", 6, 1.3, True)],
)
def test_equal_to_trl_reference(family, logits_to_keep, temperature, patched):
    model = _model(family, **({"head_dim": 8} if family == "Qwen3" else {}))
    ids, mask = _inputs()
    ref = trl_reference(model, ids, mask, logits_to_keep, temperature)
    g = torch.Generator().manual_seed(3)
    weights = (torch.randn(ref[0].shape, generator=g), torch.randn(ref[1].shape, generator=g))
    ref_grads = _grads(model, ref, weights)
    if patched:  # also works on a model patched for training
        apply_linear_cross_entropy(model)
    got = token_log_probs_and_entropy(
        model, ids, mask, logits_to_keep=logits_to_keep, temperature=temperature, chunk_budget=CHUNK
    )
    expected_len = ids.shape[1] - 1 if logits_to_keep is None else logits_to_keep
    assert got[0].shape == got[1].shape == (ids.shape[0], expected_len)
    assert got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    got_grads = _grads(model, got, weights)
    assert got_grads.keys() == ref_grads.keys()
    for name, g_ref in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item(), msg=name)


def test_gpt2_tied_head():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64, initializer_range=0.2
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids, mask = _inputs()
    ref = trl_reference(model, ids, mask, 5, 1.0)
    got = token_log_probs_and_entropy(model, ids, mask, logits_to_keep=5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    model = _model()
    ids, _ = _inputs()
    with pytest.raises(NotImplementedError, match="group"):
        token_log_probs_and_entropy(model, ids, group=object())
    with pytest.raises(ValueError, match="logits_to_keep"):
        token_log_probs_and_entropy(model, ids, logits_to_keep=ids.shape[1])
    with pytest.raises(TypeError, match="logits_to_keep"):
        token_log_probs_and_entropy(model, ids, logits_to_keep=2.0)
    with pytest.raises(ValueError, match="input_ids"):
        token_log_probs_and_entropy(model, ids[0])
    with pytest.raises(TypeError, match="LlamaForSequenceClassification"):
        token_log_probs_and_entropy(transformers.LlamaForSequenceClassification(model.config), ids)
    gemma2 = _model("Gemma2", head_dim=8, final_logit_softcapping=3.0)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        token_log_probs_and_entropy(gemma2, ids)
    # the head is left unpatched after the call (and after a failing one)
    assert "forward" not in model.lm_head.__dict__
