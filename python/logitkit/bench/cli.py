"""The ``logitkit-bench`` command line: presets, options, and :func:`main`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .registry import CASES, LINEAR_CE_HIDDEN, dtype_name
from .report import print_report, summary, write_csv, write_json, write_plots
from .runner import Config, run_benchmark

#: Per-mode defaults (fields of :class:`~logitkit.bench.runner.Config`; ops None: the cases registered
#: as default); explicit --rows/--vocab/--dtype/--repeats/--warmup/--rotate-mib/OPs override them.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(ops=None, dtypes=["fp32", "bf16"], rows=[64], vocab=[128256], repeats=30, warmup=3,
                    warmup_s=0.25, min_sample_s=2e-3, rotate_bytes=None, copy_bytes=None),
    "quick": dict(ops=None, dtypes=["fp32", "bf16"], rows=[4], vocab=[1000], repeats=5, warmup=2,
                  warmup_s=0.02, min_sample_s=2e-4, rotate_bytes=8 << 20, copy_bytes=32 << 20),
    "full": dict(ops="all", dtypes=["fp32", "bf16"], rows=[1, 64], vocab=[32000, 50257, 128256, 262144],
                 repeats=20, warmup=3, warmup_s=0.25, min_sample_s=2e-3, rotate_bytes=None, copy_bytes=None),
}
# fmt: on


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dtype_list(text: str) -> list[str]:
    try:
        return list(dict.fromkeys(dtype_name(v.strip()) for v in text.split(",") if v.strip()))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    default_ops = [c.name for c in CASES.values() if c.default]
    parser = argparse.ArgumentParser(
        prog="logitkit-bench",
        description=(
            "Microbenchmarks of logitkit's row ops against plain PyTorch (and torch.compile), "
            "with a correctness guard, a bandwidth roofline and peak memory. "
            "Exit status 1 if any output MISMATCHes its float64 reference."
        ),
        epilog=(
            "Peak memory is always measured: on CUDA with torch.cuda.max_memory_allocated, on CPU "
            "in-process from Linux's peak-RSS counter (cheap; --no-memory turns it off). "
            "Times are noisy on shared or small machines; compare impls within one run."
        ),
    )
    _add_case_options(parser, default_ops)
    _add_run_options(parser)
    _add_output_options(parser)
    parser.set_defaults(mode="default")
    return parser


def _add_case_options(parser: argparse.ArgumentParser, default_ops: list[str]) -> None:
    """What to run: ops, device, dtypes, shapes, presets."""
    parser.add_argument(
        "ops",
        nargs="*",
        metavar="OP",
        help=f"ops to run: {', '.join(CASES)} or 'all' (default: {', '.join(default_ops)}; --full: all)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", type=_dtype_list, help="comma-separated input dtypes (fp32,bf16,fp16); default fp32,bf16"
    )
    parser.add_argument("--rows", type=_int_list, help="comma-separated row counts (default 64)")
    parser.add_argument("--vocab", type=_int_list, help="comma-separated vocabulary sizes (default 128256)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_const",
        dest="mode",
        const="quick",
        help="tiny smoke run: rows 4, vocab 1000, 5 repeats (a few seconds)",
    )
    mode.add_argument(
        "--full",
        action="store_const",
        dest="mode",
        const="full",
        help="sweep vocab 32000,50257,128256,262144 x rows 1,64 x fp32,bf16, all ops (several minutes on CPU)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """How to measure."""
    parser.add_argument("--repeats", type=int, help="timed samples per impl (default 30; quick 5; full 20)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default at least 3 calls and 0.25 s)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile of the eager reference (adds compile time per case)",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probe")
    parser.add_argument(
        "--rotate-mib", type=int, help="input bytes to rotate over per case (default max(64, 2 x last-level cache) MiB)"
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=LINEAR_CE_HIDDEN,
        help=f"hidden size D of the linear_ce op (default {LINEAR_CE_HIDDEN}; rows = tokens N, vocab = V)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    parser.add_argument(
        "--tp",
        type=int,
        metavar="W",
        help=(
            "linear_ce only: tensor-parallel run on W local gloo processes (logitkit.distributed) against "
            "one process and against all-gathering the logits: time, per-rank memory, bytes (logitkit.bench.tp)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random logits")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where the results go."""
    parser.add_argument("--json", metavar="PATH", help="write all results and the environment as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write all results (+ env_* columns) as CSV")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help=(
            "PNGs of time and GB/s vs vocab: X.png -> X_time.png, X_gbps.png "
            "(a path without .png is a directory); needs matplotlib"
        ),
    )
    parser.add_argument("--plain", action="store_true", help="plain-text table even if rich is installed")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")


