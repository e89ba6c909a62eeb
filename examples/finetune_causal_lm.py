#!/usr/bin/env python
"""Fine-tune a transformers causal LM with logitkit's linear cross-entropy.

``apply_linear_cross_entropy(model)`` makes ``model(..., labels=...)`` compute
the usual shifted causal-LM loss straight from the hidden states and the LM
head's weight, without the N x V logits; the ``transformers.Trainer`` is used
unchanged (gradient accumulation included: it passes ``num_items_in_batch``).

Examples::

    python examples/finetune_causal_lm.py --tiny                      # random tiny Llama, random tokens, seconds
    python examples/finetune_causal_lm.py --model Qwen/Qwen2.5-0.5B --text-file corpus.txt --steps 100
    python examples/finetune_causal_lm.py --tiny --no-patch           # the same run with transformers' own loss
"""

from __future__ import annotations

import argparse
import tempfile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="a tiny randomly initialised Llama and random tokens")
    src.add_argument("--model", help="a model name or path for AutoModelForCausalLM.from_pretrained")
    p.add_argument("--text-file", help="training text (with --model): tokenised and cut into --seq-len blocks")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 3 with --tiny, else 50)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 32 with --tiny, else 512)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bf16", action="store_true", help="load/train the model in bfloat16")
    p.add_argument("--no-patch", action="store_true", help="do not patch (transformers' own loss, for comparison)")
    p.add_argument("--output-dir", default=None, help="Trainer output directory (default: a temporary one)")
    p.add_argument("--cpu", action="store_true", help="force the CPU even if a GPU is available")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import transformers

    from logitkit.integrations.causal_lm import apply_linear_cross_entropy

    steps = args.steps or (3 if args.tiny else 50)
    seq_len = args.seq_len or (32 if args.tiny else 512)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(0)
    if args.tiny:
        config = transformers.LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=seq_len,
        )
        model = transformers.LlamaForCausalLM(config).to(dtype)
        n_examples = args.batch_size * args.grad_accum * steps
        ids = torch.randint(0, config.vocab_size, (n_examples, seq_len))
        blocks = list(ids)
    else:
        if not args.text_file:
            raise SystemExit("--model needs --text-file (the training text)")
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        with open(args.text_file, encoding="utf-8") as f:
            tokens = tokenizer(f.read(), return_tensors="pt").input_ids[0]
        n_blocks = tokens.numel() // seq_len
        if n_blocks == 0:
            raise SystemExit(f"--text-file has {tokens.numel()} tokens, fewer than --seq-len {seq_len}")
        blocks = list(tokens[: n_blocks * seq_len].view(n_blocks, seq_len))
    data = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in blocks]

    if not args.no_patch:
        patch = apply_linear_cross_entropy(model)
        print(f"patched: {patch}")

    with tempfile.TemporaryDirectory() as tmp:
        training_args = transformers.TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=args.cpu or args.tiny,
            bf16=args.bf16 and not (args.cpu or args.tiny),
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=training_args, train_dataset=data)
        result = trainer.train()
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    print(f"steps: {result.global_step}  losses: {losses}  mean training loss: {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
