"""One definition of correct for logitkit: float64 references, tolerances,
comparisons, and the backend switch the test suite, the benchmark's
correctness guard and the accuracy scripts all use.

* :mod:`logitkit.testing.references`: the definitions in float64 (row ops,
  softmax state, the three Top-H rules, cross-entropy with label smoothing,
  class weights, z-loss and softcap, linear cross-entropy, log-probabilities
  and entropy);
* :mod:`logitkit.testing.tolerances`: the per-op, per-dtype tolerances;
* :func:`assert_close`, :func:`error_and_ratio`, :func:`abs_error`: NaN- and
  inf-aware comparisons;
* :func:`assert_no_worse_than_torch`: bf16/fp16 outputs no less accurate than
  the plain-PyTorch computation in the same dtype (times a small factor);
* :func:`use_backend`: run logitkit's functions on "cpu", "emulated-cuda" or
  "cuda".
"""

from __future__ import annotations

import torch

from . import references, tolerances
from .backends import available, device, unavailable_reason, use_backend
from .tolerances import DTYPES, Tolerance


def abs_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``|actual - expected|`` in float64 on the CPU, element-wise: 0 where both are NaN or the
    same infinity, inf where only one side is NaN (or the infinities differ)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    both_nan = a.isnan() & e.isnan()
    err = torch.where(both_nan, torch.zeros_like(a), (a - e).abs()).nan_to_num(nan=torch.inf)
    same_inf = (a == e) & e.isinf()
    return torch.where(same_inf, torch.zeros_like(err), err)


def error_and_ratio(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise :func:`abs_error` and its ratio to the tolerance ``atol + rtol |expected|``; an
    element passes when its ratio is <= 1. An infinite expected value allows no finite error."""
    err = abs_error(actual, expected)
    bound = atol + rtol * expected.detach().double().cpu().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return err, torch.where(err == 0, torch.zeros_like(err), err / bound)  # no 0/0 when atol = 0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """Asserts ``|actual - expected| <= atol + rtol |expected|`` element-wise (same shape; NaN
    matches NaN, an infinity the same infinity)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err, ratio = error_and_ratio(actual, expected, atol, rtol)
    bad = ratio > 1
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} mismatch(es), first at {list(first)}: got "
            f"{actual.detach()[first].item()!r}, expected {expected.detach()[first].item()!r}; max abs error "
            f"{err.max().item():.3e} (atol {atol}, rtol {rtol})"
        )


def assert_no_worse_than_torch(
    actual: torch.Tensor,
    torch_result: torch.Tensor,
    reference: torch.Tensor,
    factor: float = tolerances.NO_WORSE_FACTOR,
    what: str = "",
) -> None:
    """Asserts that ``actual``'s max error against the float64 ``reference`` is at most ``factor``
    times that of ``torch_result``, the plain-PyTorch computation in the same (low) precision,
    plus one unit of rounding of the output dtype at the reference's magnitude (both results are
    rounded to it; the plain computation can be exact by luck)."""
    ours = abs_error(actual, reference).max().item() if actual.numel() else 0.0
    theirs = abs_error(torch_result, reference).max().item() if actual.numel() else 0.0
    scale = reference.detach().double().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max().item()
    rounding = torch.finfo(actual.dtype).eps * scale if actual.is_floating_point() else 0.0
    assert ours <= factor * theirs + rounding, (
        f"{what}: max error {ours:.3e} vs {theirs:.3e} of the plain computation in {torch_result.dtype} "
        f"(allowed {factor} x that + {rounding:.1e})"
    )


__all__ = [
    "DTYPES",
    "Tolerance",
    "abs_error",
    "assert_close",
    "assert_no_worse_than_torch",
    "available",
    "device",
    "error_and_ratio",
    "references",
    "tolerances",
    "unavailable_reason",
    "use_backend",
]
