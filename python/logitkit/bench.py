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
sort-and-scan. ``linear_ce`` (rows = tokens N, vocab = V, hidden size
``--hidden`` D, default 1024) times one forward + backward of a summed loss
returning (loss, grad_hidden, grad_weight), against the materialised
``F.cross_entropy(hidden @ weight.T, target)`` and PyTorch's chunked
``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``; its
"mem" column is the peak above the inputs *and* the gradients (the transient
memory), its GFLOP/s column counts the materialised loss's three GEMMs
(6 N D V), and it runs at most 3 timed samples.

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

Adding an op: :func:`register` one more :class:`Case` (inputs maker, logitkit
function, eager baselines, float64 reference, bytes model, tolerances).
"""
from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

import logitkit

# --------------------------------------------------------------------------- #
# dtypes and tolerances
# --------------------------------------------------------------------------- #

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "f32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16",
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Short name (``fp32``/``bf16``/``fp16``) of a torch dtype or of any accepted alias."""
    if isinstance(dtype, str):
        try:
            return _DTYPE_ALIASES[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return DTYPES[dtype_name(dtype)]


#: ``(atol, rtol)`` per input dtype: an output passes if ``|out - ref| <= atol + rtol * |ref|``
#: element-wise, ``ref`` being the float64 reference. The rtol is relative to the magnitude of
#: each element, so small probabilities are checked as tightly as large log-probabilities.
DEFAULT_TOLERANCE: Mapping[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 2e-2),
    torch.float16: (1e-5, 2e-2),
}

# --------------------------------------------------------------------------- #
# case registry
# --------------------------------------------------------------------------- #

#: Makes one set of positional inputs: ``make_inputs(rows, vocab, dtype, device, generator)``.
InputMaker = Callable[[int, int, torch.dtype, torch.device, torch.Generator], tuple]
#: ``bytes_model(rows, vocab, dtype) -> int``.
BytesModel = Callable[[int, int, torch.dtype], int]


@dataclass(frozen=True)
class Case:
    """One benchmarked op.

    Attributes:
        name: the op name on the command line.
        make_inputs: builds one tuple of positional inputs for a (rows, vocab, dtype) case.
        fn: the logitkit implementation, called as ``fn(*inputs)``.
        baselines: name -> callable with the same signature; the plain-PyTorch code a user would
            write. The first entry is the one speed-ups are computed against (by convention
            ``"eager"``); each baseline is also compiled with ``--compile``.
        reference: ground truth, called with the inputs whose floating tensors are cast to
            float64 (usually the eager formula in float64).
        bytes_model: the bytes an ideal implementation reads + writes, ``(rows, vocab, dtype)``.
        tolerance: ``(atol, rtol)`` per input dtype for the correctness guard.
        default: whether the op runs when no op is named on the command line.
        check: replaces :func:`compare` in the correctness guard when the outputs are not numbers
            to compare within tolerances (kept sets, sampled tokens): called as
            ``check(output, reference, inputs)``, returns ``(max error, error ratio)`` like
            :func:`compare` (the output passes when the ratio is <= 1).
        flops_model: ``(rows, vocab, dtype) -> flops`` of the op's essential arithmetic, for ops
            whose cost is compute (GEMMs) rather than memory traffic; gives the GFLOP/s column.
        memory_excludes_outputs: the "mem" column counts bytes above the inputs *and outputs*
            (for ops whose outputs are gradients: the transient memory users compare).
        max_repeats: cap on the timed samples, with a single warm-up call (ops that take seconds
            per call).
    """

    name: str
    make_inputs: InputMaker
    fn: Callable[..., Any]
    baselines: Mapping[str, Callable[..., Any]]
    reference: Callable[..., Any]
    bytes_model: BytesModel
    tolerance: Mapping[torch.dtype, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    default: bool = True
    check: Callable[[Any, Any, tuple], tuple[float, float]] | None = None
    flops_model: BytesModel | None = None
    memory_excludes_outputs: bool = False
    max_repeats: int | None = None


#: All registered cases, by name, in registration order.
CASES: dict[str, Case] = {}


def register(case: Case, *, replace: bool = False) -> Case:
    """Adds ``case`` to :data:`CASES` (``replace=True`` to overwrite an existing name)."""
    if not case.baselines:
        raise ValueError(f"case {case.name!r} needs at least one baseline")
    if case.name in CASES and not replace:
        raise ValueError(f"case {case.name!r} is already registered")
    CASES[case.name] = case
    return case


def bytes_moved(op: str, rows: int, vocab: int, dtype: torch.dtype | str) -> int:
    """Bytes an ideal implementation of ``op`` moves for ``rows`` x ``vocab`` logits of ``dtype``."""
    return int(CASES[op].bytes_model(rows, vocab, _as_dtype(dtype)))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def row_to_row_bytes(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes model of a (N, V) -> (N, V) op: read N*V and write N*V elements of ``dtype``."""
    return 2 * rows * vocab * _itemsize(dtype)


def row_reduction_bytes(rows: int, vocab: int, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> int:
    """Bytes model of a (N, V) -> (N,) op: read N*V elements of ``dtype``, write N of ``out_dtype``
    (the input dtype when None)."""
    return rows * vocab * _itemsize(dtype) + rows * _itemsize(out_dtype or dtype)


#: Standard deviation of the benchmark logits (LM logits are typically a few units wide).
LOGIT_SCALE = 3.0


def make_logits(rows: int, vocab: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> tuple:
    """One (rows, vocab) tensor of Gaussian logits (std :data:`LOGIT_SCALE`) in ``dtype``."""
    x = torch.randn(rows, vocab, device=device, generator=gen)
    return ((x * LOGIT_SCALE).to(dtype),)


def _eager_entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy as usually written in PyTorch (float32 math, two full-size temporaries)."""
    return -(torch.softmax(x.float(), -1) * torch.log_softmax(x.float(), -1)).sum(-1)


def _reference_entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy in the input's precision (float64 for the correctness reference)."""
    return -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)


def _register_builtin_cases() -> None:
    """The ops available in logitkit today. For the last-dimension ops the reference is the eager
    formula itself, evaluated on float64 inputs."""
    softmax_eager = lambda x: torch.softmax(x, -1)  # noqa: E731
    log_softmax_eager = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    logsumexp_eager = lambda x: torch.logsumexp(x, -1)  # noqa: E731
    entropy_bytes = functools.partial(row_reduction_bytes, out_dtype=torch.float32)  # always float32
    for name, fn, eager, reference, model, default in (
        ("softmax", logitkit.softmax, softmax_eager, softmax_eager, row_to_row_bytes, True),
        ("log_softmax", logitkit.log_softmax, log_softmax_eager, log_softmax_eager, row_to_row_bytes, True),
        ("entropy", logitkit.entropy, _eager_entropy, _reference_entropy, entropy_bytes, True),
        ("logsumexp", logitkit.logsumexp, logsumexp_eager, logsumexp_eager, row_reduction_bytes, False),
    ):
        register(Case(name, make_logits, fn, {"eager": eager}, reference, model, default=default))


_register_builtin_cases()


# --------------------------------------------------------------------------- #
# Top-H truncation and sampling (shared/notes/top-h.md)
# --------------------------------------------------------------------------- #

#: The Top-H benchmark setting: alpha and temperature of the issue's target shape.
TOP_H_ALPHA = 0.4
TOP_H_TEMPERATURE = 1.5
TOP_H_CAP = 100


def _transformers_top_h_warper() -> Callable[..., Any] | None:
    """transformers' ``TopHLogitsWarper`` class, or None when transformers (>= 5) is missing."""
    try:
        from transformers.generation.logits_process import TopHLogitsWarper
    except Exception:  # noqa: BLE001 - not installed, or too old to have it
        return None
    return TopHLogitsWarper


def _h(p: torch.Tensor) -> torch.Tensor:
    """-p log p with h(0) = 0."""
    return torch.where(p > 0, -p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))


