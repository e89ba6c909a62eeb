"""Side-by-side measurements of linear_cross_entropy's GEMM routes and of gradient filtering
(bench/README.md, "Linear CE: GEMM routes" and "Gradient filtering"). CPU, one process, every
ratio taken from timings of the same run (the machine is shared: absolute times are noise).

    python bench/linear_ce_paths.py routes [--rows 1024 --hidden 1024 --vocab 128256]
    python bench/linear_ce_paths.py filter [--rows 1024 --hidden 256 --vocab 32000]
    python bench/linear_ce_paths.py budgets [--rows 1024 --hidden 1024 --vocab 128256]
    python bench/linear_ce_paths.py kernels [--rows 1024 --hidden 1024 --cols 409]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import logitkit
from logitkit.testing import references


def best_seconds(fn: Callable[[], object], repeats: int = 1, warm_up: bool = False) -> float:
    if warm_up:
        fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fwd_bwd(loss_fn: Callable, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> Callable:
    def step() -> tuple:
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss_fn(h, w, target).backward()
        return h.grad, w.grad

    return step


def routes(args: argparse.Namespace) -> None:
    n, d, v = args.rows, args.hidden, args.vocab
    g = torch.Generator().manual_seed(0)
    print(f"CPU: {logitkit.build_info()['cpu_capability']}, threads {torch.get_num_threads()}; N={n} D={d} V={v}")
    print("GFLOP/s: 8 N D V per fwd+bwd for logitkit (forward, recompute, two gradient GEMMs), 6 N D V for the")
    print("materialised loss and torch chunked; torch.mm: one N x D x V GEMM (2 N D V) in the same dtype.")
    for dtype in [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[x] for x in args.dtypes]:
        hidden = torch.randn(n, d, generator=g).to(dtype)
        weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
        target = torch.randint(0, v, (n,), generator=g)
        mm = best_seconds(functools.partial(torch.mm, hidden, weight.T), 1)
        rows = {"torch.mm (one GEMM)": (mm, 2 * n * d * v)}
        rows["materialised"] = (
            best_seconds(fwd_bwd(lambda h, w, t: F.cross_entropy(h @ w.T, t), hidden, weight, target), 1),
            6 * n * d * v,
        )
        if hasattr(F, "linear_cross_entropy"):
            rows["torch chunked"] = (
                best_seconds(fwd_bwd(F.linear_cross_entropy, hidden, weight, target), 1),
                6 * n * d * v,
            )
        forced = ["auto"] if dtype == torch.float32 else ["auto", "native"]
        for route in forced:
            os.environ["LOGITKIT_CPU_GEMM"] = route
            path = logitkit.gemm_path(dtype).path
            seconds = best_seconds(fwd_bwd(logitkit.linear_cross_entropy, hidden, weight, target), 1)
            rows[f"logitkit ({route}: {path})"] = (seconds, 8 * n * d * v)
        os.environ.pop("LOGITKIT_CPU_GEMM", None)
        base = rows["materialised"][0]
        chunked = rows.get("torch chunked", (math.nan,))[0]
        print(f"\n{str(dtype).removeprefix('torch.')}: auto route = {logitkit.gemm_path(dtype)}")
        for name, (seconds, flops) in rows.items():
            print(
                f"  {name:34s} {seconds:8.3f} s  {flops / seconds / 1e9:7.1f} GFLOP/s  "
                f"x{seconds / base:5.2f} materialised  x{seconds / chunked:5.2f} chunked"
            )


def budgets(args: argparse.Namespace) -> None:
    """fwd+bwd time of logitkit per chunk_budget (the CPU default is 8 MiB), each dtype's auto route,
    interleaved: best of two rounds over the budgets."""
    n, d, v = args.rows, args.hidden, args.vocab
    g = torch.Generator().manual_seed(0)
    print(f"CPU: {logitkit.build_info()['cpu_capability']}, threads {torch.get_num_threads()}; N={n} D={d} V={v}")
    sizes = [4, 8, 16, 32]
    for dtype in [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[x] for x in args.dtypes]:
        hidden = torch.randn(n, d, generator=g).to(dtype)
        weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
        target = torch.randint(0, v, (n,), generator=g)
        best = dict.fromkeys(sizes, math.inf)
        for _ in range(2):
            for mib in sizes:
                loss = functools.partial(logitkit.linear_cross_entropy, chunk_budget=mib << 20)
                best[mib] = min(best[mib], best_seconds(fwd_bwd(loss, hidden, weight, target), 1))
        cells = "  ".join(f"{mib} MiB {best[mib]:.3f} s (x{best[mib] / best[4]:.2f})" for mib in sizes)
        print(f"{str(dtype).removeprefix('torch.')} ({logitkit.gemm_path(dtype).path}): {cells}")


def kernels(args: argparse.Namespace) -> None:
    """GFLOP/s of the native route's bf16 GEMM, per micro-kernel this CPU runs (AMX-BF16,
    AVX512-BF16), against torch.mm in bf16 and fp32, on the three GEMMs of one loss tile of
    N tokens x C vocabulary columns (at N = D = 1024, C = 409 is the tile of a 4 MiB budget,
    819 that of the CPU's 8 MiB default), operands as the loss passes them (weight rows and
    gradient tiles as transposed views). Interleaved, best of --repeats rounds."""
    from logitkit._loader import _C

    n, d, c = args.rows, args.hidden, args.cols
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).bfloat16()
    weight_rows = torch.randn(c, d, generator=g).bfloat16()
    grad_tile = torch.randn(n, c, generator=g).bfloat16()
    shapes = {
        "logits  h @ w^T": (hidden, weight_rows.t()),
        "grad_h  g @ w": (grad_tile, weight_rows),
        "grad_w  g^T @ h": (grad_tile.t(), hidden),
    }
    units = _C.cpu_bf16_gemm_units()
    print(f"CPU: {logitkit.build_info()['cpu_capability']}, threads {torch.get_num_threads()}; bf16 units: {units}")
    print(f"N={n} D={d} C={c}; GFLOP/s (2 m n k), ratio to torch.mm bf16 in brackets")
    for name, (a, b) in shapes.items():
        out = torch.empty(a.shape[0], b.shape[1])
        impls: dict[str, Callable[[], object]] = {
            u: functools.partial(
                _C.cpu_bf16_gemm,
                a.shape[0],
                b.shape[1],
                a.shape[1],
                a.data_ptr(),
                *a.stride(),
                b.data_ptr(),
                *b.stride(),
                out.data_ptr(),
                out.stride(0),
                False,
                u,
            )
            for u in units
        }
        impls["torch.mm bf16"] = functools.partial(torch.mm, a, b)
        a32, b32 = a.float(), b.float()
        impls["torch.mm fp32"] = functools.partial(torch.mm, a32, b32)
        best = dict.fromkeys(impls, math.inf)
        for _ in range(args.repeats):
            for key, fn in impls.items():
                best[key] = min(best[key], best_seconds(fn, 1))
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        cells = "  ".join(f"{key} {flops / t / 1e9:6.0f} ({best['torch.mm bf16'] / t:4.2f})" for key, t in best.items())
        print(f"  {name:16s} {a.shape[0]}x{a.shape[1]}x{b.shape[1]}: {cells}")


def peaked_problem(n: int, d: int, v: int, dtype: torch.dtype) -> tuple:
    """Zipf-distributed targets and hidden states that predict them (peaked softmax rows)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)
    target = torch.multinomial(1.0 / torch.arange(1, v + 1, dtype=torch.float64), n, replacement=True, generator=g)
    direction = weight[target] / weight[target].norm(dim=1, keepdim=True)
    hidden = 11.0 * direction + 0.5 * torch.randn(n, d, generator=g)  # z_target ~ 11: p(target) ~ 0.5
    return hidden.to(dtype), weight.to(dtype), target


