"""The benchmark cases: :class:`Case`, the registry :data:`CASES`, dtype names,
bytes models and the standard logits input maker. Each case family
(row_ops_cases, top_h_cases, linear_ce_cases) registers its cases here from
its ``register_cases()``, which the package calls in table order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..testing import DTYPES, tolerances

_DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "f32": "fp32",
    "float": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "f16": "fp16",
    "half": "fp16",
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


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return DTYPES[dtype_name(dtype)]


#: Hidden size D of the ``linear_ce`` case unless ``--hidden`` says otherwise.
LINEAR_CE_HIDDEN = 1024


@dataclass(frozen=True)
class CaseParams:
    """Settings of a run (from the command line) that shape a case's inputs and its models."""

    hidden: int = LINEAR_CE_HIDDEN  # D of linear_ce (rows = tokens N, vocab = V)


DEFAULT_PARAMS = CaseParams()

#: Makes one set of positional inputs: ``make_inputs(rows, vocab, dtype, device, generator, params)``.
InputMaker = Callable[[int, int, torch.dtype, torch.device, torch.Generator, CaseParams], tuple]
#: ``model(rows, vocab, dtype, params=DEFAULT_PARAMS) -> int`` (bytes moved, or flops).
Model = Callable[..., int]


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
            float64 (a float64 reference of :mod:`logitkit.testing.references`).
        bytes_model: the bytes an ideal implementation reads + writes, ``(rows, vocab, dtype, params)``.
        tolerance: ``(atol, rtol)`` per input dtype for the correctness guard.
        default: whether the op runs when no op is named on the command line.
        check: replaces :func:`~logitkit.bench.harness.compare` in the correctness guard when the
            outputs are not numbers to compare within tolerances (kept sets, sampled tokens):
            called as ``check(output, reference, inputs)``, returns ``(max error, error ratio)``
            like ``compare`` (the output passes when the ratio is <= 1).
        flops_model: ``(rows, vocab, dtype, params) -> flops`` of the op's essential arithmetic,
            for ops whose cost is compute (GEMMs) rather than memory traffic; gives the GFLOP/s
            column.
        memory_excludes_outputs: the "mem" column counts bytes above the inputs *and outputs*
            (for ops whose outputs are gradients: the transient memory users compare).
        max_repeats: cap on the timed samples, with a single warm-up call (ops that take seconds
            per call).
        rooflines: name -> callable timed like an implementation but not checked (its output is
            not the op's): the hardware ceiling the op is compared with, e.g. its GEMMs alone.
    """

    name: str
    make_inputs: InputMaker
    fn: Callable[..., Any]
    baselines: Mapping[str, Callable[..., Any]]
    reference: Callable[..., Any]
    bytes_model: Model
    tolerance: Mapping[torch.dtype, tuple[float, float]] = field(default_factory=lambda: dict(tolerances.BENCH_ROW_OPS))
    default: bool = True
    check: Callable[[Any, Any, tuple], tuple[float, float]] | None = None
    flops_model: Model | None = None
    memory_excludes_outputs: bool = False
    max_repeats: int | None = None
    rooflines: Mapping[str, Callable[..., Any]] = field(default_factory=dict)


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


def bytes_moved(op: str, rows: int, vocab: int, dtype: torch.dtype | str, params: CaseParams = DEFAULT_PARAMS) -> int:
    """Bytes an ideal implementation of ``op`` moves for ``rows`` x ``vocab`` logits of ``dtype``."""
    return int(CASES[op].bytes_model(rows, vocab, as_dtype(dtype), params))


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def row_to_row_bytes(rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS) -> int:
    """Bytes model of a (N, V) -> (N, V) op: read N*V and write N*V elements of ``dtype``."""
    return 2 * rows * vocab * itemsize(dtype)


def row_reduction_bytes(
    rows: int, vocab: int, dtype: torch.dtype, params: CaseParams = DEFAULT_PARAMS, out_dtype: torch.dtype | None = None
) -> int:
    """Bytes model of a (N, V) -> (N,) op: read N*V elements of ``dtype``, write N of ``out_dtype``
    (the input dtype when None)."""
    return rows * vocab * itemsize(dtype) + rows * itemsize(out_dtype or dtype)


#: Standard deviation of the benchmark logits (LM logits are typically a few units wide).
LOGIT_SCALE = 3.0


def make_logits(
    rows: int, vocab: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, params: CaseParams
) -> tuple:
    """One (rows, vocab) tensor of Gaussian logits (std :data:`LOGIT_SCALE`) in ``dtype``."""
    x = torch.randn(rows, vocab, device=device, generator=gen)
    return ((x * LOGIT_SCALE).to(dtype),)