def top_h_keep_reference(x: torch.Tensor, alpha: float, temperature: float, rule: str) -> torch.Tensor:
    """The note's definition of a rule, by sorting and scanning (float64 when ``x`` is): the boolean
    keep mask. Ties: stable sort (lower index first); token 0 of the order always kept; zero
    probabilities never kept otherwise."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    z = torch.gather(x, -1, order) / temperature
    if rule == "exact":
        p = torch.softmax(z, -1)
        h = _h(p)
        mass = torch.cumsum(p, -1)
        crit = torch.cumsum(h, -1) / mass + torch.log(mass)  # H(q_k) = sum h / M + log M
        tau = torch.full_like(mass[..., :1], math.inf) if alpha >= 1 else alpha * h.sum(-1, keepdim=True)
    else:
        k = min(TOP_H_CAP, x.shape[-1])
        order, z = order[..., :k], z[..., :k]
        if rule == "hf":
            p = torch.softmax(z, -1)
        else:
            p = torch.exp(z - torch.logsumexp(x / temperature, -1, keepdim=True))
        h = _h(p)
        crit, tau = torch.cumsum(h, -1), alpha * h.sum(-1, keepdim=True)
    ok = (crit <= tau) & (p > 0)
    ok[..., 0] = True
    prefix = torch.cumprod(ok.to(torch.int64), -1).bool()  # the kept tokens are a prefix
    keep = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return keep.scatter(-1, order, prefix)


def official_top_h_loop(x: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The authors' reference processor as its code runs it (note, rule "official"): one row at a
    time, p = softmax(z) over the full vocabulary, the K = 100 most probable tokens, then a Python
    loop over them accumulating -p log p with a host read per token, stopping at the first token
    whose addition exceeds alpha * (the same sum over all K). Returns the logits with -inf outside
    the kept set. Written without the defects the note lists (any batch size, alpha = 1, p = 0,
    V < 100)."""
    out = torch.full_like(x, -math.inf)
    for r in range(x.shape[0]):
        p = torch.softmax(x[r].float() / temperature, -1)
        top_p, top_i = torch.topk(p, min(TOP_H_CAP, x.shape[-1]))
        h = _h(top_p)
        tau = alpha * float(h.sum())
        kept, c = 1, float(h[0])
        while kept < top_p.numel() and float(top_p[kept]) > 0 and c + float(h[kept]) <= tau:
            c += float(h[kept])
            kept += 1
        out[r, top_i[:kept]] = x[r, top_i[:kept]]
    return out


def _top_h_keep_check(alpha: float) -> Callable[[Any, Any, tuple], tuple[float, float]]:
    """Guard of a Top-H mask case: the output's kept set (finite entries) against the reference's
    mask, row by row. At alpha = 1 the capped rules' last comparison is an equality, so a float32
    implementation may keep one token fewer (note): one differing token per row is allowed there,
    none otherwise. Returns (max differing tokens in a row, that / (allowed + 1/2))."""
    allowed = 1 if alpha >= 1 else 0

    def check(out: torch.Tensor, ref_keep: torch.Tensor, inputs: tuple) -> tuple[float, float]:
        keep = out.isfinite()
        if keep.shape != ref_keep.shape:
            return math.inf, math.inf
        if not keep.numel():
            return 0.0, 0.0
        # Tokens kept by one side only, less the pairs of equal logits: low-precision logits (bf16)
        # hold exact ties, and which of two equal logits a baseline keeps is unspecified.
        x = inputs[0].to(keep.device).float()
        ref_keep_d = ref_keep.to(keep.device)
        only_out, only_ref = keep & ~ref_keep_d, ref_keep_d & ~keep
        worst = 0.0
        for r in (only_out | only_ref).any(-1).nonzero().flatten().tolist():
            a = collections.Counter(x[r][only_out[r]].tolist())
            b = collections.Counter(x[r][only_ref[r]].tolist())
            worst = max(worst, float(sum(((a - b) + (b - a)).values())))
        return worst, worst / (allowed + 0.5)

    return check


