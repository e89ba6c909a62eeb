"""The SIMT emulator that runs our CUDA kernels on the CPU: intrinsic
semantics, partial warps, schedules, and detection of misuse."""

from __future__ import annotations

import os

import pytest

from logitkit import _loader

emu = _loader._C_emulated
pytestmark = pytest.mark.skipif(emu is None, reason="emulated-CUDA module not built")

SCHEDULES = ["in_order", "reversed", "random"]


@pytest.fixture(autouse=True)
def restore_configuration():
    yield
    emu.configure(threads_per_block=80, max_elements_per_block=0, schedule="random", seed=1)
    emu.set_deadlock_timeout(30.0)


def expected_intrinsics(t: int, threads: int):
    """What a GPU returns for warp_intrinsics_kernel's thread t (CUDA Programming Guide semantics)."""
    warp_start = (t // 32) * 32
    lanes = min(32, threads - warp_start)
    lane = t - warp_start
    live = range(lanes)
    ballot = sum(1 << lane for lane in live if lane % 3 == 0)

    def down(delta, width=32):
        seg = (lane // width) * width
        return warp_start + lane + delta if lane + delta < seg + width and lane + delta < lanes else None

    src_xor = lane ^ 5
    return [
        warp_start + ((lane ^ 7) % lanes),
        warp_start + lane - 1 if lane >= 1 else t,
        down(3),
        warp_start + src_xor if src_xor < lanes else None,
        down(1, 8),
        ballot,
        int(lanes > 2),
        int(lanes <= 40),
        None,  # __activemask: lanes that already returned are gone, as on a GPU
    ]


@pytest.mark.parametrize("threads", [32, 64, 70, 5])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warp_intrinsics(threads, schedule):
    emu.configure(schedule=schedule, seed=7)
    out = emu.selftest("warp_intrinsics", threads, 2)
    for b in range(2):
        for t in range(threads):
            got = out[(b * threads + t) * 9 : (b * threads + t + 1) * 9]
            for i, (g, e) in enumerate(zip(got, expected_intrinsics(t, threads))):
                if e is None:
                    continue  # the source lane does not exist: undefined on a GPU
                assert g == e, f"thread {t} result {i}: got {g}, expected {e}"


@pytest.mark.parametrize("threads", [1, 31, 33, 80, 256, 1000])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_block_reduce_atomics_and_dynamic_shared(threads, schedule):
    emu.configure(schedule=schedule, seed=threads)
    blocks = 3
    out = emu.selftest("block_reduce", threads, blocks)
    sums, counter, neighbours = out[:blocks], out[blocks], out[blocks + 1 :]
    assert sums == [threads * (threads + 1) // 2] * blocks
    assert counter == threads * blocks
    for b in range(blocks):
        for t in range(threads):
            assert neighbours[b * threads + t] == 1000 * b + (t + 1) % threads


SORT_SIZES = [0, 1, 2, 31, 33, 64, 100, 513, 1000, 1024, 2049, 4096]  # selftest.cpp's kSortSizes
SORT_STRIDE = 4097


def sort_selftest_value(slot: int, block: int) -> int:
    return (((slot * 2654435761 + block * 40503) & 0xFFFFFFFF) >> 20) % 37


SELECT_SIZES = [1, 2, 31, 33, 513, 1000, 4097, 8192]  # selftest.cpp's kSelectSizes
SELECT_RANKS = 3


def select_selftest_key(slot: int, block: int) -> int:
    hash_ = (slot * 2654435761 + block * 40503) & 0xFFFFFFFF
    if block % 3 == 0:
        return hash_
    if block % 3 == 1:
        return 0x40200000 | ((hash_ >> 7) % 23) << 9 | (hash_ >> 27)
    return 0x3F800000 + slot if slot % 5 == 0 else 0x3F800000


@pytest.mark.parametrize("threads", [1, 32, 45, 96, 512])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_block_kth_largest_key(threads, schedule):
    """The radix selection of top-k's crossing bin: the key of a given rank (and the largest) among
    keys in shared memory, for distinct keys over all 32 bits, keys of one first-digit bin with many
    ties, and a tie group with a few larger keys, whole and partial warps."""
    emu.configure(schedule=schedule, seed=threads)
    blocks = 3 * len(SELECT_SIZES)  # every size with every kind of key
    out = emu.selftest("kth_largest_key", threads, blocks)
    for block in range(blocks):
        n = SELECT_SIZES[block % len(SELECT_SIZES)]
        ordered = sorted((select_selftest_key(a, block) for a in range(n)), reverse=True)
        expected = [ordered[(n - 1) * j // (SELECT_RANKS - 1)] for j in range(SELECT_RANKS)] + [ordered[0]]
        got = out[block * (SELECT_RANKS + 1) : (block + 1) * (SELECT_RANKS + 1)]
        assert got == expected, f"n={n}, block {block}"


@pytest.mark.parametrize("threads", [1, 32, 45, 96, 512])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_block_bitonic_sort_and_first_group_reaching(threads, schedule):
    """The sampler family's block sort (slots ordered by value, largest first, ties by slot) and
    its scan for the first group of equal values whose mass before it reaches a third of the
    total, for sizes around powers of two and the warp width, whole and partial warps."""
    emu.configure(schedule=schedule, seed=threads)
    out = emu.selftest("bitonic_sort", threads, len(SORT_SIZES))
    for block, n in enumerate(SORT_SIZES):
        values = [sort_selftest_value(a, block) for a in range(n)]
        expected = sorted(range(n), key=lambda a: (-values[a], a))
        got = out[block * SORT_STRIDE : block * SORT_STRIDE + n]
        assert got == expected, f"n={n}: slots not sorted"
        total = sum(v + 1 for v in values)
        first, before = n, 0
        for r, a in enumerate(expected):
            if (r == 0 or values[expected[r - 1]] != values[a]) and 3 * before >= total:
                first = r
                break
            before += values[a] + 1
        assert out[block * SORT_STRIDE + SORT_STRIDE - 1] == first, f"n={n}"


@pytest.mark.parametrize("one_cpu", [True, False])
def test_threads_on_one_cpu_or_in_parallel(one_cpu):
    """A launch's threads take turns on the CPU the launch starts on (the default: faster where
    waking threads on other cores is costly) or run in parallel over the process's CPUs; the
    results are the same, and the caller's own CPU affinity is left as it was."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    emu.configure(schedule="random", seed=3, one_cpu=one_cpu)
    assert emu.configuration()["one_cpu"] is one_cpu
    threads, blocks = 256, 3
    out = emu.selftest("block_reduce", threads, blocks)
    assert out[:blocks] == [threads * (threads + 1) // 2] * blocks
    assert out[blocks] == threads * blocks
    if affinity is not None:
        assert os.sched_getaffinity(0) == affinity


def test_missing_barrier_kernel_runs():
    """The deliberately racy self-test kernel (a read of a neighbour's shared
    slot with no barrier) runs here without a check failing: only the
    ThreadSanitizer build reports it (.ci/sanitize thread asserts that)."""
    assert len(emu.selftest("missing_barrier", 64, 2)) == 128


def test_divergent_barrier_is_reported():
    with pytest.raises(RuntimeError, match="divergent __syncthreads"):
        emu.selftest("divergent_barrier", 64)


def test_wrong_shuffle_mask_is_reported():
    with pytest.raises(RuntimeError, match=r"passed mask 0xffffffff but the warp's live lanes are 0x0000ffff"):
        emu.selftest("full_mask_in_partial_warp", 48)


def test_deadlock_is_reported_not_hung():
    emu.set_deadlock_timeout(0.5)
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.selftest("deadlock", 64)


def test_bad_configuration():
    with pytest.raises(ValueError, match="threads_per_block"):
        emu.configure(threads_per_block=0)
    with pytest.raises(ValueError, match="schedule"):
        emu.configure(schedule="sideways")
