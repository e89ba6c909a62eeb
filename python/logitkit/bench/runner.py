"""The run: :class:`Config`, the input pools, and for every case and
implementation the correctness guard, the memory probe and the timing."""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import environment
from .harness import MemoryProbe, compare, measure, measure_copy_bandwidth, to_fp64
from .registry import CASES, DTYPES, LINEAR_CE_HIDDEN, Case, CaseParams, bytes_moved, dtype_name
from .report import Progress, Result


@dataclass
class Config:
    """Everything the run needs; built from the command line by :func:`logitkit.bench.cli.parse_args`."""

    ops: list[str]
    dtypes: list[str]
    rows: list[int]
    vocab: list[int]
    device: torch.device
    repeats: int
    warmup: int
    warmup_s: float
    min_sample_s: float
    rotate_bytes: int | None  # None: max(64 MiB, 2 x last-level cache)
    copy_bytes: int | None  # None: max(256 MiB, last-level cache)
    compile: bool = False
    memory: bool = True
    seed: int = 0
    hidden: int = LINEAR_CE_HIDDEN  # D of linear_ce
    mode: str = "default"
    argv: list[str] = field(default_factory=list)

    @property
    def params(self) -> CaseParams:
        """What the cases' input makers and models read."""
        return CaseParams(hidden=self.hidden)

    def as_json(self) -> dict:
        """The ``config`` block of the JSON output."""
        return {
            "mode": self.mode,
            "ops": self.ops,
            "dtypes": self.dtypes,
            "rows": self.rows,
            "vocab": self.vocab,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "compile": self.compile,
            "seed": self.seed,
            "hidden": self.hidden,
            "argv": self.argv,
        }


MIN_ROTATE_BYTES = 64 << 20
MIN_COPY_BYTES = 256 << 20
MIN_BUFFERS, MAX_BUFFERS = 2, 4096


def build_pool(
    case: Case,
    rows: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    target_bytes: int,
    seed: int,
    params: CaseParams,
) -> list[tuple]:
    """Input sets to rotate through: at least ``target_bytes`` in all (2 to 4096 sets)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    first = case.make_inputs(rows, vocab, dtype, device, gen, params)
    size = max(1, sum(a.nbytes for a in first if isinstance(a, torch.Tensor)))
    n = max(MIN_BUFFERS, min(MAX_BUFFERS, math.ceil(target_bytes / size)))
    return [first] + [case.make_inputs(rows, vocab, dtype, device, gen, params) for _ in range(n - 1)]


def implementations(case: Case, compile: bool) -> list[tuple[str, Callable[..., Any]]]:
    """``[(impl name, callable)]``: logitkit, the baselines, and with ``compile`` their compiled
    versions (``compiled`` for the ``eager`` baseline, ``<name>+compile`` for others)."""
    impls = [("logitkit", case.fn), *case.baselines.items()]
    if compile:
        impls += [
            ("compiled" if name == "eager" else f"{name}+compile", _lazy_compile(fn))
            for name, fn in case.baselines.items()
        ]
    return impls + list(case.rooflines.items())


def _lazy_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)`` created on the first call, after resetting dynamo's caches, so each
    case compiles afresh and a long sweep never hits the recompilation limit."""
    compiled = None

    def call(*args: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)

    return call


def _check_probe_and_time(
    res: Result,
    case: Case,
    fn: Callable[..., Any],
    pool: list[tuple],
    dtype: torch.dtype,
    reference: Any,
    cfg: Config,
    probe: MemoryProbe,
) -> None:
    """Fills ``res`` for one implementation: the correctness guard on the first input set, the
    peak memory of one call, and the timing over the pool (exceptions propagate)."""
    out = fn(*pool[0])
    if res.impl in case.rooflines:  # not the op: nothing to check
        pass
    elif case.check is not None:
        res.max_abs_err, res.max_tol_ratio = case.check(out, reference, pool[0])
    else:
        res.max_abs_err, res.max_tol_ratio = compare(out, reference, res.atol, res.rtol)
    res.status = "OK" if res.max_tol_ratio is None or res.max_tol_ratio <= 1.0 else "MISMATCH"
    if cfg.memory:
        res.peak_mem_bytes = probe(fn, pool[0], case.memory_excludes_outputs)
    if case.max_repeats:  # seconds per call: few samples, one warm-up call
        repeats, warmup, warmup_s = min(cfg.repeats, case.max_repeats), 1, 0.0
    else:
        repeats, warmup, warmup_s = cfg.repeats, cfg.warmup, cfg.warmup_s
    timing = measure(
        fn, pool, cfg.device, repeats=repeats, warmup=warmup, warmup_s=warmup_s, min_sample_s=cfg.min_sample_s
    )
    res.median_ms, res.p20_ms, res.p80_ms = (timing.percentile(q) * 1e3 for q in (50, 20, 80))
    res.samples, res.inner = len(timing.samples), timing.inner
    res.gbps = res.bytes_moved / (res.median_ms * 1e-3) / 1e9
    if case.flops_model is not None:
        res.gflops = case.flops_model(res.rows, res.vocab, dtype, cfg.params) / (res.median_ms * 1e-3) / 1e9