def _sample_check(out: torch.Tensor, ref_keep: torch.Tensor, inputs: tuple) -> tuple[float, float]:
    """Guard of a sampling case: every drawn token lies in its row's kept set (up to ties of equal
    logits). Returns (number of
    rows whose token was dropped or out of range, the same as the ratio)."""
    rows = ref_keep.shape[0]
    if out.shape != (rows,):
        return math.inf, math.inf
    tokens = out.to(ref_keep.device)
    valid = (tokens >= 0) & (tokens < ref_keep.shape[-1])
    # Tie-aware, as in the mask check: the kept set is a prefix by value, so a token is inside it
    # when its logit is at least the smallest kept logit of its row.
    x = inputs[0].to(ref_keep.device).float()
    smallest_kept = torch.where(ref_keep, x, math.inf).amin(-1)
    rows_index = torch.arange(rows, device=ref_keep.device)
    inside = x[rows_index, tokens.clamp(0, ref_keep.shape[-1] - 1)] >= smallest_kept
    bad = float((~(valid & inside)).sum())
    return bad, bad


def top_h_mask_bytes(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes model of a Top-H mask (``top_h``): read the logits, write the filtered logits."""
    return row_to_row_bytes(rows, vocab, dtype)


def sample_bytes(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes model of sampling: read the logits and one float32 uniform per row, write one int64
    token per row."""
    return rows * vocab * _itemsize(dtype) + rows * (4 + 8)


def _register_top_h_cases() -> None:
    """``top_h`` (rule "hf"), ``top_h_official``, ``top_h_exact`` and ``sample`` (Top-H "hf" sampling)
    at alpha :data:`TOP_H_ALPHA`, temperature :data:`TOP_H_TEMPERATURE`. Baselines: transformers'
    ``TopHLogitsWarper`` applied to logits / T (its place after the temperature warper) when
    transformers is installed, plus softmax + multinomial for sampling; the per-row loop of the
    authors' processor for the "official" rule; a sort-and-scan in plain PyTorch (float32) for
    "exact" and wherever transformers is missing."""
    alpha, T = TOP_H_ALPHA, TOP_H_TEMPERATURE
    Warper = _transformers_top_h_warper()
    no_ids = torch.zeros(1, 1, dtype=torch.long)

    def sort_and_scan(rule: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def eager(x: torch.Tensor) -> torch.Tensor:
            return x.masked_fill(~top_h_keep_reference(x.float(), alpha, T, rule), -math.inf)
        return eager

    # transformers' generate() casts the next-token logits to float32 before its
    # processors run, so the baselines see float32 (as the reference does).
    def transformers_mask(x: torch.Tensor) -> torch.Tensor:
        return Warper(top_h=alpha)(no_ids, x.float() / T)

    def reference(rule: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: top_h_keep_reference(x, alpha, T, rule)

    hf_baselines = {"transformers": transformers_mask} if Warper else {"sort-scan": sort_and_scan("hf")}
    check = _top_h_keep_check(alpha)
    for name, rule, baselines in (
        ("top_h", "hf", hf_baselines),
        ("top_h_official", "official", {"official-loop": lambda x: official_top_h_loop(x.float(), alpha, T)}),
        ("top_h_exact", "exact", {"sort-scan": sort_and_scan("exact")}),
    ):
        fn = functools.partial(logitkit.top_h, alpha=alpha, temperature=T, rule=rule)
        register(Case(name, make_logits, fn, baselines, reference(rule), top_h_mask_bytes, default=False,
                      check=check))

    def sample_logitkit(x: torch.Tensor) -> torch.Tensor:
        return logitkit.sample(x, temperature=T, top_h=alpha)

    def draw(filtered: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(torch.softmax(filtered.float(), -1), 1).squeeze(-1)

    if Warper:
        sample_baselines = {"transformers": lambda x: draw(transformers_mask(x))}
    else:
        sample_baselines = {"sort-scan": lambda x: draw(sort_and_scan("hf")(x) / T)}
    register(Case("sample", make_logits, sample_logitkit, sample_baselines, reference("hf"), sample_bytes,
                  default=False, check=_sample_check))


_register_top_h_cases()

# --------------------------------------------------------------------------- #
# linear cross-entropy, forward + backward
# --------------------------------------------------------------------------- #

#: Hidden size D of the ``linear_ce`` case (``--hidden``); rows = tokens N, vocab = V.
LINEAR_CE_HIDDEN = 1024


def make_linear_ce_inputs(rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                          gen: torch.Generator) -> tuple:
    """hidden (N, D) ~ N(0, 1), weight (V, D) ~ N(0, (LOGIT_SCALE^2 / D)) so that the logits have
    std :data:`LOGIT_SCALE`, both in ``dtype``; target (N,) uniform in [0, V)."""
    d = LINEAR_CE_HIDDEN
    hidden = torch.randn(rows, d, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, d, device=device, generator=gen) * (LOGIT_SCALE / math.sqrt(d))).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    return hidden, weight, target


def forward_backward(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., tuple]:
    """``(hidden, weight, target) -> (loss, grad_hidden, grad_weight)`` of a summed loss: one
    forward and one backward, as a training step runs them."""
    def step(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple:
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            loss = loss_fn(h, w, target)
            loss.backward()
        return loss.detach(), h.grad, w.grad
    return step


def linear_ce_bytes(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes model of linear cross-entropy forward + backward: read hidden, weight and target once,
    write grad_hidden and grad_weight once (no N x V traffic at all)."""
    d, item = LINEAR_CE_HIDDEN, _itemsize(dtype)
    return 2 * (rows + vocab) * d * item + rows * 8


def linear_ce_flops(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """FLOP model: the three GEMMs of the materialised loss (logits, grad_hidden, grad_weight),
    2 N D V each. (logitkit recomputes the logits in the backward: 8 N D V in all.)"""
    return 6 * rows * vocab * LINEAR_CE_HIDDEN


def _register_linear_ce_case() -> None:
    """``linear_ce``: loss (reduction "sum", so gradients are O(1) for the guard) and its gradients
    for hidden and weight. Baselines: the materialised ``F.cross_entropy(hidden @ weight.T,
    target)`` in the input dtype, and PyTorch's chunked ``F.linear_cross_entropy`` with its
    default ``LinearCrossEntropyOptions()`` when this torch has it."""
    import torch.nn.functional as F

    materialised = forward_backward(lambda h, w, t: F.cross_entropy(h @ w.T, t, reduction="sum"))
    baselines = {"materialised": materialised}
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is not None and hasattr(F, "linear_cross_entropy"):
        baselines["torch-chunked"] = forward_backward(
            lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="sum", options=options()))
    # The reference is the materialised loss on float64 inputs.
    # Outputs: the loss (~ N log V), grad_hidden and grad_weight (O(1) elements). bf16/fp16: the
    # materialised baseline rounds its logits to the input dtype, so its gradients are off by a
    # few percent of their scale; the atol covers that, the rtol the outputs' own rounding.
    tolerance = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 2e-2), torch.float16: (1e-2, 2e-2)}
    register(Case("linear_ce", make_linear_ce_inputs,
                  forward_backward(lambda h, w, t: logitkit.linear_cross_entropy(h, w, t, reduction="sum")),
                  baselines, materialised, linear_ce_bytes, tolerance=tolerance, default=False,
                  flops_model=linear_ce_flops, memory_excludes_outputs=True, max_repeats=3))


_register_linear_ce_case()

# --------------------------------------------------------------------------- #
# environment
# --------------------------------------------------------------------------- #

#: Datasheet HBM bandwidth (GB/s) by GPU name; the first entry whose substrings all occur wins.
DATASHEET_PEAK_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4800.0),
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),  # SXM
    (("A100", "80GB"), 2000.0),
    (("A100",), 1555.0),  # 40GB
)


def datasheet_peak_gbps(device_name: str) -> float | None:
    """Datasheet memory bandwidth of a GPU from its name, or None when unknown."""
    upper = device_name.upper()
    for needles, gbps in DATASHEET_PEAK_GBPS:
        if all(n in upper for n in needles):
            return gbps
    return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def llc_bytes(device: torch.device) -> int | None:
    """Size of the last-level cache: the GPU's L2, or the CPU's largest cache level from sysfs."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    best = None
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if m:
            size = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
            best = max(best or 0, size)
    return best


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding logitkit's sources, or ``(None, None)``.

    Only counts when the package's own ``__init__.py`` is tracked there, so that an installed
    copy inside some unrelated repository does not report that repository's commit.
    """
    pkg_dir = Path(logitkit.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=pkg_dir, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()

# --------------------------------------------------------------------------- #
# measurement
# --------------------------------------------------------------------------- #


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-call seconds of the timed samples and how they were taken."""

    samples: list[float]
    inner: int  # calls averaged in each sample

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples, q))


def measure(fn: Callable[..., Any], arg_sets: Sequence[tuple], device: torch.device, *,
            repeats: int, warmup: int, warmup_s: float, min_sample_s: float, max_inner: int = 1000) -> Timing:
    """Times ``fn`` rotating over ``arg_sets``.

    Warm-up: one call (lazy initialisation, compilation), then individually timed calls until at
    least ``warmup`` calls *and* ``warmup_s`` seconds have passed (small virtual machines need a
    while of steady work before their timings settle). The median of the last ``warmup`` of them
    calibrates ``inner``, the number of back-to-back calls per sample, so that a sample lasts at
    least ``min_sample_s``; each of the ``repeats`` samples is the mean per-call time of its
    ``inner`` calls. On CUDA samples are measured with CUDA events, read after one final
    synchronisation.
    """
    calls = itertools.cycle(arg_sets)

    def run(n: int) -> None:
        for _ in range(n):
            fn(*next(calls))

    run(1)
    _sync(device)
    warm: list[float] = []
    deadline = time.perf_counter() + warmup_s
    while len(warm) < warmup or (time.perf_counter() < deadline and len(warm) < 100_000):
        t0 = time.perf_counter()
        run(1)
        _sync(device)
        warm.append(time.perf_counter() - t0)
    per_call = max(float(np.median(warm[-warmup:])), 1e-9)
    inner = max(1, min(max_inner, math.ceil(min_sample_s / per_call)))

    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            run(inner)
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 / inner for start, end in events]
    else:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(inner)
            samples.append((time.perf_counter() - t0) / inner)
    return Timing(samples, inner)


def measure_copy_bandwidth(device: torch.device, nbytes: int, *, repeats: int, warmup: int) -> float:
    """Bandwidth (bytes/s) of ``dst.copy_(src)`` on ``nbytes`` buffers, counting read + write."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda d, s: d.copy_(s), [(dst, src)], device,
                     repeats=repeats, warmup=warmup, warmup_s=0.0, min_sample_s=0.0)
    return 2 * nbytes / timing.percentile(50)


class MemoryProbe:
    """Peak memory of one call above what was allocated before it (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated() - memory_allocated() before the call"
            self.available = True
            return
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._reset_peak_rss()
            self._rss()
            self.available = True
            self.method = "Linux peak RSS (VmHWM) after malloc_trim and /proc/self/clear_refs reset"
        except (OSError, AttributeError, KeyError):
            self.available = False
            self.method = "unavailable (needs Linux/glibc and a writable /proc/self/clear_refs)"

    @staticmethod
    def _reset_peak_rss() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _rss() -> dict[str, int]:
        text = Path("/proc/self/status").read_text()
        return {key: int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}

    def __call__(self, fn: Callable[..., Any], args: tuple, exclude_outputs: bool = False) -> int | None:
        """Peak bytes of ``fn(*args)`` above what existed before it (minus the bytes of the tensors
        it returns with ``exclude_outputs``)."""
        if not self.available:
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            out = fn(*args)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - before
        else:
            self._libc.malloc_trim(0)  # freed heap pages would otherwise be reused without new RSS
            self._reset_peak_rss()
            before = self._rss()["VmRSS"]
            out = fn(*args)
            peak = self._rss()["VmHWM"] - before
        if exclude_outputs:
            peak -= sum(t.nbytes for t in _flatten(out))
        del out
        return max(0, int(peak))

# --------------------------------------------------------------------------- #
# correctness
# --------------------------------------------------------------------------- #


def _to_fp64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    raise TypeError(f"cannot compare an output of type {type(out).__name__}")


def compare(out: Any, ref: Any, atol: float, rtol: float) -> tuple[float, float]:
    """``(max |out - ref|, max |out - ref| / (atol + rtol |ref|))`` over all output tensors.

    NaN at the same place in both counts as equal; NaN on one side only, or a shape mismatch,
    gives ``inf``. The output passes when the second number is <= 1.
    """
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        return math.inf, math.inf
    max_err = max_ratio = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            return math.inf, math.inf
        o, r = o.double(), r.double()
        both_nan = o.isnan() & r.isnan()
        err = torch.where(both_nan, torch.zeros_like(o), (o - r).abs()).nan_to_num(nan=math.inf)
        both_same_inf = (o == r) & r.isinf()
        err = torch.where(both_same_inf, torch.zeros_like(err), err)
        bound = atol + rtol * r.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)  # no 0/0 when atol = 0
        if err.numel():
            max_err = max(max_err, float(err.max()))
            max_ratio = max(max_ratio, float(ratio.max()))
    return max_err, max_ratio

# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #


@dataclass
class Result:
    """One row of the results: one implementation on one case. Fields are the JSON fields."""

    op: str
    dtype: str
    rows: int
    vocab: int
    impl: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    gflops: float | None = None
    pct_copy: float | None = None
    pct_peak: float | None = None
    speedup_vs_eager: float | None = None
    max_abs_err: float | None = None
    max_tol_ratio: float | None = None
    atol: float = 0.0
    rtol: float = 0.0
    status: str = "OK"
    error: str | None = None
    peak_mem_bytes: int | None = None
    bytes_moved: int = 0
    input_bytes: int = 0
    buffers: int = 0
    samples: int = 0
    inner: int = 0


@dataclass
class Config:
    """Everything the run needs; built from the command line by :func:`parse_args`."""

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


MIN_ROTATE_BYTES = 64 << 20
MIN_COPY_BYTES = 256 << 20
MIN_BUFFERS, MAX_BUFFERS = 2, 4096


def build_pool(case: Case, rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
               target_bytes: int, seed: int) -> list[tuple]:
    """Input sets to rotate through: at least ``target_bytes`` in all (2 to 4096 sets)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    first = case.make_inputs(rows, vocab, dtype, device, gen)
    size = max(1, sum(a.nbytes for a in first if isinstance(a, torch.Tensor)))
    n = max(MIN_BUFFERS, min(MAX_BUFFERS, math.ceil(target_bytes / size)))
    return [first] + [case.make_inputs(rows, vocab, dtype, device, gen) for _ in range(n - 1)]


def implementations(case: Case, compile: bool) -> list[tuple[str, Callable[..., Any]]]:
    """``[(impl name, callable)]``: logitkit, the baselines, and with ``compile`` their compiled
    versions (``compiled`` for the ``eager`` baseline, ``<name>+compile`` for others)."""
    impls = [("logitkit", case.fn), *case.baselines.items()]
    if compile:
        impls += [("compiled" if name == "eager" else f"{name}+compile", _lazy_compile(fn))
                  for name, fn in case.baselines.items()]
    return impls


def _lazy_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)`` created on the first call, after resetting dynamo's caches, so each
    case compiles afresh and a long sweep never hits the recompilation limit."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)

    return call


class _Progress:
    """rich progress bar on stderr when rich is importable, else one stderr line per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled and _rich() is not None and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._bar = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True, console=_console(sys.stderr))
            self._task = self._bar.add_task("", total=total)
            self._bar.start()

    def step(self, description: str) -> None:
        """Announces the step about to run."""
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=description)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {description}", file=sys.stderr, flush=True)
        self.done += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            self._bar.stop()


