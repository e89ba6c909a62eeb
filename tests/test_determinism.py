"""The determinism contract of docs/determinism.md for the row ops: bitwise
equal run to run, whatever the CPU thread count, whatever rows surround a row
(batch-invariant), and on the emulated CUDA kernels whatever the thread
schedule."""

from __future__ import annotations

import pytest
import torch

import logitkit
from conftest import EMULATED_DEFAULTS
from logitkit.testing import references

OPS = [*references.ROW_OPS, "softmax_stats"]
NEG_INF = float("-inf")
# The emulator's thread schedules the schedule-independence tests compare
# (logitkit._C_emulated.configure): the last one runs the block's threads in parallel over the
# process's CPUs, the others take turns on one CPU (the emulator's default).
SCHEDULES = (
    dict(schedule="in_order", seed=0),
    dict(schedule="reversed", seed=0),
    dict(schedule="random", seed=1),
    dict(schedule="random", seed=7, one_cpu=False),
)


def logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4).to(dtype)
    x[0, ::7] = NEG_INF
    return x


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("rows, vocab", [(1, 200_003), (3, 50_257), (64, 1000)])
def test_cpu_thread_count_independent(request, op, dtype, rows, vocab, restore_threads):
    """The row split over threads changes which thread reduces which tiles,
    never the merge tree: 1, 2 and 3 threads give the same bits."""
    fn = getattr(logitkit, op)
    x = logits(rows, vocab, dtype)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(fn(x, 0.9))
    results.append(fn(x, 0.9))  # run to run
    for r in results[1:]:
        assert bitwise_equal(r, results[0]), op


@pytest.mark.parametrize("op", OPS)
def test_cpu_batch_invariant(op, restore_threads):
    """A row's result does not depend on the rows around it: alone (the row
    split over threads) or in a batch (a row per thread)."""
    torch.set_num_threads(2)
    fn = getattr(logitkit, op)
    batch = logits(8, 70_001, torch.float32, seed=1)
    together = fn(batch, 1.1)
    for r in (0, 5):
        assert bitwise_equal(fn(batch[r : r + 1], 1.1), together[r : r + 1]), f"{op} row {r}"


@pytest.mark.parametrize("op", ["softmax_backward", "log_softmax_backward", "logsumexp_backward", "entropy_backward"])
def test_cpu_backward_thread_count_independent(op, restore_threads):
    ops = torch.ops.logitkit
    x = logits(1, 100_003, torch.float32, seed=2)
    saved = {"softmax_backward": ops.softmax(x, 1.0), "log_softmax_backward": ops.log_softmax(x, 1.0)}.get(op, x)
    grad = torch.randn(saved.shape if op in ("softmax_backward", "log_softmax_backward") else (1,))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(getattr(ops, op)(grad, saved, 1.0))
    assert bitwise_equal(results[0], results[1])


def test_emulated_schedule_independent():
    """The CUDA kernels' reductions follow a fixed tree: the emulator's thread
    schedule (in order, reversed, random with two seeds) never changes a bit."""
    from logitkit import _loader

    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    ops = torch.ops.logitkit_emulated
    x = logits(2, 9001, torch.bfloat16, seed=3)
    results = []
    try:
        for schedule in SCHEDULES:
            _loader._C_emulated.configure(threads_per_block=80, max_elements_per_block=4096, **schedule)
            results.append([getattr(ops, op)(x, 1.0) for op in OPS])
    finally:
        _loader._C_emulated.configure(**EMULATED_DEFAULTS)
    for other in results[1:]:
        for op, a, b in zip(OPS, results[0], other):
            assert bitwise_equal(a, b), op


def test_emulated_sampler_gather_schedule_independent():
    """The sampler family's gathered path (CUDA: top-k of at most 896 survivors gathered with
    atomics, in the order the threads reach them, then ranked by value before anything is
    summed): token, log-prob and entropy keep their bits under every thread schedule. (The
    outputs' sums come from the kept-sums pass over the row; the ranking matters for rows whose
    top-p cut lies within rounding of its limit, which random rows do not hit.)"""
    from logitkit import _loader
    from logitkit.testing import backends

    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    x = logits(3, 5000, torch.float32, seed=5)
    results = []
    try:
        with backends.use_backend("emulated-cuda"):
            for schedule in SCHEDULES:
                _loader._C_emulated.configure(threads_per_block=80, max_elements_per_block=4096, **schedule)
                out = logitkit.sample(
                    x, top_k=200, top_p=0.9, eta=1e-3, seed=3, return_logprobs=True, return_entropy=True
                )
                results.append(tuple(t.contiguous() for t in (out.tokens, out.logprobs, out.entropy)))
    finally:
        _loader._C_emulated.configure(**EMULATED_DEFAULTS)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert bitwise_equal(a, b)


@pytest.mark.parametrize("rule", ["top_p", "typical_p"])
def test_emulated_radix_bins_at_the_cut_schedule_independent(rule):
    """The sampler family's radix selections that sum weights per bin (top-p and typical over the
    whole row) keep the same set under every thread schedule even where the cut lies within
    rounding of its limit: their bins add in 64-bit fixed point (integer atomics). With float
    atomics the kept count at such a limit changed with the schedule (1421 vs 1422 tokens for
    top-p here; the emulator's threads run concurrently, here also in parallel). The limit is
    found by bisecting the parameter down to two adjacent float32 values, between which the kept
    count changes."""
    import numpy as np

    from logitkit import _loader
    from logitkit.testing import backends

    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    x = torch.randn(1, 20000, generator=torch.Generator().manual_seed(5)) * 1.5

    def kept(value: np.float32, schedule: dict) -> int:
        _loader._C_emulated.configure(threads_per_block=256, max_elements_per_block=1 << 20, **schedule)
        return int(logitkit.truncation_mask(x, **{rule: float(value)}).sum())

    try:
        with backends.use_backend("emulated-cuda"):
            low, high = np.float32(0.5), np.float32(0.9)
            kept_low = kept(low, SCHEDULES[0])
            while True:
                middle = np.float32((float(low) + float(high)) / 2)
                if middle in (low, high):
                    break
                if kept(middle, SCHEDULES[0]) == kept_low:
                    low = middle
                else:
                    high = middle
            counts = {value: [kept(value, s) for s in SCHEDULES * 2] for value in (low, high)}
    finally:
        _loader._C_emulated.configure(**EMULATED_DEFAULTS)
    assert counts[low][0] != counts[high][0]  # the limit lies between the two adjacent values
    for value, seen in counts.items():
        assert len(set(seen)) == 1, (value, seen)
