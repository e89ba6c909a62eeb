"""Loads logitkit's compiled extension modules after checking they match the
installed torch (a mismatch would fail later with obscure symbol errors)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

try:
    from . import _build_config
except ImportError as exc:  # pragma: no cover - only in a broken source checkout
    raise ImportError(
        "logitkit's compiled part is missing: install the package with "
        "`pip install --no-build-isolation .` (importing from the source tree does not work)"
    ) from exc


def _check_torch_version() -> None:
    built, installed = _build_config.TORCH_VERSION, torch.__version__
    if built != installed:
        raise ImportError(
            f"logitkit was built against torch {built}, but torch {installed} is installed. "
            "Its C++ extension is tied to the torch it was compiled with; rebuild it against the "
            "installed torch: `pip install --no-build-isolation --no-deps --force-reinstall <path "
            "to the logitkit source>` (or `pip install --no-build-isolation -e .` in a checkout)."
        )


_check_torch_version()
_C: ModuleType = importlib.import_module("logitkit._C")

_C_emulated: ModuleType | None
try:
    _C_emulated = importlib.import_module("logitkit._C_emulated")
except ImportError:
    _C_emulated = None


def build_info() -> dict:
    """How this copy of logitkit was built.

    Returns a dict with: ``version``, ``torch_version`` (torch it was built
    against), ``cuda_compiled`` (bool), ``cuda_architectures`` (list of CMake
    architecture names, e.g. ``["80-real", "90-real", "90-virtual"]``: sm_80 and
    sm_90 machine code plus compute_90 PTX), ``cuda_version`` (nvcc),
    ``emulation_available`` (whether the emulated-CUDA test module is present),
    and ``cpu_capability`` (the instruction-set copy of the CPU kernels in use).
    """
    info = dict(_C.build_info())
    archs = info.pop("cuda_architectures")
    info["cuda_architectures"] = [a for a in archs.split(",") if a]
    info["emulation_available"] = _C_emulated is not None
    return info


# Op namespaces that carry logitkit's schemas: the product one, and the
# emulated-CUDA one when it was built.
OP_NAMESPACES = ("logitkit",) + (("logitkit_emulated",) if _C_emulated is not None else ())
