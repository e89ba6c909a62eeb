"""The op namespace logitkit's Python functions call.

Normally the product namespace ``torch.ops.logitkit``, whose CPU and CUDA
kernels are picked by the inputs' device. The test suite switches it to
``torch.ops.logitkit_emulated`` (the CUDA kernels run on the CPU by the SIMT
emulator) with :func:`logitkit.testing.use_backend`, so that the public
functions themselves are tested on every backend.

Every public function resolves its ops through :func:`ops` (autograd
functions keep the :func:`namespace` of their forward for the backward). The
choice is a plain module global: ``torch.compile`` reads it as a constant
while tracing and guards on it, so switching backends recompiles rather than
running stale code.
"""

from __future__ import annotations

from typing import Any

import torch

PRODUCT_NAMESPACE = "logitkit"
EMULATED_NAMESPACE = "logitkit_emulated"

_namespace = PRODUCT_NAMESPACE


def namespace() -> str:
    """The op namespace of the current backend."""
    return _namespace


def ops(name: str | None = None) -> Any:
    """``torch.ops.<name>``; by default the current backend's namespace."""
    return getattr(torch.ops, _namespace if name is None else name)


def set_namespace(name: str) -> str:
    """Makes ``name`` the current op namespace; returns the previous one (for :func:`use_backend`)."""
    global _namespace
    previous, _namespace = _namespace, name
    return previous
