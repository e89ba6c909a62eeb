"""The backends logitkit's functions can run on, and :func:`use_backend` to pick one.

* ``"cpu"``: the product op namespace ``torch.ops.logitkit`` on CPU tensors
  (the vectorised CPU kernels);
* ``"emulated-cuda"``: ``torch.ops.logitkit_emulated`` on CPU tensors: the
  CUDA kernels and their host code, run by logitkit's SIMT emulator (built
  with ``LOGITKIT_EMULATION=ON``, the default);
* ``"cuda"``: ``torch.ops.logitkit`` on CUDA tensors.

The product namespace serves both CPU and CUDA (the tensors' device picks the
kernels), so only ``"emulated-cuda"`` changes which ops logitkit's functions
call; :func:`device` says where a backend's tensors live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .. import _backend, _loader

#: Op namespace of each backend.
NAMESPACES = {
    "cpu": _backend.PRODUCT_NAMESPACE,
    "emulated-cuda": _backend.EMULATED_NAMESPACE,
    "cuda": _backend.PRODUCT_NAMESPACE,
}


def device(backend: str) -> str:
    """The device of a backend's tensors: ``"cuda"`` for ``"cuda"``, else ``"cpu"``."""
    return "cuda" if backend == "cuda" else "cpu"


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run in this process, or None when it can."""
    if backend not in NAMESPACES:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(NAMESPACES)}")
    if backend == "emulated-cuda" and _loader._C_emulated is None:
        return "emulated-CUDA module not built"
    if backend == "cuda" and not (torch.cuda.is_available() and _loader.build_info()["cuda_compiled"]):
        return "no CUDA device"
    return None


def available() -> list[str]:
    """The backends that can run here, in the order cpu, emulated-cuda, cuda."""
    return [name for name in NAMESPACES if unavailable_reason(name) is None]


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, logitkit's functions (``logitkit.softmax``, ``top_h_mask``,
    ``cross_entropy``, ``linear_cross_entropy``, ...) call the ops of ``backend``.

    For tests and accuracy studies: the choice is process-wide (not per thread),
    and blocks nest. Functions compiled with ``torch.compile`` inside the block
    are traced against that backend's ops (and recompiled when the backend
    changes).
    """
    reason = unavailable_reason(backend)
    if reason is not None and backend == "emulated-cuda":
        raise RuntimeError(f"use_backend({backend!r}): {reason}")
    previous = _backend.set_namespace(NAMESPACES[backend])
    try:
        yield
    finally:
        _backend.set_namespace(previous)