def run_case(case: Case, pool: list[tuple], rows: int, vocab: int, dtype: torch.dtype, cfg: Config,
             probe: MemoryProbe, progress: _Progress) -> list[Result]:
    """Checks, probes and times every implementation of ``case`` on one input pool."""
    atol, rtol = case.tolerance[dtype]
    reference = case.reference(*_to_fp64(pool[0]))
    common = dict(op=case.name, dtype=dtype_name(dtype), rows=rows, vocab=vocab, atol=atol, rtol=rtol,
                  bytes_moved=bytes_moved(case.name, rows, vocab, dtype), buffers=len(pool),
                  input_bytes=sum(a.nbytes for a in pool[0] if isinstance(a, torch.Tensor)))
    results = []
    for impl, fn in implementations(case, cfg.compile):
        progress.step(f"{case.name} {common['dtype']} {rows}x{vocab} {impl}")
        res = Result(impl=impl, **common)
        try:
            out = fn(*pool[0])
            if case.check is not None:
                res.max_abs_err, res.max_tol_ratio = case.check(out, reference, pool[0])
            else:
                res.max_abs_err, res.max_tol_ratio = compare(out, reference, atol, rtol)
            res.status = "OK" if res.max_tol_ratio <= 1.0 else "MISMATCH"
            if cfg.memory:
                res.peak_mem_bytes = probe(fn, pool[0], case.memory_excludes_outputs)
            if case.max_repeats:  # seconds per call: few samples, one warm-up call
                repeats, warmup, warmup_s = min(cfg.repeats, case.max_repeats), 1, 0.0
            else:
                repeats, warmup, warmup_s = cfg.repeats, cfg.warmup, cfg.warmup_s
            timing = measure(fn, pool, cfg.device, repeats=repeats, warmup=warmup, warmup_s=warmup_s,
                             min_sample_s=cfg.min_sample_s)
        except Exception as exc:  # noqa: BLE001 - report and carry on with the other impls
            res.status, res.error = "ERROR", f"{type(exc).__name__}: {exc}".strip()[:500]
        else:
            res.median_ms, res.p20_ms, res.p80_ms = (timing.percentile(q) * 1e3 for q in (50, 20, 80))
            res.samples, res.inner = len(timing.samples), timing.inner
            res.gbps = res.bytes_moved / (res.median_ms * 1e-3) / 1e9
            if case.flops_model is not None:
                res.gflops = case.flops_model(rows, vocab, dtype) / (res.median_ms * 1e-3) / 1e9
        results.append(res)
    base = next((r for r in results if r.impl == next(iter(case.baselines))), None)
    for r in results:
        if base is not None and base.median_ms and r.median_ms:
            r.speedup_vs_eager = base.median_ms / r.median_ms
    return results