def filtering(args: argparse.Namespace) -> None:
    n, d, v = args.rows, args.hidden, args.vocab
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hidden, weight, target = peaked_problem(n, d, v, dtype)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss_ref = references.linear_cross_entropy(hr, wr, target)
    loss_ref.backward()
    p_target = (-references.linear_cross_entropy(hidden.double(), weight.double(), target, reduction="none")).exp()
    print(
        f"CPU: {logitkit.build_info()['cpu_capability']}; {args.dtype} N={n} D={d} V={v}; loss {loss_ref.item():.3f},"
    )
    print(f"median p(target) {p_target.median().item():.3f}")
    print(f"{'grad_filter_eps':>16s} {'backward s':>10s} {'speed-up':>8s} {'max err dh':>10s} {'max err dw':>10s}")
    exact_time = None
    for eps in (None, 2.0**-16, 2.0**-12, 2.0**-8):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = logitkit.linear_cross_entropy(h, w, target, grad_filter_eps=eps)
        loss.backward(retain_graph=True)  # warm-up
        h.grad = w.grad = None
        start = time.perf_counter()
        loss.backward()
        seconds = time.perf_counter() - start
        exact_time = exact_time or seconds
        err_h = (h.grad.double() - hr.grad).abs().max().item()
        err_w = (w.grad.double() - wr.grad).abs().max().item()
        print(f"{eps!s:>16s} {seconds:10.3f} {exact_time / seconds:8.2f} {err_h:10.2e} {err_w:10.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["routes", "filter", "budgets", "kernels"])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--cols", type=int, default=409, help="kernels: vocabulary columns per tile")
    parser.add_argument("--repeats", type=int, default=10, help="kernels: interleaved rounds")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="filter: the inputs' dtype")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], help="routes, budgets: dtypes")
    args = parser.parse_args()
    if args.what == "kernels":
        args.hidden = args.hidden or 1024
        kernels(args)
    elif args.what in ("routes", "budgets"):
        args.hidden, args.vocab = args.hidden or 1024, args.vocab or 128256
        (routes if args.what == "routes" else budgets)(args)
    else:
        args.hidden, args.vocab = args.hidden or 256, args.vocab or 32000
        filtering(args)


if __name__ == "__main__":
    main()
