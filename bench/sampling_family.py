"""Benchmark of the row-statistics sampler rules (docs/sampling.md) against the baselines run in
the same invocation: transformers' warper chain (Temperature [+ TopK + TopP] + MinP [+ Epsilon / Eta] warpers,
then softmax + multinomial), a sort-based torch sampler in the style of vLLM's native path, each
single rule against its transformers warper, on ROWS x V = 128256 float32 logits with per-row
parameters for logitkit (transformers takes one value per batch).

    python bench/sampling_family.py [--rows 64 256] [--repeats 5] [--cases typical ...]
        [--out bench/results/sampling_family.txt]

Prints median times and the speed-up ratios measured side by side (ratios, not absolute times, are
what carries over on a shared machine).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import logitkit
from logitkit import filters
from logitkit.bench.environment import cpu_model
from logitkit.bench.sampling_cases import sort_based_sample
from logitkit.bench.sampling_cases import warpers_then_multinomial as transformers_chain

VOCAB = 128256
TEMPERATURE, MIN_P, EPSILON, ETA, TOP_K, TOP_P, TYPICAL_P = 0.8, 0.05, 3e-4, 3e-4, 50, 0.9, 0.9
TOP_H = 0.4


def top_h_as_a_stage(call):
    """`call` with Top-H as a stage of its own before the chain's kernels (the top_h_mask op and
    a masked copy: the route of the rules "official" and "exact", and of every rule before
    December 5th), for comparison with the chain's kernels running it."""

    def run():
        saved = filters.FUSED_TOP_H_MAX_COUNT
        filters.FUSED_TOP_H_MAX_COUNT = 0
        try:
            return call()
        finally:
            filters.FUSED_TOP_H_MAX_COUNT = saved

    return run


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_cases(rows: int, tlp) -> dict:
    """The cases at `rows` rows: name -> (logitkit call, {baseline name: call})."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, VOCAB, generator=g) * 3
    t_rows = torch.full((rows,), TEMPERATURE) + 0.1 * torch.rand(rows, generator=g)
    p_rows = torch.full((rows,), MIN_P)
    k_rows = torch.full((rows,), TOP_K)
    top_p_rows = torch.full((rows,), TOP_P) - 0.05 * torch.rand(rows, generator=g)
    typical_rows = torch.full((rows,), TYPICAL_P) - 0.05 * torch.rand(rows, generator=g)
    seeds = torch.arange(rows)
    temp = tlp.TemperatureLogitsWarper(TEMPERATURE)
    return {
        "chain: temperature+min_p sample": (
            lambda: logitkit.sample(x, temperature=t_rows, min_p=p_rows, seed=seeds),
            {
                "transformers": lambda: transformers_chain(x, [temp, tlp.MinPLogitsWarper(MIN_P)]),
                "sort-based": lambda: sort_based_sample(x, t_rows, p_rows),
            },
        ),
        "chain: temperature+top_k+min_p sample": (
            lambda: logitkit.sample(x, temperature=t_rows, top_k=k_rows, min_p=p_rows, seed=seeds),
            {
                "transformers": lambda: transformers_chain(
                    x, [temp, tlp.TopKLogitsWarper(TOP_K), tlp.MinPLogitsWarper(MIN_P)]
                ),
                "sort-based": lambda: sort_based_sample(x, t_rows, p_rows, k_rows),
            },
        ),
        "chain: temperature+top_k+top_p+min_p sample": (
            lambda: logitkit.sample(x, temperature=t_rows, top_k=k_rows, top_p=top_p_rows, min_p=p_rows, seed=seeds),
            {
                "transformers": lambda: transformers_chain(
                    x,
                    [temp, tlp.TopKLogitsWarper(TOP_K), tlp.TopPLogitsWarper(TOP_P), tlp.MinPLogitsWarper(MIN_P)],
                ),
                "sort-based": lambda: sort_based_sample(x, t_rows, p_rows, k_rows, top_p_rows),
            },
        ),
        "chain: temperature+top_h+top_k+top_p sample": (
            lambda: logitkit.sample(x, temperature=t_rows, top_h=TOP_H, top_k=k_rows, top_p=top_p_rows, seed=seeds),
            {
                "transformers": lambda: transformers_chain(
                    x,
                    [temp, tlp.TopHLogitsWarper(TOP_H), tlp.TopKLogitsWarper(TOP_K), tlp.TopPLogitsWarper(TOP_P)],
                ),
                "top_h stage": top_h_as_a_stage(
                    lambda: logitkit.sample(
                        x, temperature=t_rows, top_h=TOP_H, top_k=k_rows, top_p=top_p_rows, seed=seeds
                    )
                ),
            },
        ),
        "chain: temperature+min_p+epsilon+eta sample": (
            lambda: logitkit.sample(x, temperature=t_rows, min_p=p_rows, epsilon=EPSILON, eta=ETA, seed=seeds),
            {
                "transformers": lambda: transformers_chain(
                    x,
                    [temp, tlp.MinPLogitsWarper(MIN_P), tlp.EpsilonLogitsWarper(EPSILON), tlp.EtaLogitsWarper(ETA)],
                )
            },
        ),
        "min_p mask": (
            lambda: logitkit.filter_logits(x, min_p=p_rows),
            {"transformers": lambda: tlp.MinPLogitsWarper(MIN_P)(None, x)},
        ),
        "top_k mask": (
            lambda: logitkit.filter_logits(x, top_k=TOP_K),
            {"transformers": lambda: tlp.TopKLogitsWarper(TOP_K)(None, x)},
        ),
        "top_p mask": (
            lambda: logitkit.filter_logits(x, top_p=top_p_rows),
            {"transformers": lambda: tlp.TopPLogitsWarper(TOP_P)(None, x)},
        ),
        "typical mask": (
            lambda: logitkit.filter_logits(x, typical_p=typical_rows),
            {"transformers": lambda: tlp.TypicalLogitsWarper(TYPICAL_P)(None, x)},
        ),
        "epsilon mask": (
            lambda: logitkit.filter_logits(x, epsilon=EPSILON),
            {"transformers": lambda: tlp.EpsilonLogitsWarper(EPSILON)(None, x)},
        ),
        "eta mask": (
            lambda: logitkit.filter_logits(x, eta=ETA),
            {"transformers": lambda: tlp.EtaLogitsWarper(ETA)(None, x)},
        ),
        "top_n_sigma mask": (
            lambda: logitkit.filter_logits(x, top_n_sigma=1.0),
            {
                "torch": lambda: x.masked_fill(
                    x < x.amax(-1, keepdim=True) - x.std(-1, correction=0, keepdim=True), -math.inf
                )
            },
        ),
        "p_less mask": (
            lambda: logitkit.filter_logits(x, p_less=True),
            {
                "torch": lambda: (lambda p: x.masked_fill(p < (p * p).sum(-1, keepdim=True), -math.inf))(
                    torch.softmax(x, -1)
                )
            },
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cases", nargs="+", default=None, help="run only the cases whose name contains one of these")
    args = parser.parse_args()
    from transformers.generation import logits_process as tlp

    lines = [f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}, V = {VOCAB}, float32"]
    for rows in args.rows:
        cases = make_cases(rows, tlp)
        lines.append(f"\nrows = {rows}")
        for name, (ours, baselines) in cases.items():
            if args.cases and not any(part in name for part in args.cases):
                continue
            t_ours = timed(ours, args.repeats)
            parts = [f"logitkit {t_ours * 1e3:8.2f} ms"]
            for bname, fn in baselines.items():
                t_b = timed(fn, args.repeats)
                parts.append(f"{bname} {t_b * 1e3:8.2f} ms (x{t_b / t_ours:5.2f})")
            lines.append(f"  {name:45s} " + "  ".join(parts))
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
