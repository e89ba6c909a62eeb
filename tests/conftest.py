"""Shared fixtures: every op test runs once per backend.

Backends (logitkit.testing.backends):
  cpu            torch.ops.logitkit on CPU tensors (the CPU kernels)
  emulated-cuda  torch.ops.logitkit_emulated on CPU tensors: the CUDA kernels
                 and their host wrappers, run by our SIMT emulator
  cuda           torch.ops.logitkit on CUDA tensors (skipped without a GPU)

The `backend` fixture also selects the backend for logitkit's public
functions (logitkit.testing.use_backend), so a test calls `logitkit.softmax`
etc. on `backend.tensor(...)` inputs, or the raw ops through `backend.ops`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest
import torch

from logitkit import _loader
from logitkit.testing import backends


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str

    @property
    def device(self) -> str:
        return backends.device(self.name)

    @property
    def namespace(self) -> str:
        return backends.NAMESPACES[self.name]

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` on this backend's device (never `t` itself)."""
        return t.detach().clone().to(self.device)


def _param(name: str):
    reason = backends.unavailable_reason(name)
    return pytest.param(Backend(name), id=name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


BACKENDS = [_param(name) for name in backends.NAMESPACES]

# Default emulated launch shape: 80 threads (a partial last warp); rows longer
# than 4096 split over several blocks; a seeded random thread schedule.
EMULATED_DEFAULTS = dict(threads_per_block=80, max_elements_per_block=4096, schedule="random", seed=1)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Iterator[Backend]:
    b = request.param
    if b.name == "emulated-cuda":
        _loader._C_emulated.configure(**EMULATED_DEFAULTS)
    with backends.use_backend(b.name):
        yield b


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state, so a test that draws
    unseeded random inputs sees the same ones in every run and in any order."""
    torch.manual_seed(0)


def emulated_configure(**kwargs):
    """Changes the emulated launch shape (tests of the emulated backend)."""
    _loader._C_emulated.configure(**kwargs)


# Parallel runs (pytest-xdist; the README's test command runs `-n auto`). Most of the suite's
# time is the emulated CUDA kernels, whose launches each take one CPU (the emulator's one_cpu
# default): each worker process runs on a CPU of its own, torch's intra-op pool shrunk to one
# thread to match (the tests that are about thread counts set them themselves). Workers: one per
# CPU, at most MAX_WORKERS (each holds its own torch and test tensors: about 1-2 GiB).
MAX_WORKERS = 8


def _usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(len(_usable_cpus()), MAX_WORKERS))


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker and hasattr(os, "sched_setaffinity"):
        cpus = _usable_cpus()
        os.sched_setaffinity(0, {cpus[int(worker.removeprefix("gw")) % len(cpus)]})
        torch.set_num_threads(1)
