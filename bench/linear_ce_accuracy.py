"""Max errors of logitkit's linear cross-entropy (loss and gradients) against a
float64 materialised reference, per dtype and backend, next to the errors of
the materialised loss a user writes in the same dtype.

    python bench/linear_ce_accuracy.py [--tokens 128] [--hidden 256] [--vocab 8192]
                                       [--out bench/linear_ce_accuracy.md]

The reference (logitkit.testing.references.linear_cross_entropy) is evaluated
in float64 on the same (already rounded) inputs, so the errors are those of
the implementation; the materialised row is the same definition evaluated in
the inputs' dtype. Gradient errors are reported as max |error| / max
|reference| of each gradient; the loss as a relative error (for bf16/fp16 it
includes the rounding of the returned loss). Every option of the loss, alone and
all together, and both reductions "mean" and "sum". The last column says whether
logitkit's three errors are within Cut Cross-Entropy's test rule, 1.5x the
materialised loss's error in the same dtype plus a small absolute term
(tests/test_linear_cross_entropy.py::test_gemm_paths asserts the same rule).
The emulated-CUDA backend runs on a smaller shape (it is slow by design).
"""

from __future__ import annotations

import argparse
import math

import torch

import logitkit
from _markdown import emit
from logitkit import _loader
from logitkit.testing import DTYPES, available, references, use_backend

IGNORE_INDEX = -100
# label -> options (tensor-valued options are made per problem by `resolve`).
OPTIONS: dict[str, dict] = {
    "none": {},
    "bias": {"bias": True},
    "class_weight": {"class_weight": True},
    "label_smoothing 0.1": {"label_smoothing": 0.1},
    "softcap 30": {"softcap": 30.0},
    "z_loss 1e-4": {"z_loss": 1e-4},
    "temperature 0.7": {"temperature": 0.7},
    "ignore_index (10%)": {"ignore": True},
    "all of them": {
        "bias": True,
        "class_weight": True,
        "label_smoothing": 0.1,
        "softcap": 30.0,
        "z_loss": 1e-4,
        "temperature": 0.7,
        "ignore": True,
    },
}
NO_WORSE_FACTOR, NO_WORSE_ATOL = 1.5, 1e-6


def resolve(opts: dict, t: torch.Tensor, v: int, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """(loss options, targets): a bias (in ``dtype``) and class weights (float32) drawn from
    ``gen``, and 10% of the targets set to ``IGNORE_INDEX`` where the options ask for them."""
    opts = dict(opts)
    if opts.pop("bias", False):
        opts["bias"] = torch.randn(v, dtype=torch.float64, generator=gen).to(dtype)
    if opts.pop("class_weight", False):
        opts["class_weight"] = torch.rand(v, dtype=torch.float64, generator=gen).float() + 0.5
    if opts.pop("ignore", False):
        t = t.clone()
        t[torch.rand(t.shape, generator=gen) < 0.1] = IGNORE_INDEX
    return opts, t


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
    """The table rows of one backend: every option set, reduction and dtype; logitkit, and on
    CPU the materialised loss in the same dtype and the verdict of the 1.5x rule."""
    rows = []
    for label, raw_opts in OPTIONS.items():
        for reduction in ("mean", "sum"):
            for dname, dtype in DTYPES.items():
                opts, tt = resolve(raw_opts, t, v, dtype, torch.Generator().manual_seed(1))
                opts["reduction"] = reduction
                h, w = h64.to(dtype), w64.to(dtype)
                ref_opts = {k: (x.double() if k == "bias" else x) for k, x in opts.items()}
                ref = loss_and_grads(materialised_loss(tt, ref_opts, torch.float64), h.double(), w.double())
                with use_backend(backend):
                    ours = errors(loss_and_grads(logitkit_loss(tt, opts), h, w), ref)
                verdict, theirs_cell = "", ""
                if backend == "cpu":
                    theirs = errors(loss_and_grads(materialised_loss(tt, opts, dtype), h, w), ref)
                    ok = all(o <= NO_WORSE_FACTOR * m + NO_WORSE_ATOL for o, m in zip(ours, theirs))
                    verdict = "yes" if ok else "**no**"
                    theirs_cell = " / ".join(f"{x:.1e}" for x in theirs)
                rows.append(
                    f"| {backend} | {n}x{d}x{v} | {label} | {reduction} | {dname} | "
                    + " / ".join(f"{x:.1e}" for x in ours)
                    + f" | {theirs_cell} | {verdict} |"
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Small by default: the materialised fp16 loss takes ATen's fp16 CPU GEMMs, which run at
    # ~0.6 GFLOP/s on CPUs without fp16 units.
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    lines = [
        "| backend | N x D x V | options | reduction | dtype | logitkit: loss / grad_hidden / grad_weight "
        "| materialised in the same dtype | within 1.5x + 1e-6 |",
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
        "Max errors of the linear cross-entropy vs a float64 materialised reference: loss relative error, "
        "gradients max |error| / max |reference| (hidden ~ N(0, 1), logits std ~3; logitkit "
        f"{logitkit.__version__}; CPU GEMM routes: bf16 {logitkit.gemm_path(torch.bfloat16).path}, fp16 "
        f"{logitkit.gemm_path(torch.float16).path}). Produced by "
        "`python bench/linear_ce_accuracy.py --out bench/linear_ce_accuracy.md`.",
    )


if __name__ == "__main__":
    main()
