#!/usr/bin/env python
"""Sample with ``generate()`` and logitkit's Top-H truncation, or its fused sampler chain.

Top-H keeps the most probable tokens whose (partial) entropy stays within a
fraction ``alpha`` of the distribution's entropy. logitkit's
``TopHLogitsWarper(alpha)`` is a drop-in ``LogitsProcessor`` (rule "hf": the
same kept set as transformers' own ``TopHLogitsWarper``) computed by a fused
kernel::

    from transformers import LogitsProcessorList
    from logitkit.integrations.transformers import FusedSamplingLogitsWarper, TopHLogitsWarper

    model.generate(**inputs, do_sample=True, top_k=0, temperature=0.8,
                   logits_processor=LogitsProcessorList([TopHLogitsWarper(0.4)]))

Custom processors run after generate's own warpers, so it sees ``logits /
temperature`` as transformers' Top-H does. Pass ``top_k=0`` (and keep
``top_p=1``): otherwise the generation config's top-k (often 50) cuts the
vocabulary first.

With ``--min-p`` (and optionally ``--epsilon`` / ``--eta``) the example runs
logitkit's ``FusedSamplingLogitsWarper`` instead: temperature and every rule in
one call (docs/sampling.md). It replaces generate's own temperature warper, so
generate then runs with ``temperature=1``::

    FusedSamplingLogitsWarper(0.8, top_k=50, min_p=0.05, epsilon=3e-4)

With ``--mirostat-tau`` it runs Mirostat v2 (``MirostatLogitsWarper(tau)``, after
generate's temperature warper), which keeps each sequence's ``mu`` across the
steps of ``generate()`` and prints it at the end.

Examples::

    python examples/generate_top_h.py --tiny
    python examples/generate_top_h.py --tiny --min-p 0.05 --epsilon 3e-4
    python examples/generate_top_h.py --tiny --mirostat-tau 3.0
    python examples/generate_top_h.py --model Qwen/Qwen2.5-0.5B-Instruct --prompt "Once upon a time" --top-h 0.4
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
    src.add_argument("--tiny", action="store_true", help="a tiny randomly initialised Llama (token ids only)")
    src.add_argument("--model", help="a model name or path for AutoModelForCausalLM.from_pretrained")
    p.add_argument("--prompt", default="Once upon a time", help="the prompt (with --model)")
    p.add_argument("--top-h", type=float, default=0.4, help="alpha in (0, 1]: the entropy budget fraction")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=None, help="use the fused sampler chain with this min-p")
    p.add_argument("--epsilon", type=float, default=None, help="with --min-p: also epsilon truncation")
    p.add_argument("--eta", type=float, default=None, help="with --min-p: also eta truncation")
    p.add_argument("--top-k", type=int, default=None, help="with --min-p: also top-k (applied first)")
    p.add_argument("--mirostat-tau", type=float, default=None, help="Mirostat v2 with this target surprise (bits)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 12 with --tiny, else 64")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import transformers

    from logitkit.integrations.transformers import (
        FusedSamplingLogitsWarper,
        MirostatLogitsWarper,
        TopHLogitsWarper,
    )

    torch.manual_seed(args.seed)
    tokenizer = None
    if args.tiny:
        config = transformers.LlamaConfig(
            vocab_size=1000,
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
        model = transformers.LlamaForCausalLM(config).eval()
        input_ids = torch.randint(3, config.vocab_size, (1, 5))
        attention_mask = torch.ones_like(input_ids)
        pad_id = 0
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
        batch = tokenizer(args.prompt, return_tensors="pt")
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    max_new = args.max_new_tokens or (12 if args.tiny else 64)
    if args.mirostat_tau is not None:  # after generate's temperature warper
        processor, temperature = MirostatLogitsWarper(args.mirostat_tau), args.temperature
    elif args.min_p is None:
        processor, temperature = TopHLogitsWarper(args.top_h), args.temperature
    else:  # the fused chain applies the temperature itself
        chain = dict(top_k=args.top_k, min_p=args.min_p, epsilon=args.epsilon, eta=args.eta)
        processor, temperature = FusedSamplingLogitsWarper(args.temperature, **chain), 1.0
    print(f"processor: {type(processor).__name__}")
    processors = transformers.LogitsProcessorList([processor])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.repeat(args.num_samples, 1),
            attention_mask=attention_mask.repeat(args.num_samples, 1),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=temperature,
            max_new_tokens=max_new,
            logits_processor=processors,
            pad_token_id=pad_id,
        )
    completions = out[:, input_ids.shape[1] :]
    for i, row in enumerate(completions):
        text = tokenizer.decode(row, skip_special_tokens=True) if tokenizer is not None else row.tolist()
        print(f"sample {i}: {text}")
    if args.mirostat_tau is not None:
        print(f"mu after the last step: {processor.mu.tolist()}")


if __name__ == "__main__":
    main()
