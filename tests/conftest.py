"""Shared fixtures: every op test runs once per backend.

Backends:
  cpu            torch.ops.logitkit on CPU tensors (the CPU kernels)
  emulated-cuda  torch.ops.logitkit_emulated on CPU tensors: the CUDA kernels
                 and their host wrappers, run by our SIMT emulator
  cuda           torch.ops.logitkit on CUDA tensors (skipped without a GPU)
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import logitkit
from logitkit import _loader


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: str
    namespace: str

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` on this backend's device (never `t` itself)."""
        return t.detach().clone().to(self.device)


BACKENDS = [
    pytest.param(Backend("cpu", "cpu", "logitkit"), id="cpu"),
    pytest.param(
        Backend("emulated-cuda", "cpu", "logitkit_emulated"),
        id="emulated-cuda",
        marks=pytest.mark.skipif(_loader._C_emulated is None, reason="emulated-CUDA module not built"),
    ),
    pytest.param(
        Backend("cuda", "cuda", "logitkit"),
        id="cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and logitkit.build_info()["cuda_compiled"]), reason="no CUDA device"
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    b = request.param
    if b.namespace == "logitkit_emulated":
        # Default emulated launch shape: 80 threads (a partial last warp);
        # rows longer than 4096 split over several blocks; a seeded random
        # thread schedule.
        _loader._C_emulated.configure(threads_per_block=80, max_elements_per_block=4096, schedule="random", seed=1)
    return b


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state, so a test that draws
    unseeded random inputs sees the same ones in every run and in any order."""
    torch.manual_seed(0)


def emulated_configure(**kwargs):
    """Changes the emulated launch shape (tests of the emulated backend)."""
    _loader._C_emulated.configure(**kwargs)