def run_case(
    case: Case,
    pool: list[tuple],
    rows: int,
    vocab: int,
    dtype: torch.dtype,
    cfg: Config,
    probe: MemoryProbe,
    progress: Progress,
) -> list[Result]:
    """Checks, probes and times every implementation of ``case`` on one input pool."""
    atol, rtol = case.tolerance[dtype]
    reference = case.reference(*to_fp64(pool[0]))
    common: dict[str, Any] = dict(
        op=case.name,
        dtype=dtype_name(dtype),
        rows=rows,
        vocab=vocab,
        atol=atol,
        rtol=rtol,
        bytes_moved=bytes_moved(case.name, rows, vocab, dtype, cfg.params),
        buffers=len(pool),
        input_bytes=sum(a.nbytes for a in pool[0] if isinstance(a, torch.Tensor)),
    )
    results = []
    for impl, fn in implementations(case, cfg.compile):
        progress.step(f"{case.name} {common['dtype']} {rows}x{vocab} {impl}")
        res = Result(impl=impl, **common)
        try:
            _check_probe_and_time(res, case, fn, pool, dtype, reference, cfg, probe)
        except Exception as exc:  # report and carry on with the other impls
            res.status, res.error = "ERROR", f"{type(exc).__name__}: {exc}".strip()[:500]
        results.append(res)
    base = next((r for r in results if r.impl == next(iter(case.baselines))), None)
    for r in results:
        if base is not None and base.median_ms and r.median_ms:
            r.speedup_vs_eager = base.median_ms / r.median_ms
    return results


def _measure_ceiling(cfg: Config) -> tuple[float, int, int, int | None]:
    """(copy bandwidth in GB/s, copy buffer bytes, rotation target bytes, last-level cache bytes)."""
    llc = environment.llc_bytes(cfg.device)
    rotate = cfg.rotate_bytes if cfg.rotate_bytes is not None else max(MIN_ROTATE_BYTES, 2 * (llc or 0))
    copy_bytes = cfg.copy_bytes if cfg.copy_bytes is not None else max(MIN_COPY_BYTES, llc or 0)
    copy_gbps = measure_copy_bandwidth(cfg.device, copy_bytes, repeats=max(5, cfg.repeats // 2), warmup=2) / 1e9
    return copy_gbps, copy_bytes, rotate, llc


def run_benchmark(cfg: Config, progress: bool = True) -> tuple[dict, list[Result]]:
    """Runs every case of ``cfg``; returns ``(environment, results)`` (results in table order)."""
    if cfg.device.type == "cuda":
        torch.cuda.set_device(cfg.device)
    copy_gbps, copy_bytes, rotate, llc = _measure_ceiling(cfg)
    probe = MemoryProbe(cfg.device)
    memory_method = probe.method if cfg.memory else "disabled (--no-memory)"
    env = environment.collect_environment(cfg.device, copy_gbps, copy_bytes, rotate, llc, memory_method)
    results = _run_cases(cfg, rotate, probe, progress)
    peak = env["datasheet_peak_gbps"]
    for r in results:
        if r.gbps is not None:
            r.pct_copy = 100.0 * r.gbps / copy_gbps
            r.pct_peak = 100.0 * r.gbps / peak if peak else None
    order = {op: i for i, op in enumerate(cfg.ops)}
    results.sort(key=lambda r: (order[r.op], cfg.dtypes.index(r.dtype), r.rows, r.vocab))  # stable: impl order kept
    return env, results


def _run_cases(cfg: Config, rotate: int, probe: MemoryProbe, progress: bool) -> list[Result]:
    """Every (dtype, rows, vocab) shape, every case: the results in run order."""
    cases = [CASES[op] for op in cfg.ops]
    shapes = list(itertools.product(cfg.dtypes, cfg.rows, cfg.vocab))
    bar = Progress(sum(len(implementations(c, cfg.compile)) for c in cases) * len(shapes), enabled=progress)
    results: list[Result] = []
    pools: dict[Any, list[tuple]] = {}  # the inputs of the current shape, shared by ops with the same maker
    try:
        with torch.no_grad():
            for dname, rows, vocab in shapes:
                pools.clear()  # free the previous shape's buffers before building new ones
                gc.collect()
                for case in cases:
                    if case.make_inputs not in pools:
                        pools[case.make_inputs] = build_pool(
                            case, rows, vocab, DTYPES[dname], cfg.device, rotate, cfg.seed, cfg.params
                        )
                    results += run_case(case, pools[case.make_inputs], rows, vocab, DTYPES[dname], cfg, probe, bar)
    finally:
        bar.close()
        pools.clear()
    return results
