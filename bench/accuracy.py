"""Max errors of logitkit's row ops against fp64 references, per dtype and backend.

    python bench/accuracy.py [--rows 64] [--vocab 128256] [--out bench/accuracy.md]

The reference is evaluated in float64 on the same (already rounded) input,
so the errors are those of the kernels (fp32 arithmetic, output rounding).
The emulated-CUDA backend runs on a smaller shape (it is slow by design).
"""
from __future__ import annotations

import argparse

import torch

import logitkit
from logitkit import _loader

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def references(x: torch.Tensor) -> dict[str, torch.Tensor]:
    z = x.double()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return {
        "softmax": p,
        "log_softmax": logp,
        "logsumexp": torch.logsumexp(z, -1),
        "entropy": -(p * logp.masked_fill(p == 0, 0)).sum(-1),
    }


def errors(ops, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    out = {}
    for name, ref in references(x).items():
        got = getattr(ops, name)(x, 1.0).double()
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
    backends = [("cpu", torch.ops.logitkit, args.rows, args.vocab)]
    if _loader._C_emulated is not None:
        _loader._C_emulated.configure(threads_per_block=256, max_elements_per_block=16384, schedule="random", seed=0)
        backends.append(("emulated-cuda", torch.ops.logitkit_emulated, 4, 50257))
    lines = ["| backend | shape | dtype | op | max abs error | max rel error |", "|---|---|---|---|---|---|"]
    for backend, ops, rows, vocab in backends:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
        for dname, dtype in DTYPES.items():
            for op, (abs_err, rel_err) in errors(ops, base.to(dtype)).items():
                lines.append(f"| {backend} | {rows}x{vocab} | {dname} | {op} | {abs_err:.2e} | {rel_err:.2e} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Max errors vs fp64 (logits ~ N(0, 4^2); logitkit {logitkit.__version__}, "
                    f"CPU ISA {logitkit.build_info()['cpu_capability']}). Produced by `python bench/accuracy.py "
                    f"--out bench/accuracy.md`.\n\n{text}\n")


if __name__ == "__main__":
    main()
