"""apply_linear_cross_entropy on tiny random transformers models: loss and every
parameter's gradient equal the unpatched model's."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from logitkit.integrations import causal_lm  # noqa: E402
from logitkit.integrations.causal_lm import (  # noqa: E402
    SUPPORTED_MODELS,
    apply_linear_cross_entropy,
    get_patch,
    revert_linear_cross_entropy,
)

VOCAB = 301
# A small tile budget so that the vocabulary is walked in several chunks.
CHUNK = 16 * 1024
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _llama_like(name: str, **extra):
    def build():
        cfg = getattr(transformers, f"{name}Config")(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            initializer_range=0.2,
            **ATTN,
            **extra,
        )
        return getattr(transformers, f"{name}ForCausalLM")(cfg)

    return build


def _gemma3():
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        head_dim=8,
        initializer_range=0.2,
        final_logit_softcapping=3.0,
        sliding_window=8,
        **ATTN,
    )
    return transformers.Gemma3ForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=1,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


FAMILIES = {
    "llama": _llama_like("Llama"),
    "llama-tied": _llama_like("Llama", tie_word_embeddings=True),
    "mistral": _llama_like("Mistral", sliding_window=None),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3", head_dim=8),
    "gemma": _llama_like("Gemma", head_dim=8),
    "gemma2": _llama_like("Gemma2", head_dim=8, final_logit_softcapping=3.0, sliding_window=8),
    "gemma3": _gemma3,
    "gpt2": _gpt2,
}


def _model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    return FAMILIES[family]().to(dtype).eval()  # eval: no dropout; gradients still flow


def _batch(batch=2, seq=12, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = ids.clone()
    if pad:
        mask[1, :3] = 0  # left padding on the second row
        labels[1, :3] = -100
        labels[0, 4:6] = -100  # ignored prompt tokens
    return ids, mask, labels


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(ref, got, rtol=2e-5, atol=2e-6):
    (ref_out, ref_grads), (out, grads) = ref, got
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref_out.loss.float(), rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    worst = 0.0
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        err = ((grads[name] - g).abs().max() / scale).item()
        worst = max(worst, err)
        torch.testing.assert_close(grads[name], g, rtol=rtol * 10, atol=atol + 1e-5 * scale.item(), msg=name)
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_grads_equal_unpatched(family):
    model = _model(family)
    ids, mask, labels = _batch()
    ref = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    with apply_linear_cross_entropy(model, chunk_budget=CHUNK) as patch:
        assert get_patch(model) is patch
        got = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
        assert got[0].logits is None
    assert get_patch(model) is None
    _assert_same(ref, got)
    # Reverted: logits are back.
    assert model(input_ids=ids, labels=labels).logits.shape == (*ids.shape, VOCAB)


def test_softcap_is_exercised():
    """The Gemma 2 softcap (3.0) must matter on these logits, or the test above proves nothing about it."""
    model = _model("gemma2")
    ids, _, labels = _batch()
    ref = model(input_ids=ids, labels=labels).loss
    model.config.final_logit_softcapping = None
    without = model(input_ids=ids, labels=labels).loss
    assert (ref - without).abs() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_num_items_in_batch(family):
    """Gradient accumulation: sum / num_items_in_batch, as ForCausalLMLoss."""
    model = _model(family)
    ids, mask, labels = _batch()
    n = torch.tensor(37)
    ref = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    with apply_linear_cross_entropy(model, chunk_budget=CHUNK):
        got = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
        # an int works too
        as_int = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=37).loss
    _assert_same(ref, got)
    torch.testing.assert_close(as_int, got[0].loss)


def test_logits_to_keep_and_shift_labels():
    model = _model("qwen3")
    ids, mask, labels = _batch(seq=14)
    k = 5
    # labels of the kept positions (shifted inside the loss) ...
    ref = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels[:, -k:], logits_to_keep=k)
    # ... and already-shifted labels (here: other tokens), which win over labels
    shift = torch.randint(0, VOCAB, (ids.shape[0], k), generator=torch.Generator().manual_seed(5))
    shift[0, 1] = -100
    ref_shift = _loss_and_grads(
        model, input_ids=ids, attention_mask=mask, labels=labels[:, -k:], shift_labels=shift, logits_to_keep=k
    )
    with apply_linear_cross_entropy(model, chunk_budget=CHUNK):
        got = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels[:, -k:], logits_to_keep=k)
        got_shift = _loss_and_grads(
            model, input_ids=ids, attention_mask=mask, labels=labels[:, -k:], shift_labels=shift, logits_to_keep=k
        )
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(input_ids=ids, labels=labels, logits_to_keep=k)
    _assert_same(ref, got)
    _assert_same(ref_shift, got_shift)
    assert not torch.allclose(ref[0].loss, ref_shift[0].loss)


def test_head_bias():
    model = _model("llama")
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    ids, mask, labels = _batch()
    ref = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    with apply_linear_cross_entropy(model, chunk_budget=CHUNK):
        got = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert "lm_head.bias" in got[1]
    _assert_same(ref, got)


def test_label_smoothing_and_z_loss_options():
    model = _model("llama")
    ids, mask, labels = _batch()
    with apply_linear_cross_entropy(model, chunk_budget=CHUNK, label_smoothing=0.1, z_loss=1e-3):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].reshape(-1, VOCAB).float()
    target = labels[:, 1:].reshape(-1)
    valid = target != -100
    ce = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    ref = (ce + 1e-3 * logits.logsumexp(-1) ** 2)[valid].mean()
    torch.testing.assert_close(loss, ref)


def test_without_labels_unchanged_and_tuple_output():
    model = _model("gemma2")
    ids, mask, labels = _batch()
    ref_logits = model(input_ids=ids, attention_mask=mask).logits
    ref_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with apply_linear_cross_entropy(model, chunk_budget=CHUNK):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref_logits, rtol=0, atol=0)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        assert isinstance(out, tuple)
        torch.testing.assert_close(out[0], ref_loss)
        assert not any(isinstance(t, torch.Tensor) and t.dim() == 3 for t in out)  # no logits entry
        # loss_function called outside a patched forward delegates to transformers' loss
        direct = model.loss_function(ref_logits, labels, VOCAB)
        torch.testing.assert_close(direct, ref_loss)


def test_generate_unchanged():
    model = _model("llama")
    ids = torch.randint(0, VOCAB, (1, 4))
    ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    with apply_linear_cross_entropy(model):
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), ref)


def test_revert_restores_instance():
    model = _model("gpt2")
    signature = inspect.signature(model.forward)
    patch = apply_linear_cross_entropy(model)
    # the Trainer (dataset columns) and generate() (logits_to_keep) read the forward's signature
    assert inspect.signature(model.forward) == signature
    with pytest.raises(RuntimeError, match="already patched"):
        apply_linear_cross_entropy(model)
    assert "forward" in model.__dict__ and "forward" in model.lm_head.__dict__
    revert_linear_cross_entropy(model)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert "_loss_function" not in model.__dict__
    patch.revert()  # idempotent
    with pytest.raises(ValueError, match="not patched"):
        revert_linear_cross_entropy(model)


def test_unsupported_models_raise_naming_the_class():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, **ATTN)
    with pytest.raises(TypeError, match="LlamaForSequenceClassification"):
        apply_linear_cross_entropy(transformers.LlamaForSequenceClassification(cfg))

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    with pytest.raises(TypeError, match=r"MyLlama.*not supported"):
        apply_linear_cross_entropy(MyLlama(cfg))
    model = transformers.LlamaForCausalLM(cfg)
    model.loss_function = lambda *a, **k: 0.0
    with pytest.raises(TypeError, match="ForCausalLMLoss"):
        apply_linear_cross_entropy(model)
    model = transformers.LlamaForCausalLM(cfg)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises(TypeError, match=r"plain torch\.nn\.Linear"):
        apply_linear_cross_entropy(model)
    assert "LlamaForCausalLM" in SUPPORTED_MODELS


def test_unexpected_change_between_head_and_loss_is_refused():
    """If something alters the head's output before the loss, the patch refuses rather than computing another loss."""
    model = _model("llama")
    ids, _, labels = _batch()
    with apply_linear_cross_entropy(model):
        model.lm_head.register_forward_hook(lambda mod, inp, out: out * 2.0)
        with pytest.raises(RuntimeError, match="changed the LM head's output"):
            model(input_ids=ids, labels=labels)


