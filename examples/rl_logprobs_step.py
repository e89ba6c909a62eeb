#!/usr/bin/env python
"""One policy-gradient (GRPO-style) step with logitkit's per-token log-probs and entropies.

Sample a group of completions per prompt, score them with a toy reward, then
compute the per-token log-probabilities of the completion tokens and the
per-token entropies with ``token_log_probs_and_entropy`` (from the hidden
states: no B x T x V logits), form the loss

    - mean over completion tokens of (advantage * exp(logp - logp.detach()))  - beta_H * entropy

and take an optimizer step. ``--check`` also computes the same log-probs and
entropies the TRL way (materialised logits, log_softmax + gather, -(p log p)
summed) and prints the largest differences.

Examples::

    python examples/rl_logprobs_step.py --tiny --check
    python examples/rl_logprobs_step.py --model Qwen/Qwen2.5-0.5B-Instruct --prompt "2 + 2 =" --group 8
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="a tiny randomly initialised Qwen2 and random prompts")
    src.add_argument("--model", help="a model name or path for AutoModelForCausalLM.from_pretrained")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; with --model)")
    p.add_argument("--group", type=int, default=4, help="completions sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--entropy-coef", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--check", action="store_true", help="compare with the materialised-logits (TRL-style) values")
    return p.parse_args(argv)


def reference_log_probs_and_entropy(model, input_ids, attention_mask, logits_to_keep, temperature):
    """TRL's computation: materialised logits, selective_log_softmax and entropy_from_logits."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
    logits = logits[:, :-1].float() / temperature
    log_probs = torch.log_softmax(logits, -1)
    token_log_probs = log_probs.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_log_probs, entropy


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import transformers

    from logitkit.integrations.rl import token_log_probs_and_entropy

    torch.manual_seed(0)
    if args.tiny:
        config = transformers.Qwen2Config(
            vocab_size=500,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.2,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        model = transformers.Qwen2ForCausalLM(config)
        prompts = torch.randint(3, config.vocab_size, (2, 6))
        prompt_mask = torch.ones_like(prompts)
        pad_id = 0
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, padding_side="left")
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
        batch = tokenizer(args.prompt or ["The capital of France is"], return_tensors="pt", padding=True)
        prompts, prompt_mask = batch.input_ids, batch.attention_mask
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 1. Rollouts (no gradients): a group of sampled completions per prompt.
    model.eval()
    with torch.no_grad():
        sequences = model.generate(
            input_ids=prompts.repeat_interleave(args.group, 0),
            attention_mask=prompt_mask.repeat_interleave(args.group, 0),
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens if args.tiny else 0,
            pad_token_id=pad_id,
        )
    k = sequences.shape[1] - prompts.shape[1]  # completion length
    completion = sequences[:, -k:]
    completion_mask = torch.ones_like(completion)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(args.group, 0), completion_mask], 1)

    # 2. A toy reward (fraction of even token ids) and group-normalised advantages.
    reward = (completion % 2 == 0).float().mean(1)
    grouped = reward.view(-1, args.group)
    advantage = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

    # 3. The policy-gradient step, log-probs and entropies from the hidden states.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log_probs, entropy = token_log_probs_and_entropy(
        model, sequences, attention_mask, logits_to_keep=k, temperature=args.temperature
    )
    ratio = torch.exp(log_probs - log_probs.detach())
    per_token = -advantage[:, None] * ratio - args.entropy_coef * entropy
    loss = (per_token * completion_mask).sum() / completion_mask.sum()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    print(f"sequences {tuple(sequences.shape)}, completion tokens {k}, mean reward {reward.mean():.3f}")
    print(
        f"mean log-prob {log_probs.mean():.4f}, mean entropy {entropy.mean():.4f}, loss {loss.item():.4f}, "
        f"grad norm {grad_norm:.4f}"
    )

    if args.check:
        model.eval()
        with torch.no_grad():
            ours = token_log_probs_and_entropy(
                model, sequences, attention_mask, logits_to_keep=k, temperature=args.temperature
            )
            ref = reference_log_probs_and_entropy(model, sequences, attention_mask, k, args.temperature)
        dl = (ours[0] - ref[0]).abs().max().item()
        dh = (ours[1] - ref[1]).abs().max().item()
        print(f"check vs materialised logits: max |d log-prob| {dl:.2e}, max |d entropy| {dh:.2e}")
        if max(dl, dh) > 1e-3:
            raise SystemExit("check failed")


if __name__ == "__main__":
    main()
