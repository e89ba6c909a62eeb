"""Max errors of logitkit's linear cross-entropy (loss and gradients) against a
float64 materialised reference, per dtype and backend, next to the errors of
the materialised loss a user writes in the same dtype.

    python bench/linear_ce_accuracy.py [--tokens 512] [--hidden 1024] [--vocab 32000]
                                       [--out bench/linear_ce_accuracy.md]

The reference is evaluated in float64 on the same (already rounded) inputs, so
the errors are those of the implementation. Gradient errors are reported as
max |error| / max |reference| of each gradient; the loss as a relative error
(for bf16/fp16 it includes the rounding of the returned loss). The
emulated-CUDA backend runs on a smaller shape (it is slow by design).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import logitkit
from logitkit import _loader, linear_ce

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIONS = dict(label_smoothing=0.1, softcap=30.0, z_loss=1e-4)


def materialised(h, w, t, label_smoothing=0.0, softcap=None, z_loss=0.0):
    z = h @ w.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, t, label_smoothing=label_smoothing)
    return loss + z_loss * (torch.logsumexp(z.double() if z.dtype == torch.float64 else z.float(), -1) ** 2).mean()


def loss_and_grads(fn, h, w):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def errors(got, ref):
    loss = (abs(got[0] - ref[0]) / abs(ref[0])).item()
    return [loss] + [((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got[1:], ref[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    rows = ["| backend | N x D x V | options | dtype | impl | loss rel err | grad_hidden err / max | "
            "grad_weight err / max |", "|---|---|---|---|---|---|---|---|"]
    backends = [("cpu", "logitkit", (args.tokens, args.hidden, args.vocab))]
    if _loader._C_emulated is not None:
        _loader._C_emulated.configure(threads_per_block=128, max_elements_per_block=4096, schedule="random", seed=0)
        backends.append(("emulated-cuda", "logitkit_emulated", (16, 64, 1000)))
    for backend, namespace, (n, d, v) in backends:
        gen = torch.Generator().manual_seed(0)
        h64 = torch.randn(n, d, dtype=torch.float64, generator=gen)
        w64 = torch.randn(v, d, dtype=torch.float64, generator=gen) * (3 / math.sqrt(d))
        t = torch.randint(0, v, (n,), generator=gen)
        for label, opts in (("none", {}), ("ls 0.1, softcap 30, z-loss 1e-4", OPTIONS)):
            for dname, dtype in DTYPES.items():
                h, w = h64.to(dtype), w64.to(dtype)
                ref = loss_and_grads(lambda a, b: materialised(a, b, t, **opts), h.double(), w.double())
                impls = [("logitkit", lambda a, b: linear_ce._linear_cross_entropy(namespace, a, b, t, **opts))]
                if backend == "cpu":
                    impls.append(("materialised", lambda a, b: materialised(a, b, t, **opts)))
                for impl, fn in impls:
                    e = errors(loss_and_grads(fn, h, w), ref)
                    rows.append(f"| {backend} | {n}x{d}x{v} | {label} | {dname} | {impl} | {e[0]:.1e} | "
                                f"{e[1]:.1e} | {e[2]:.1e} |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Max errors of the linear cross-entropy (mean reduction) vs a float64 materialised reference "
                    f"(hidden ~ N(0, 1), logits std ~3; logitkit {logitkit.__version__}). Produced by "
                    f"`python bench/linear_ce_accuracy.py --out bench/linear_ce_accuracy.md`.\n\n{text}\n")


if __name__ == "__main__":
    main()
