"""Measurement and comparison: timing (:func:`measure`), the copy-bandwidth
ceiling, the peak-memory probe (:class:`MemoryProbe`) and the output
comparison of the correctness guard (:func:`compare`)."""

from __future__ import annotations

import ctypes
import gc
import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..testing import error_and_ratio


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


def measure(
    fn: Callable[..., Any],
    arg_sets: Sequence[tuple],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    warmup_s: float,
    min_sample_s: float,
    max_inner: int = 1000,
) -> Timing:
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
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
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
    timing = measure(
        lambda d, s: d.copy_(s), [(dst, src)], device, repeats=repeats, warmup=warmup, warmup_s=0.0, min_sample_s=0.0
    )
    return 2 * nbytes / timing.percentile(50)


class MemoryProbe:
    """Peak memory of one call above what was allocated before it (see :mod:`logitkit.bench`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc: ctypes.CDLL | None = None
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
        sizes = {}
        for key in ("VmRSS", "VmHWM"):
            found = re.search(key + r":\s+(\d+) kB", text)
            if found is None:
                raise KeyError(key)
            sizes[key] = int(found.group(1)) * 1024
        return sizes

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
            if self._libc is not None:  # freed heap pages would otherwise be reused without new RSS
                self._libc.malloc_trim(0)
            self._reset_peak_rss()
            before = self._rss()["VmRSS"]
            out = fn(*args)
            peak = self._rss()["VmHWM"] - before
        if exclude_outputs:
            peak -= sum(t.nbytes for t in flatten(out))
        del out
        return max(0, int(peak))


def to_fp64(args: tuple) -> tuple:
    """``args`` with the floating tensors cast to float64 (the inputs of a case's reference)."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def flatten(out: Any) -> list[torch.Tensor]:
    """The tensors of an output: a tensor, or nested tuples/lists of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    raise TypeError(f"cannot compare an output of type {type(out).__name__}")


def compare(out: Any, ref: Any, atol: float, rtol: float) -> tuple[float, float]:
    """``(max |out - ref|, max |out - ref| / (atol + rtol |ref|))`` over all output tensors.

    NaN at the same place in both counts as equal; NaN on one side only, or a shape mismatch,
    gives ``inf``. The output passes when the second number is <= 1.
    (:func:`logitkit.testing.error_and_ratio` element-wise.)
    """
    outs, refs = flatten(out), flatten(ref)
    if len(outs) != len(refs):
        return math.inf, math.inf
    max_err = max_ratio = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            return math.inf, math.inf
        if o.numel():
            err, ratio = error_and_ratio(o, r, atol, rtol)
            max_err = max(max_err, float(err.max()))
            max_ratio = max(max_ratio, float(ratio.max()))
    return max_err, max_ratio