def _selected_ops(parser: argparse.ArgumentParser, args: argparse.Namespace, preset: dict[str, Any]) -> list[str]:
    ops = args.ops or ([preset["ops"]] if preset["ops"] else [c.name for c in CASES.values() if c.default])
    if "all" in ops:
        ops = list(CASES)
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; available: {', '.join(CASES)}")
    return list(dict.fromkeys(ops))


def _check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, repeats: int, warmup: int) -> None:
    """Rejects non-positive counts; applies --threads."""
    if repeats < 1 or warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    if args.hidden < 1:
        parser.error("--hidden must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.mode]
    ops = _selected_ops(parser, args, preset)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = args.repeats if args.repeats is not None else preset["repeats"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    _check_counts(parser, args, repeats, warmup)
    chosen = dict(
        ops=ops,
        device=device,
        repeats=repeats,
        warmup=warmup,
        dtypes=args.dtype or preset["dtypes"],
        rows=args.rows or preset["rows"],
        vocab=args.vocab or preset["vocab"],
    )
    if args.rotate_mib is not None:
        chosen["rotate_bytes"] = args.rotate_mib << 20
    cfg = Config(
        **{**preset, **chosen},
        compile=args.compile,
        memory=args.memory,
        seed=args.seed,
        hidden=args.hidden,
        mode=args.mode,
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    return cfg, args


def _run_tp(cfg: Config, args: argparse.Namespace) -> int:
    """``--tp W``: the vocabulary-parallel linear_ce measurement of :mod:`logitkit.bench.tp`."""
    from . import tp

    if cfg.ops != ["linear_ce"] or args.tp < 1 or cfg.device.type != "cpu":
        print("logitkit-bench: --tp W >= 1 runs the linear_ce op alone, on CPU (gloo)", file=sys.stderr)
        return 2
    runs = [(n, v, dt) for dt in cfg.dtypes for n in cfg.rows for v in cfg.vocab]
    for n, v, dt in runs:
        tp_args = argparse.Namespace(
            tp=args.tp, rows=n, hidden=cfg.hidden, vocab=v, dtype=dt, repeats=args.repeats or 3
        )
        print(tp.bench_linear_ce(tp_args), end="\n\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``logitkit-bench``; returns the exit status (1 on any mismatch)."""
    cfg, args = parse_args(argv)
    if args.tp is not None:
        return _run_tp(cfg, args)
    t0 = time.perf_counter()
    env, results = run_benchmark(cfg, progress=args.progress)
    print_report(env, results, plain=args.plain)
    info = summary(results)
    if args.json:
        write_json(args.json, cfg.as_json(), env, results)
    if args.csv:
        write_csv(args.csv, env, results)
    if args.plot:
        paths = write_plots(args.plot, env, results)
        if paths:
            print(f"plots: {', '.join(map(str, paths))}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    verdict = (
        "all outputs match their references"
        if info["exit_code"] == 0
        else f"FAILED: {info['mismatches']} mismatch(es), {info['errors']} error(s)"
    )
    print(f"{info['cases']} case(s) in {elapsed:.1f} s; {verdict}", file=sys.stderr)
    return info["exit_code"]