def collect_environment(cfg: Config, copy_gbps: float, copy_bytes: int, rotate_bytes: int,
                        llc: int | None, probe: MemoryProbe) -> dict:
    """The ``environment`` block of the JSON output."""
    commit, dirty = git_state()
    name = device_name(cfg.device)
    return {
        "device": cfg.device.type,
        "device_name": name,
        "cpu_model": cpu_model(),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "logitkit_version": logitkit.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "build_info": logitkit.build_info(),
        "copy_bandwidth_gbps": copy_gbps,
        "copy_buffer_bytes": copy_bytes,
        "datasheet_peak_gbps": datasheet_peak_gbps(name) if cfg.device.type == "cuda" else None,
        "llc_bytes": llc,
        "rotation_target_bytes": rotate_bytes,
        "memory_method": probe.method if cfg.memory else "disabled (--no-memory)",
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_benchmark(cfg: Config, progress: bool = True) -> tuple[dict, list[Result]]:
    """Runs every case of ``cfg``; returns ``(environment, results)`` (results in table order)."""
    global LINEAR_CE_HIDDEN
    LINEAR_CE_HIDDEN = cfg.hidden  # read by the linear_ce input maker and models
    if cfg.device.type == "cuda":
        torch.cuda.set_device(cfg.device)
    llc = llc_bytes(cfg.device)
    rotate = cfg.rotate_bytes if cfg.rotate_bytes is not None else max(MIN_ROTATE_BYTES, 2 * (llc or 0))
    copy_bytes = cfg.copy_bytes if cfg.copy_bytes is not None else max(MIN_COPY_BYTES, llc or 0)
    copy_gbps = measure_copy_bandwidth(cfg.device, copy_bytes, repeats=max(5, cfg.repeats // 2),
                                       warmup=2) / 1e9
    probe = MemoryProbe(cfg.device)
    env = collect_environment(cfg, copy_gbps, copy_bytes, rotate, llc, probe)

    cases = [CASES[op] for op in cfg.ops]
    n_steps = sum(len(implementations(c, cfg.compile)) for c in cases) * len(cfg.dtypes) * len(cfg.rows) * len(cfg.vocab)
    bar = _Progress(n_steps, enabled=progress)
    results: list[Result] = []
    pools: dict[Any, list[tuple]] = {}  # the inputs of the current shape, shared by ops with the same maker
    try:
        with torch.no_grad():
            for dname, rows, vocab in itertools.product(cfg.dtypes, cfg.rows, cfg.vocab):
                pools.clear()  # free the previous shape's buffers before building new ones
                gc.collect()
                for case in cases:
                    if case.make_inputs not in pools:
                        pools[case.make_inputs] = build_pool(case, rows, vocab, DTYPES[dname], cfg.device,
                                                             rotate, cfg.seed)
                    results += run_case(case, pools[case.make_inputs], rows, vocab, DTYPES[dname], cfg, probe, bar)
    finally:
        bar.close()
        pools.clear()

    peak = env["datasheet_peak_gbps"]
    for r in results:
        if r.gbps is not None:
            r.pct_copy = 100.0 * r.gbps / copy_gbps
            r.pct_peak = 100.0 * r.gbps / peak if peak else None
    order = {op: i for i, op in enumerate(cfg.ops)}
    results.sort(key=lambda r: (order[r.op], cfg.dtypes.index(r.dtype), r.rows, r.vocab))  # stable: impl order kept
    return env, results

# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=None)
def _rich():
    try:
        import rich  # noqa: F401
        return rich
    except ImportError:
        return None


def _console(file):
    """A rich console that does not squeeze the table when the output is not a terminal."""
    from rich.console import Console
    console = Console(file=file)
    return console if console.is_terminal else Console(file=file, width=220)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if value >= 0.1 else f"{value:.4f}"


def _fmt_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _has_flops(results: Iterable[Result]) -> bool:
    return any(r.gflops is not None for r in results)


def table_columns(env: dict, results: Iterable[Result] = ()) -> list[str]:
    cols = ["op", "dtype", "rows", "vocab", "impl", "median ms", "p20", "p80", "GB/s", "% copy"]
    if env.get("datasheet_peak_gbps"):
        cols.append("% peak")
    if _has_flops(results):
        cols.append("GFLOP/s")
    return cols + ["speed-up", "max abs err", "mem", "status"]


def table_rows(env: dict, results: Iterable[Result]) -> list[list[str]]:
    """The table's cells as strings, one list per result, in :func:`table_columns` order."""
    rows = []
    results = list(results)
    flops = _has_flops(results)
    for r in results:
        cells = [r.op, r.dtype, str(r.rows), str(r.vocab), r.impl, _fmt_ms(r.median_ms), _fmt_ms(r.p20_ms),
                 _fmt_ms(r.p80_ms), _fmt(r.gbps, ".1f"), _fmt(r.pct_copy, ".0f", "%")]
        if env.get("datasheet_peak_gbps"):
            cells.append(_fmt(r.pct_peak, ".0f", "%"))
        if flops:
            cells.append(_fmt(r.gflops, ".1f"))
        status = r.status if r.status != "MISMATCH" else "MISMATCH !!"
        cells += [_fmt(r.speedup_vs_eager, ".2f", "x"), _fmt(r.max_abs_err, ".1e"), _fmt_bytes(r.peak_mem_bytes),
                  status]
        rows.append(cells)
    return rows


def environment_summary(env: dict) -> str:
    lines = [
        f"device: {env['device']} ({env['device_name']}), {env['num_threads']} threads, "
        f"torch {env['torch_version']}, CUDA {env['cuda_version']}",
        f"logitkit {env['logitkit_version']} (commit {(env['git_commit'] or 'unknown')[:12]}"
        f"{', dirty' if env['git_dirty'] else ''}), cpu kernels {env['build_info'].get('cpu_capability')}",
        f"ceiling: copy {env['copy_bandwidth_gbps']:.1f} GB/s (dst.copy_(src), {env['copy_buffer_bytes'] >> 20} MiB, "
        f"read+write)" + (f"; datasheet {env['datasheet_peak_gbps']:.0f} GB/s"
                          if env["datasheet_peak_gbps"] else ""),
        f"inputs rotate over >= {env['rotation_target_bytes'] >> 20} MiB; memory: {env['memory_method']}",
    ]
    return "\n".join(lines)


def print_report(env: dict, results: list[Result], plain: bool = False, file=None) -> None:
    """Prints the environment summary, the results table and any mismatch/error details."""
    file = file or sys.stdout
    cols, cells = table_columns(env, results), table_rows(env, results)
    bad = [r for r in results if r.status != "OK"]
    numeric = {c for c in cols if c not in ("op", "dtype", "impl", "status")}
    if _rich() is not None and not plain:
        from rich.table import Table
        console = _console(file)
        console.print(environment_summary(env), highlight=False, markup=False)
        table = Table(show_lines=False, header_style="bold")
        for c in cols:
            table.add_column(c, justify="right" if c in numeric else "left", no_wrap=True)
        keys = [(r.op, r.dtype, r.rows, r.vocab) for r in results]
        for i, (r, row) in enumerate(zip(results, cells)):
            style = {"MISMATCH": "bold white on red", "ERROR": "bold red"}.get(
                r.status, "bold" if r.impl == "logitkit" else "")
            last_of_case = i + 1 < len(keys) and keys[i + 1] != keys[i]
            table.add_row(*row, style=style, end_section=last_of_case)
        console.print(table)
        for r in bad:
            console.print(_problem_line(r), style="bold red", highlight=False, markup=False)
    else:
        print(environment_summary(env), file=file)
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
        just = [str.rjust if c in numeric else str.ljust for c in cols]
        for row in [cols, ["-" * w for w in widths], *cells]:
            print("  ".join(j(v, w) for j, v, w in zip(just, row, widths)).rstrip(), file=file)
        for r in bad:
            print(_problem_line(r), file=file)


def _problem_line(r: Result) -> str:
    what = f"{r.op} {r.dtype} {r.rows}x{r.vocab} [{r.impl}]"
    if r.status == "MISMATCH":
        return (f"MISMATCH: {what}: max abs error {r.max_abs_err:.3g} vs the float64 reference exceeds "
                f"atol {r.atol:g} + rtol {r.rtol:g} * |ref| ({r.max_tol_ratio:.3g}x the tolerance)")
    return f"ERROR: {what}: {r.error}"


def summary(results: list[Result]) -> dict:
    """Counts and the exit status: 1 on any mismatch, or on an error of logitkit itself
    (a baseline that fails, e.g. torch.compile without a C++ compiler, is reported but tolerated)."""
    mismatches = sum(r.status == "MISMATCH" for r in results)
    errors = sum(r.status == "ERROR" for r in results)
    fatal = mismatches or any(r.status == "ERROR" and r.impl == "logitkit" for r in results)
    return {"cases": len({(r.op, r.dtype, r.rows, r.vocab) for r in results}),
            "mismatches": mismatches, "errors": errors, "exit_code": 1 if fatal else 0}


def _config_json(cfg: Config) -> dict:
    return {"mode": cfg.mode, "ops": cfg.ops, "dtypes": cfg.dtypes, "rows": cfg.rows, "vocab": cfg.vocab,
            "repeats": cfg.repeats, "warmup": cfg.warmup, "compile": cfg.compile, "seed": cfg.seed,
            "hidden": cfg.hidden, "argv": cfg.argv}


def write_json(path: str | os.PathLike, cfg: Config, env: dict, results: list[Result]) -> None:
    doc = {"schema_version": 1, "environment": env, "config": _config_json(cfg),
           "results": [dataclasses.asdict(r) for r in results], "summary": summary(results)}
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_csv(path: str | os.PathLike, env: dict, results: list[Result]) -> None:
    env_cols = {f"env_{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in env.items()}
    fields = [f.name for f in dataclasses.fields(Result)] + list(env_cols)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({**dataclasses.asdict(r), **env_cols})


def plot_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``x.png`` -> (``x_time.png``, ``x_gbps.png``, ``x_memory.png``); a path without ``.png`` is
    a directory."""
    p = Path(path)
    kinds = ("time", "gbps", "memory")
    if p.suffix.lower() == ".png":
        return tuple(p.with_name(f"{p.stem}_{k}.png") for k in kinds)
    return tuple(p / f"bench_{k}.png" for k in kinds)


def _plot_memory_vs_rows(target: Path, env: dict, results: list[Result], plt) -> bool:
    """Peak memory against rows (tokens N for linear_ce), one panel per op swept over more than
    one row count, one line per (impl, dtype, vocab). False when no op was swept over rows."""
    ops = [op for op in dict.fromkeys(r.op for r in results)
           if len({r.rows for r in results if r.op == op and r.peak_mem_bytes is not None}) > 1]
    if not ops:
        return False
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        lines: dict[tuple, list[Result]] = {}
        for r in results:
            if r.op == op and r.peak_mem_bytes is not None:
                lines.setdefault((r.impl, r.dtype, r.vocab), []).append(r)
        for (impl, dt, vocab), rs in lines.items():
            rs.sort(key=lambda r: r.rows)
            ax.plot([r.rows for r in rs], [max(r.peak_mem_bytes, 1) / 2**20 for r in rs], marker="o",
                    linestyle="-" if impl == "logitkit" else "--", label=f"{impl} {dt} V={vocab}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("rows (tokens)")
        ax.set_ylabel("peak memory (MiB)" + (" above inputs and outputs" if op == "linear_ce" else " above inputs"))
        ax.legend(fontsize="x-small")
    fig.suptitle(f"logitkit-bench on {env['device_name']}", fontsize="small")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return True


def write_plots(path: str | os.PathLike, env: dict, results: list[Result]) -> list[Path] | None:
    """Two PNGs (median time, effective GB/s) against vocabulary size, one panel per op and one
    line per (impl, dtype, rows); a third (peak memory against rows) when an op was run at more
    than one row count. Returns the paths written, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib, which is not installed: pip install matplotlib "
              "(or pip install 'logitkit[bench]'); no plot written", file=sys.stderr)
        return None
    out = plot_paths(path)
    out[0].parent.mkdir(parents=True, exist_ok=True)
    ops = list(dict.fromkeys(r.op for r in results))
    for target, attr, label in ((out[0], "median_ms", "median time (ms)"), (out[1], "gbps", "effective GB/s")):
        fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
        for ax, op in zip(axes[0], ops):
            lines: dict[tuple, list[Result]] = {}
            for r in results:
                if r.op == op and getattr(r, attr) is not None:
                    lines.setdefault((r.impl, r.dtype, r.rows), []).append(r)
            for (impl, dt, rows), rs in lines.items():
                rs.sort(key=lambda r: r.vocab)
                ax.plot([r.vocab for r in rs], [getattr(r, attr) for r in rs], marker="o",
                        linestyle="-" if impl == "logitkit" else "--", label=f"{impl} {dt} rows={rows}")
            if attr == "gbps":
                ax.axhline(env["copy_bandwidth_gbps"], color="grey", linestyle=":", label="copy bandwidth")
                if env.get("datasheet_peak_gbps"):
                    ax.axhline(env["datasheet_peak_gbps"], color="black", linestyle=":", label="datasheet peak")
            else:
                ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_title(op)
            ax.set_xlabel("vocabulary size")
            ax.set_ylabel(label)
            ax.legend(fontsize="x-small")
        fig.suptitle(f"logitkit-bench on {env['device_name']}", fontsize="small")
        fig.tight_layout()
        fig.savefig(target, dpi=120)
        plt.close(fig)
    return list(out[:2]) + ([out[2]] if _plot_memory_vs_rows(out[2], env, results, plt) else [])

# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #

#: Per-mode defaults; explicit --rows/--vocab/--dtype/--repeats/OPs override them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(ops=None, dtypes=["fp32", "bf16"], rows=[64], vocab=[128256], repeats=30, warmup=3,
                    warmup_s=0.25, min_sample_s=2e-3, rotate_bytes=None, copy_bytes=None),
    "quick": dict(ops=None, dtypes=["fp32", "bf16"], rows=[4], vocab=[1000], repeats=5, warmup=2,
                  warmup_s=0.02, min_sample_s=2e-4, rotate_bytes=8 << 20, copy_bytes=32 << 20),
    "full": dict(ops="all", dtypes=["fp32", "bf16"], rows=[1, 64], vocab=[32000, 50257, 128256, 262144],
                 repeats=20, warmup=3, warmup_s=0.25, min_sample_s=2e-3, rotate_bytes=None, copy_bytes=None),
}


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
        description="Microbenchmarks of logitkit's row ops against plain PyTorch (and torch.compile), "
                    "with a correctness guard, a bandwidth roofline and peak memory. "
                    "Exit status 1 if any output MISMATCHes its float64 reference.",
        epilog="Peak memory is always measured: on CUDA with torch.cuda.max_memory_allocated, on CPU "
               "in-process from Linux's peak-RSS counter (cheap; --no-memory turns it off). "
               "Times are noisy on shared or small machines; compare impls within one run.",
    )
    parser.add_argument("ops", nargs="*", metavar="OP",
                        help=f"ops to run: {', '.join(CASES)} or 'all' (default: {', '.join(default_ops)}; "
                             "--full: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", type=_dtype_list, help="comma-separated input dtypes (fp32,bf16,fp16); "
                                                           "default fp32,bf16")
    parser.add_argument("--rows", type=_int_list, help="comma-separated row counts (default 64)")
    parser.add_argument("--vocab", type=_int_list, help="comma-separated vocabulary sizes (default 128256)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="tiny smoke run: rows 4, vocab 1000, 5 repeats (a few seconds)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="sweep vocab 32000,50257,128256,262144 x rows 1,64 x fp32,bf16, all ops "
                           "(several minutes on CPU)")
    parser.add_argument("--repeats", type=int, help="timed samples per impl (default 30; quick 5; full 20)")
    parser.add_argument("--warmup", type=int,
                        help="untimed calls before timing (default at least 3 calls and 0.25 s)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the eager reference (adds compile time per case)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probe")
    parser.add_argument("--rotate-mib", type=int,
                        help="input bytes to rotate over per case (default max(64, 2 x last-level cache) MiB)")
    parser.add_argument("--hidden", type=int, default=LINEAR_CE_HIDDEN,
                        help=f"hidden size D of the linear_ce op (default {LINEAR_CE_HIDDEN}; rows = tokens N, "
                             "vocab = V)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random logits")
    parser.add_argument("--json", metavar="PATH", help="write all results and the environment as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write all results (+ env_* columns) as CSV")
    parser.add_argument("--plot", metavar="PATH",
                        help="PNGs of time and GB/s vs vocab: X.png -> X_time.png, X_gbps.png "
                             "(a path without .png is a directory); needs matplotlib")
    parser.add_argument("--plain", action="store_true", help="plain-text table even if rich is installed")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    parser.set_defaults(mode="default")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.mode]
    ops = args.ops or ([preset["ops"]] if preset["ops"] else [c.name for c in CASES.values() if c.default])
    if "all" in ops:
        ops = list(CASES)
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; available: {', '.join(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = args.repeats if args.repeats is not None else preset["repeats"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    if repeats < 1 or warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    if args.hidden < 1:
        parser.error("--hidden must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    cfg = Config(
        ops=list(dict.fromkeys(ops)),
        dtypes=args.dtype or preset["dtypes"],
        rows=args.rows or preset["rows"],
        vocab=args.vocab or preset["vocab"],
        device=device,
        repeats=repeats,
        warmup=warmup,
        warmup_s=preset["warmup_s"],
        min_sample_s=preset["min_sample_s"],
        rotate_bytes=(args.rotate_mib << 20) if args.rotate_mib is not None else preset["rotate_bytes"],
        copy_bytes=preset["copy_bytes"],
        compile=args.compile,
        memory=args.memory,
        seed=args.seed,
        hidden=args.hidden,
        mode=args.mode,
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``logitkit-bench``; returns the exit status (1 on any mismatch)."""
    cfg, args = parse_args(argv)
    t0 = time.perf_counter()
    env, results = run_benchmark(cfg, progress=args.progress)
    print_report(env, results, plain=args.plain)
    info = summary(results)
    if args.json:
        write_json(args.json, cfg, env, results)
    if args.csv:
        write_csv(args.csv, env, results)
    if args.plot:
        paths = write_plots(args.plot, env, results)
        if paths:
            print(f"plots: {', '.join(map(str, paths))}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    verdict = ("all outputs match their references" if info["exit_code"] == 0 else
               f"FAILED: {info['mismatches']} mismatch(es), {info['errors']} error(s)")
    print(f"{info['cases']} case(s) in {elapsed:.1f} s; {verdict}", file=sys.stderr)
    return info["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