def _errors_vs_fp64(model_bf16, model_fp64, inputs):
    out64, g64 = _loss_and_grads(model_fp64, **inputs)
    out, g = _loss_and_grads(model_bf16, **inputs)
    loss_err = (out.loss.double() - out64.loss).abs().item()
    grad_err = {n: ((g[n].double() - g64[n]).norm() / g64[n].norm()).item() for n in g64}
    return loss_err, grad_err


def test_bf16_no_less_accurate_than_unpatched():
    """bf16 model: our error against a float64 computation is at most 1.5x the
    unpatched bf16 model's own error (plus a small atol), for the loss and for
    every parameter's gradient (relative Frobenius error)."""
    model64 = _model("llama", torch.float64)
    model = copy.deepcopy(model64).to(torch.bfloat16)
    model64 = copy.deepcopy(model).double()  # the same (bf16-representable) weights
    ids, mask, labels = _batch(batch=4, seq=16)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss_err, ref_grad_err = _errors_vs_fp64(model, model64, inputs)
    with apply_linear_cross_entropy(model, chunk_budget=CHUNK):
        loss_err, grad_err = _errors_vs_fp64(model, model64, inputs)
    assert loss_err <= 1.5 * ref_loss_err + 2e-3, (loss_err, ref_loss_err)
    for name, err in grad_err.items():
        assert err <= 1.5 * ref_grad_err[name] + 1e-3, (name, err, ref_grad_err[name])


def test_autocast_bf16():
    model = _model("llama")
    ids, mask, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
        with apply_linear_cross_entropy(model, chunk_budget=CHUNK):
            got = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    # bf16 logits (unpatched) vs fp32 logits of bf16 operands (patched): bf16-level agreement
    torch.testing.assert_close(got[0].loss, ref[0].loss.float(), rtol=2e-2, atol=2e-2)
    for name, g in ref[1].items():
        assert ((got[1][name] - g).norm() / g.norm()) < 5e-2, name


def test_trainer_step(tmp_path, monkeypatch):
    """One transformers.Trainer optimisation step on the patched model; the loss goes
    through logitkit, with the Trainer's num_items_in_batch."""
    pytest.importorskip("accelerate")  # the Trainer needs it
    calls = []

    def recording_loss(*args, **kwargs):
        calls.append(kwargs["num_items_in_batch"])
        return original_loss(*args, **kwargs)

    original_loss = causal_lm.causal_lm_loss
    monkeypatch.setattr(causal_lm, "causal_lm_loss", recording_loss)
    model = _model("llama").train()
    ids, mask, labels = _batch(batch=4, seq=12)
    data = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    before = model.lm_head.weight.detach().clone()
    apply_linear_cross_entropy(model, chunk_budget=CHUNK)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 1
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.lm_head.weight, before)
    assert get_patch(model) is not None
    # 2 micro-batches of 2 sequences; num_items_in_batch counts the non-ignored shifted labels of both
    n_items = int((torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:] != -100).sum())
    assert len(calls) == 2 and all(int(c) == n_items for c in calls), (calls, n_items)
