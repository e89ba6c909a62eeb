"""Max errors of logitkit's linear cross-entropy (loss and gradients) against a
float64 materialised reference, per dtype and backend, next to the errors of
the materialised loss a user writes in the same dtype.

    python bench/linear_ce_accuracy.py [--tokens 512] [--hidden 1024] [--vocab 32000]
                                       [--out bench/linear_ce_accuracy.md]

The reference (logitkit.testing.references.linear_cross_entropy) is evaluated
in float64 on the same (already rounded) inputs, so the errors are those of
the implementation; the materialised row is the same definition evaluated in
the inputs' dtype. Gradient errors are reported as max |error| / max
|reference| of each gradient; the loss as a relative error (for bf16/fp16 it
includes the rounding of the returned loss). The emulated-CUDA backend runs on
a smaller shape (it is slow by design).
"""

from __future__ import annotations

import argparse
import math

import torch

import logitkit
from _markdown import emit
from logitkit import _loader
from logitkit.testing import DTYPES, available, references, use_backend

OPTIONS = dict(label_smoothing=0.1, softcap=30.0, z_loss=1e-4)


def loss_and_grads(fn, h, w):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def errors(got, ref):
    loss = (abs(got[0] - ref[0]) / abs(ref[0])).item()
    return [loss] + [((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got[1:], ref[1:])]


def logitkit_loss(t, opts):
    return lambda h, w: logitkit.linear_cross_entropy(h, w, t, **opts)


def materialised_loss(t, opts, dtype):
    """The reference's definition evaluated in ``dtype`` (float64: the reference itself)."""
    return lambda h, w: references.linear_cross_entropy(h, w, t, dtype=dtype, **opts)


def rows_of(backend, n, d, v, t, h64, w64):
    """The table rows of one backend: every option set and dtype, logitkit (and on CPU the
    materialised loss in the same dtype)."""
    rows = []
    for label, opts in (("none", {}), ("ls 0.1, softcap 30, z-loss 1e-4", OPTIONS)):
        for dname, dtype in DTYPES.items():
            h, w = h64.to(dtype), w64.to(dtype)
            ref = loss_and_grads(materialised_loss(t, opts, torch.float64), h.double(), w.double())
            impls = [("logitkit", logitkit_loss(t, opts))]
            if backend == "cpu":
                impls.append(("materialised", materialised_loss(t, opts, dtype)))
            for impl, fn in impls:
                with use_backend(backend):
                    e = errors(loss_and_grads(fn, h, w), ref)
                rows.append(
                    f"| {backend} | {n}x{d}x{v} | {label} | {dname} | {impl} | {e[0]:.1e} | {e[1]:.1e} | {e[2]:.1e} |"
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    lines = [
        "| backend | N x D x V | options | dtype | impl | loss rel err | grad_hidden err / max | "
        "grad_weight err / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    backends = [("cpu", (args.tokens, args.hidden, args.vocab))]
    if "emulated-cuda" in available():
        _loader._C_emulated.configure(threads_per_block=128, max_elements_per_block=4096, schedule="random", seed=0)
        backends.append(("emulated-cuda", (16, 64, 1000)))
    for backend, (n, d, v) in backends:
        gen = torch.Generator().manual_seed(0)
        h64 = torch.randn(n, d, dtype=torch.float64, generator=gen)
        w64 = torch.randn(v, d, dtype=torch.float64, generator=gen) * (3 / math.sqrt(d))
        t = torch.randint(0, v, (n,), generator=gen)
        lines += rows_of(backend, n, d, v, t, h64, w64)
    emit(
        lines,
        args.out,
        "Max errors of the linear cross-entropy (mean reduction) vs a float64 materialised reference "
        f"(hidden ~ N(0, 1), logits std ~3; logitkit {logitkit.__version__}). Produced by "
        "`python bench/linear_ce_accuracy.py --out bench/linear_ce_accuracy.md`.",
    )


if __name__ == "__main__":
    main()
