"""``logitkit-bench``: microbenchmarks of logitkit's row ops against PyTorch.

Usage (also ``python -m logitkit.bench``)::

    logitkit-bench                          # softmax, log_softmax, entropy; fp32,bf16; 64 x 128256
    logitkit-bench logsumexp --dtype bf16 --rows 1,64 --vocab 32000,128256
    logitkit-bench --quick                  # tiny smoke run (a few seconds)
    logitkit-bench --full --json run.json   # vocab {32000,50257,128256,262144} x rows {1,64}
    logitkit-bench --compile                # also time torch.compile of the eager reference
    logitkit-bench linear_ce --rows 1024 --vocab 128256   # loss fwd+bwd from hidden states (D = --hidden)

For every case (op, dtype, rows, vocab) the run

1. builds a pool of input buffers on the device, large enough (together at
   least twice the last-level cache, and at least 64 MiB) that rotating
   through them keeps small cases from being served from cache;
2. checks every implementation's output against the eager reference evaluated
   in float64 (``|out - ref| <= atol + rtol * |ref|`` with per-dtype
   tolerances); a failure is reported as ``MISMATCH`` and makes the exit
   status 1 (everything is still printed and written);
3. measures the peak memory of one call above its inputs (see below);
4. times the implementation: warm-up, then ``--repeats`` samples, each sample
   averaging enough back-to-back calls to last a minimum time; CUDA samples
   are timed with CUDA events. Median, 20th and 80th percentiles are reported.

Implementations ("impl" column): ``logitkit``; ``eager`` (what a user writes
in plain PyTorch, same dtype as the input); with ``--compile`` also
``compiled`` (``torch.compile`` of the eager reference). Top-H ops compare with
transformers' warper, a per-row loop of the authors' processor and a
sort-and-scan. ``sampling`` (temperature -> top-k -> top-p -> min-p with per-row
parameters and seeds), ``mirostat`` and ``sample_edt`` compare with
transformers' warper chain, a sort-based sampler in the style of vLLM's
native path and straightforward torch code. ``linear_ce`` (rows = tokens N, vocab = V, hidden size
``--hidden`` D, default 1024) times one forward + backward of a summed loss
returning (loss, grad_hidden, grad_weight), against the materialised
``F.cross_entropy(hidden @ weight.T, target)`` (logits in the input dtype), the
same on float32 logits (``materialised-fp32-logits``: ``(hidden @ weight.T).float()``,
as transformers' loss path computes it) and PyTorch's chunked
``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``; its
"mem" column is the peak above the inputs *and* the gradients (the transient
memory), its GFLOP/s column counts the materialised loss's three GEMMs
(6 N D V), and it runs at most 3 timed samples. Its roofline row ``torch.mm x3``
times those three GEMMs alone in the input dtype (not checked: it is not the
loss), so logitkit's GFLOP/s can be read against the GEMM throughput of the same
run; the header names the GEMM path per dtype (``logitkit.gemm_path``).

Roofline: each op has a bytes-moved model (:func:`bytes_moved`): the bytes an
ideal implementation must read and write once. ``GB/s`` is that model divided
by the median time (decimal GB), so it is an *effective* bandwidth: an
implementation that makes extra passes over memory gets a lower figure. The
ceiling is the bandwidth of ``dst.copy_(src)`` on a large buffer measured in
the same run on the same device (read + write bytes), and on CUDA also the
datasheet peak of the GPU when its name is known.

Peak memory ("mem" column, bytes above the inputs: outputs + temporaries):
on CUDA ``torch.cuda.max_memory_allocated()`` minus the allocated bytes just
before the call. On CPU (Linux) the probe runs in this process: it returns
freed heap memory to the OS (``malloc_trim``), resets the kernel's peak-RSS
counter (writing ``5`` to ``/proc/self/clear_refs``), calls the op once and
reads ``VmHWM - VmRSS``. PyTorch's CPU allocator does not cache, so every
byte the op allocates and touches shows up as new resident memory. Where the
probe is unavailable the column reads ``n/a``.

JSON schema (``--json PATH``; ``schema_version`` 1)::

    {
      "schema_version": 1,
      "environment": {
        "device": "cpu" | "cuda",
        "device_name": str,            # GPU name, or the CPU model on CPU
        "cpu_model": str,              # from /proc/cpuinfo
        "num_threads": int,            # torch.get_num_threads()
        "torch_version": str,
        "cuda_version": str | null,    # torch.version.cuda
        "logitkit_version": str,       # logitkit.__version__
        "git_commit": str | null,      # of the logitkit source checkout, if any
        "git_dirty": bool | null,
        "build_info": {...},           # logitkit.build_info()
        "gemm_paths": {"fp32": str, "bf16": str, "fp16": str},  # linear_ce's GEMM route (gemm_path)
        "copy_bandwidth_gbps": float,  # measured dst.copy_(src), read + write
        "copy_buffer_bytes": int,
        "datasheet_peak_gbps": float | null,
        "llc_bytes": int | null,       # last-level cache (CPU L3 / GPU L2)
        "rotation_target_bytes": int,
        "memory_method": str,
        "python_version": str, "platform": str, "timestamp": str (UTC ISO 8601)
      },
      "config": {"mode": "default" | "quick" | "full", "ops": [str], "dtypes": [str],
                 "rows": [int], "vocab": [int], "repeats": int, "warmup": int,
                 "compile": bool, "seed": int, "hidden": int, "argv": [str]},
      "results": [{
        "op": str, "dtype": "fp32" | "bf16" | "fp16", "rows": int, "vocab": int,
        "impl": "logitkit" | "eager" | "compiled" | ...,
        "median_ms": float | null, "p20_ms": float | null, "p80_ms": float | null,
        "gbps": float | null,               # bytes_moved / median
        "gflops": float | null,             # flops model / median (GEMM-bound ops only)
        "pct_copy": float | null,           # gbps / copy_bandwidth_gbps * 100
        "pct_peak": float | null,           # gbps / datasheet_peak_gbps * 100
        "speedup_vs_eager": float | null,   # eager median / this median
        "max_abs_err": float | null,        # vs the float64 reference
        "max_tol_ratio": float | null,      # max |err| / (atol + rtol |ref|); > 1 fails
        "atol": float, "rtol": float,
        "status": "OK" | "MISMATCH" | "ERROR",
        "error": str | null,                # exception text when status is ERROR
        "peak_mem_bytes": int | null,       # above the inputs
        "bytes_moved": int, "input_bytes": int,
        "buffers": int, "samples": int, "inner": int
      }, ...],
      "summary": {"cases": int, "mismatches": int, "errors": int, "exit_code": int}
    }

The CSV (``--csv PATH``) has one line per result with the same fields, plus
the environment repeated in ``env_*`` columns (``env_build_info`` as JSON).

Layout of the package: :mod:`~logitkit.bench.cli` (options, :func:`main`),
:mod:`~logitkit.bench.runner` (the run), :mod:`~logitkit.bench.harness`
(timing, memory probe, output comparison), :mod:`~logitkit.bench.environment`,
:mod:`~logitkit.bench.report` (table, JSON, CSV, plots), and one module per
case family: :mod:`~logitkit.bench.row_ops_cases`,
:mod:`~logitkit.bench.top_h_cases`, :mod:`~logitkit.bench.sampling_cases`,
:mod:`~logitkit.bench.linear_ce_cases`.
References and tolerances come from :mod:`logitkit.testing`.

Adding an op: :func:`register` one more :class:`Case` (inputs maker, logitkit
function, eager baselines, float64 reference, bytes model, tolerances), in
the ``register_cases()`` of its family's module.
"""

from __future__ import annotations

from . import linear_ce_cases, row_ops_cases, sampling_cases, top_h_cases
from .cli import build_parser, main, parse_args
from .environment import datasheet_peak_gbps
from .harness import MemoryProbe, compare, measure
from .registry import CASES, LINEAR_CE_HIDDEN, Case, CaseParams, bytes_moved, dtype_name, register
from .report import Result, plot_paths, print_report, summary, write_csv, write_json, write_plots
from .runner import Config, run_benchmark

# The registration order is the order of the table and of "all".
for _family in (row_ops_cases, top_h_cases, sampling_cases, linear_ce_cases):
    _family.register_cases()

__all__ = [
    "CASES",
    "LINEAR_CE_HIDDEN",
    "Case",
    "CaseParams",
    "Config",
    "MemoryProbe",
    "Result",
    "build_parser",
    "bytes_moved",
    "compare",
    "datasheet_peak_gbps",
    "dtype_name",
    "main",
    "measure",
    "parse_args",
    "plot_paths",
    "print_report",
    "register",
    "run_benchmark",
    "summary",
    "write_csv",
    "write_json",
    "write_plots",
]
