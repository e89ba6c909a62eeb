#!/usr/bin/env python
"""Peak memory and time of one real training step, patched vs unpatched.

One step = forward with labels + backward + AdamW step + zero_grad, on a
randomly initialised ``LlamaForCausalLM`` with a small hidden size and a large
vocabulary (default D = 256, 2 layers, V = 128256, batch 4 x 1024 tokens, fp32,
CPU): the shape where the logits (N x V) dominate the step's memory.
``unpatched`` is transformers' own loss (``ForCausalLMLoss`` on materialised
logits); ``patched`` is the same model after
``logitkit.integrations.causal_lm.apply_linear_cross_entropy``.

How it measures. Each variant runs in its own subprocess (a fresh heap, so
neither inherits the other's freed memory), builds the same model (same seed)
and batch, runs ``--warmup`` steps (the first allocates AdamW's state), then
``--steps`` timed steps. Before each timed step it returns freed heap memory
to the OS (glibc ``malloc_trim(0)``), reads ``VmRSS`` as the baseline (model,
optimizer state, batch: identical for both variants), resets the kernel's
peak-RSS counter (``5`` into ``/proc/self/clear_refs``), runs the step, and
reads ``VmHWM``: ``peak above baseline = VmHWM - baseline`` is the memory the
step itself needs (activations, logits and their gradient, parameter
gradients, temporaries). The process's overall peak (``ru_maxrss``, which
includes the model, optimizer state and torch's libraries) is reported too.
PyTorch's CPU allocator does not cache freed blocks, so RSS follows the
tensors closely. Linux only. Time: wall clock of the step and its CPU time
(``time.process_time()``, all threads), medians over the timed steps; the
1-minute load average is recorded, since on a shared machine the wall clock
depends on what else runs.

Usage::

    python bench/train_step.py                       # the default shape; minutes on 2 cores
    python bench/train_step.py --tiny                # seconds (smoke test)
    python bench/train_step.py --txt bench/results/train_step.txt --json bench/results/train_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

VARIANTS = ("unpatched", "patched")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_variant(args: argparse.Namespace) -> dict:
    """Runs in the child process: one variant, returns its measurements."""
    import torch
    import transformers

    from logitkit.integrations.causal_lm import apply_linear_cross_entropy

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).train()
    if args.variant == "patched":
        apply_linear_cross_entropy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = input_ids.clone()

    def step() -> float:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step() for _ in range(args.warmup)]
    times, cpu_times, peaks, baselines, loads = [], [], [], [], []
    for _ in range(args.steps):
        _trim()
        baseline = _status_kib("VmRSS")
        _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        peaks.append(_status_kib("VmHWM") - baseline)
        baselines.append(baseline)
        loads.append(os.getloadavg()[0])
    return {
        "variant": args.variant,
        "losses": losses,
        "step_times_s": times,
        "step_time_median_s": statistics.median(times),
        "step_cpu_times_s": cpu_times,
        "step_cpu_time_median_s": statistics.median(cpu_times),
        "load_average_1min_after_steps": loads,
        "peak_above_baseline_bytes": [p * 1024 for p in peaks],
        "peak_above_baseline_max_bytes": max(peaks) * 1024,
        "baseline_rss_bytes": [b * 1024 for b in baselines],
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "num_threads": torch.get_num_threads(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _loads(variant: dict) -> str:
    return ", ".join(f"{x:.1f}" for x in variant["load_average_1min_after_steps"])


def render(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    un, pa = result["variants"]["unpatched"], result["variants"]["patched"]
    r = result["ratios"]
    n_tokens = cfg["batch"] * cfg["seq"]
    lines = [
        "One training step (forward with labels + backward + AdamW step), random LlamaForCausalLM, fp32, CPU",
        f"D = {cfg['hidden']}, {cfg['layers']} layers, V = {cfg['vocab']}, batch {cfg['batch']} x {cfg['seq']} tokens "
        f"(N = {n_tokens}; the fp32 logits alone are {_gib(4 * n_tokens * cfg['vocab'])}), "
        f"{un['num_parameters'] / 1e6:.1f} M parameters",
        f"CPU: {env['cpu_model']}, {un['num_threads']} threads; torch {un['torch_version']}, "
        f"transformers {un['transformers_version']}; {cfg['warmup']} warm-up + {cfg['steps']} timed steps each, "
        f"{un.get('rounds', 1)} interleaved round(s) (unpatched, patched, ...)",
        "",
        f"{'':28}{'unpatched':>14}{'patched':>14}{'patched/unpatched':>20}",
        f"{'peak above baseline':28}{_gib(un['peak_above_baseline_max_bytes']):>14}"
        f"{_gib(pa['peak_above_baseline_max_bytes']):>14}{r['peak_above_baseline']:>20.3f}",
        f"{'process peak RSS':28}{_gib(un['process_peak_rss_bytes']):>14}"
        f"{_gib(pa['process_peak_rss_bytes']):>14}{r['process_peak_rss']:>20.3f}",
        f"{'step time (median)':28}{un['step_time_median_s']:>13.2f}s{pa['step_time_median_s']:>13.2f}s"
        f"{r['step_time']:>20.3f}",
        f"{'step CPU time (median)':28}{un['step_cpu_time_median_s']:>13.2f}s{pa['step_cpu_time_median_s']:>13.2f}s"
        f"{r['step_cpu_time']:>20.3f}",
        f"{'loss, first step':28}{un['losses'][0]:>14.6f}{pa['losses'][0]:>14.6f}",
        "",
        "peak above baseline: VmHWM during the step minus VmRSS just before it (after malloc_trim; peak counter",
        "reset via /proc/self/clear_refs); each variant in its own subprocess. process peak RSS: ru_maxrss.",
        "step CPU time: time.process_time() of the step (all threads of the process).",
        f"1-min load average after the timed steps: unpatched {_loads(un)}, patched {_loads(pa)} "
        f"({env['logical_cpus']} logical CPUs)",
    ]
    return "\n".join(lines) + "\n"


def _merge_rounds(rounds: list[dict]) -> dict:
    """One variant's measurements over the interleaved rounds: all timed steps pooled (medians
    over them), the largest peaks."""
    merged = dict(rounds[0])
    for key in ("step_times_s", "step_cpu_times_s", "load_average_1min_after_steps", "peak_above_baseline_bytes"):
        merged[key] = [x for r in rounds for x in r[key]]
    merged["step_time_median_s"] = statistics.median(merged["step_times_s"])
    merged["step_cpu_time_median_s"] = statistics.median(merged["step_cpu_times_s"])
    merged["peak_above_baseline_max_bytes"] = max(merged["peak_above_baseline_bytes"])
    merged["process_peak_rss_bytes"] = max(r["process_peak_rss_bytes"] for r in rounds)
    merged["rounds"] = len(rounds)
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--rounds", type=int, default=1, help="run the variants alternately this many times (interleaved; merged)"
    )
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (V = 1000, D = 32, 2 x 64 tokens)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--txt", type=Path, help="write the table here")
    p.add_argument("--json", type=Path, help="write the measurements here")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.hidden, args.intermediate, args.seq, args.batch = 1000, 32, 64, 64, 2
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        print("train_step.py: needs Linux (/proc/self/clear_refs, VmHWM)", file=sys.stderr)
        return 2

    config = {
        k: getattr(args, k)
        for k in ("vocab", "hidden", "intermediate", "heads", "layers", "batch", "seq", "warmup", "steps", "threads")
    }
    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            p.error(f"--variants: unknown variant {name!r}")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):  # interleaved: u, p, u, p, ... so both see the same load over time
        for name in names:
            cmd = [sys.executable, __file__, *(f"--{k}={v}" for k, v in config.items()), "--variant", name]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    variants = {name: _merge_rounds(r) for name, r in runs.items()}
    from logitkit.bench.environment import cpu_model  # (after the variants: imports torch)

    result = {
        "config": config,
        "environment": {
            "cpu_model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "memory_method": "per-variant subprocess; VmHWM - VmRSS(before step) after malloc_trim(0) and "
            "clear_refs=5; ru_maxrss",
        },
        "variants": variants,
    }
    if set(variants) == set(VARIANTS):
        un, pa = variants["unpatched"], variants["patched"]
        result["ratios"] = {
            "peak_above_baseline": pa["peak_above_baseline_max_bytes"] / un["peak_above_baseline_max_bytes"],
            "process_peak_rss": pa["process_peak_rss_bytes"] / un["process_peak_rss_bytes"],
            "step_time": pa["step_time_median_s"] / un["step_time_median_s"],
            "step_cpu_time": pa["step_cpu_time_median_s"] / un["step_cpu_time_median_s"],
        }
        text = render(result)
        print(text, end="")
        if args.txt:
            args.txt.write_text(text)
    else:
        print(json.dumps(variants, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
