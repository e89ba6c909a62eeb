"""Max errors of logitkit's row ops against fp64 references, per dtype and backend.

    python bench/accuracy.py [--rows 64] [--vocab 128256] [--out bench/accuracy.md]

The reference (logitkit.testing.references) is evaluated in float64 on the
same (already rounded) input, so the errors are those of the kernels (fp32
arithmetic, output rounding). The emulated-CUDA backend runs on a smaller
shape (it is slow by design).
"""

from __future__ import annotations

import argparse

import torch

import logitkit
from _markdown import emit
from logitkit import _loader
from logitkit.testing import DTYPES, available, references, use_backend


def errors(x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(max abs error, max rel error) of each row op of the current backend on ``x``."""
    out = {}
    for name, reference in references.ROW_OPS.items():
        ref = reference(x)
        got = getattr(logitkit, name)(x).double()
        diff = (got - ref).abs()
        rel = diff / ref.abs().clamp_min(1e-30)
        # relative error only where the value is representable in the dtype
        mask = ref.abs() > (1e-30 if x.dtype == torch.float32 else 1e-4)
        out[name] = (diff.max().item(), rel[mask].max().item() if mask.any() else 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    backends = [("cpu", args.rows, args.vocab)]
    if "emulated-cuda" in available():
        _loader._C_emulated.configure(threads_per_block=256, max_elements_per_block=16384, schedule="random", seed=0)
        backends.append(("emulated-cuda", 4, 50257))
    lines = ["| backend | shape | dtype | op | max abs error | max rel error |", "|---|---|---|---|---|---|"]
    for backend, rows, vocab in backends:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
        for dname, dtype in DTYPES.items():
            with use_backend(backend):
                table = errors(base.to(dtype))
            for op, (abs_err, rel_err) in table.items():
                lines.append(f"| {backend} | {rows}x{vocab} | {dname} | {op} | {abs_err:.2e} | {rel_err:.2e} |")
    emit(
        lines,
        args.out,
        f"Max errors vs fp64 (logits ~ N(0, 4^2); logitkit {logitkit.__version__}, CPU ISA "
        f"{logitkit.build_info()['cpu_capability']}). Produced by `python bench/accuracy.py "
        f"--out bench/accuracy.md`.",
    )


if __name__ == "__main__":
    main()
