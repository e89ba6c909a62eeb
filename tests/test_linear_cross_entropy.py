"""logitkit.linear_cross_entropy on every backend, against the fp64
materialised reference of logitkit.testing: F.cross_entropy on
softcap((hidden @ W.T + b) / T), plus the z-loss term; and the fake kernels
of its ops against the C++ checks."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import logitkit
from logitkit._layout import LceStateField, column, normaliser_tensor
from logitkit.testing import assert_close, assert_no_worse_than_torch, references, tolerances, use_backend

REDUCTIONS = ["none", "mean", "sum"]
lce = logitkit.linear_cross_entropy
reference = references.linear_cross_entropy


def make_problem(lead=(2, 5), d=16, v=37, dtype=torch.float32, bias=False, class_weight=False, ignore=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, d, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(d))).to(dtype)
    target = torch.randint(0, v, lead, generator=g)
    for idx in ignore:
        target.view(-1)[idx] = -100
    b = (torch.randn(v, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    cw = (torch.rand(v, generator=g, dtype=torch.float64) + 0.5).float() if class_weight else None
    return hidden, weight, target, b, cw


def run_case(
    backend, problem, *, reduction="mean", grad_seed=1, check_grads=True, tol=None, no_worse_factor=None, **options
):
    """Loss and gradients of logitkit vs the fp64 reference (same rounded inputs)."""
    hidden, weight, target, bias, cw = problem
    dtype = hidden.dtype
    leaves = [backend.tensor(t).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_leaves = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = lce(
        leaves[0],
        leaves[1],
        backend.tensor(target),
        bias=leaves[2],
        class_weight=None if cw is None else backend.tensor(cw),
        reduction=reduction,
        **options,
    )
    ref_options = {k: v for k, v in options.items() if k != "chunk_budget"}
    ref = reference(
        ref_leaves[0], ref_leaves[1], target, bias=ref_leaves[2], class_weight=cw, reduction=reduction, **ref_options
    )
    assert out.dtype == torch.float32  # the loss is float32 whatever the input dtype (out_dtype=None)
    atol, rtol = tol or tolerances.LINEAR_CROSS_ENTROPY[dtype]
    assert_close(out, ref, atol, rtol, f"loss {reduction} {options}")
    if not check_grads:
        return out
    # Non-uniform upstream gradient for "none".
    grad = torch.rand(ref.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64) + 0.5
    out.backward(backend.tensor(grad.to(dtype).float()))
    ref.backward(grad.to(dtype).double())
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        if leaf is None:
            continue
        scale = max(ref_leaf.grad.abs().max().item(), 1e-2)  # V = 1: the exact gradient is 0
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, ref_leaf.grad, atol * scale, rtol, f"grad {name} {reduction} {options}")
    if dtype != torch.float32:
        assert_no_worse_than_materialised(
            problem, reduction, grad, out, leaves, ref, ref_leaves, ref_options, no_worse_factor
        )
    return out


def assert_no_worse_than_materialised(problem, reduction, grad, out, leaves, ref, ref_leaves, options, factor=None):
    """bf16/fp16: the loss and gradients are no less accurate than the materialised loss computed
    in the same dtype (the fp64 reference's definition evaluated in that dtype)."""
    hidden, weight, target, bias, cw = problem
    plain_leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    plain = reference(
        plain_leaves[0],
        plain_leaves[1],
        target,
        bias=plain_leaves[2],
        class_weight=cw,
        reduction=reduction,
        dtype=hidden.dtype,
        **options,
    )
    plain.backward(grad.to(plain.dtype))
    factor = {} if factor is None else {"factor": factor}
    assert_no_worse_than_torch(out, plain, ref, what=f"loss {reduction} {options}", **factor)
    for name, leaf, plain_leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, plain_leaves, ref_leaves):
        if leaf is not None:
            what = f"grad {name} {options}"
            assert_no_worse_than_torch(leaf.grad, plain_leaf.grad, ref_leaf.grad, what=what, **factor)


OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "class_weight": {"class_weight": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "z_loss": {"z_loss": 1e-2},
    "temperature": {"temperature": 0.7},
    "ignore_index": {"ignore": (1, 4, 7)},
    "all": {
        "bias": True,
        "class_weight": True,
        "label_smoothing": 0.2,
        "softcap": 2.5,
        "z_loss": 1e-3,
        "temperature": 1.3,
        "ignore": (0, 3),
    },
}


def split_options(spec):
    spec = dict(spec)
    problem_kw = {k: spec.pop(k) for k in ("bias", "class_weight", "ignore") if k in spec}
    return problem_kw, spec


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_match_reference(backend, option, reduction):
    problem_kw, options = split_options(OPTIONS[option])
    problem = make_problem(**problem_kw)
    # A small budget: 4 vocabulary columns per tile, so V = 37 is not a multiple.
    run_case(backend, problem, reduction=reduction, chunk_budget=4 * 40, **options)


@pytest.mark.parametrize("cpu_gemm", ["fp32", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_gemm_paths(backend, monkeypatch, cpu_gemm, dtype, option, reduction):
    """Both bf16/fp16 GEMM routes (fp32 on exact upcasts; native operands with fp32 accumulation
    and the gradient tile rounded to the input dtype), forced with LOGITKIT_CPU_GEMM, for every
    option and reduction: errors vs fp64 within 1.5x those of the materialised loss in the same
    dtype (plus one rounding unit). The emulated CUDA backend always takes the native route."""
    if backend.name == "emulated-cuda" and cpu_gemm == "fp32":
        pytest.skip("the emulated CUDA backend has the native route only")
    if backend.name == "cuda":
        pytest.skip("LOGITKIT_CPU_GEMM applies to CPU tensors")
    monkeypatch.setenv("LOGITKIT_CPU_GEMM", cpu_gemm)
    problem_kw, options = split_options(OPTIONS[option])
    problem = make_problem(dtype=dtype, v=301, d=64, lead=(24,), **problem_kw)
    run_case(backend, problem, reduction=reduction, chunk_budget=64 * 1024, no_worse_factor=1.5, **options)


def test_gemm_path_reports_the_route(monkeypatch):
    assert logitkit.gemm_path(torch.float32).path == "fp32"
    assert logitkit.gemm_path(torch.bfloat16, "cuda").path == "native"
    for forced, path in (("native", "native"), ("fp32", "fp32_upcast")):
        monkeypatch.setenv("LOGITKIT_CPU_GEMM", forced)
        got = logitkit.gemm_path(torch.bfloat16)
        assert got.path == path and "LOGITKIT_CPU_GEMM" in got.reason
    monkeypatch.delenv("LOGITKIT_CPU_GEMM")
    # fp16: no CPU unit logitkit drives multiplies fp16 with fp32 accumulation.
    auto = logitkit.gemm_path(torch.float16, "cpu")
    assert auto.path == "fp32_upcast" and "AVX512-FP16" in auto.reason
    bf16 = logitkit.gemm_path(torch.bfloat16)
    units = logitkit._loader._C.cpu_bf16_gemm_units()
    if not units:  # no AMX-BF16 / AVX512-BF16: no probe, fp32 upcasts
        assert bf16.path == "fp32_upcast" and "absent" in bf16.reason
    else:  # the probe ran with the best micro-kernel, and its reason names it
        assert f"logitkit's {units[0]} GEMM" in bf16.reason
    monkeypatch.setenv("LOGITKIT_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="LOGITKIT_CPU_GEMM"):
        logitkit.gemm_path(torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        logitkit.gemm_path(torch.float64)


def bf16_gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool, units: str) -> None:
    """The native CPU route's bf16 GEMM (csrc/cpu/bf16_gemm.h) on `units`, on tensors of any strides."""
    from logitkit._loader import _C

    (m, k), n = a.shape, b.shape[1]
    a_view, b_view = (a.data_ptr(), *a.stride()), (b.data_ptr(), *b.stride())
    _C.cpu_bf16_gemm(m, n, k, *a_view, *b_view, out.data_ptr(), out.stride(0), accumulate, units)


BF16_UNITS = ["amx_bf16", "avx512_bf16"]


@pytest.mark.parametrize("units", BF16_UNITS)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
# Odd sizes; K = 1025 spans several K blocks (256 bf16 for AVX512-BF16, 1024 for AMX) with an odd
# tail, N = 2100 two column blocks (2048), M = 300 several row blocks and a partial micro-tile.
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 3, 5), (9, 17, 33), (33, 1025, 70), (300, 600, 2100), (40, 2100, 40)])
def test_cpu_bf16_gemm(m, k, n, layout, accumulate, units):
    """out = a @ b (+ out) with bf16 operands, fp32 result: within the fp32 accumulation bound
    |error| <= (K + 2) u (|a| @ |b| + |out|), u = 2^-24, of the exact product, for transposed
    operands ('t': a column-major view) and an output with row padding; each micro-kernel this
    CPU has (skipped for the others: the route never runs them here)."""
    if units not in logitkit._loader._C.cpu_bf16_gemm_units():
        pytest.skip(f"this CPU (or OS) cannot run {units}")
    g = torch.Generator().manual_seed(m * 7 + k)
    a = torch.randn(k, m, generator=g).bfloat16().t() if layout[0] == "t" else torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(n, k, generator=g).bfloat16().t() if layout[1] == "t" else torch.randn(k, n, generator=g).bfloat16()
    padded = torch.randn(m, n + 3, generator=g)
    before = padded.clone()
    out = padded[:, :n]
    bf16_gemm(out, a, b, accumulate, units)
    exact = a.double() @ b.double() + (before[:, :n].double() if accumulate else 0.0)
    bound = (k + 2) * 2.0**-24 * (a.double().abs() @ b.double().abs() + before[:, :n].double().abs())
    assert ((out.double() - exact).abs() <= bound).all()
    assert torch.equal(padded[:, n:], before[:, n:])  # the row padding is left alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_half_dtypes(backend, dtype, reduction):
    problem_kw, options = split_options(OPTIONS["all"])
    run_case(backend, make_problem(dtype=dtype, **problem_kw), reduction=reduction, **options)
    run_case(backend, make_problem(dtype=dtype), reduction=reduction, chunk_budget=4 * 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_out_dtype(backend, dtype):
    """The loss (and log-probs / entropy) come back in float32 by default; out_dtype rounds the
    float32 result once; anything but a floating-point dtype is rejected by name."""
    hidden, weight, target, _, _ = make_problem(dtype=dtype)
    h, w, t = backend.tensor(hidden), backend.tensor(weight), backend.tensor(target)
    for reduction in REDUCTIONS:
        loss = lce(h, w, t, reduction=reduction)
        assert loss.dtype == torch.float32
        rounded = lce(h, w, t, reduction=reduction, out_dtype=dtype)
        assert rounded.dtype == dtype and torch.equal(rounded, loss.to(dtype))
    log_prob, entropy = logitkit.linear_log_probs_and_entropy(h, w, t)
    assert log_prob.dtype == entropy.dtype == torch.float32
    pair = logitkit.linear_log_probs_and_entropy(h, w, t, out_dtype=dtype)
    assert pair[0].dtype == pair[1].dtype == dtype and torch.equal(pair[0], log_prob.to(dtype))
    module = logitkit.LinearCrossEntropyLoss(out_dtype=dtype)
    assert module(h, w, t).dtype == dtype
    with pytest.raises(TypeError, match="out_dtype"):
        lce(h, w, t, out_dtype=torch.int32)


@pytest.mark.parametrize("budget", [4, 4 * 8, 4 * 37, 4 * 100, 4 * 10 * 37, 1 << 26])
def test_chunk_budgets(backend, budget):
    # Tiles from 1 x 1 (4 bytes) through token-split tiles to a single tile.
    run_case(
        backend, make_problem(ignore=(2,)), reduction="none", chunk_budget=budget, label_smoothing=0.1, z_loss=1e-3
    )


def test_many_token_chunks_cpu():
    from conftest import Backend

    cpu = Backend("cpu")
    run_case(cpu, make_problem(lead=(300,), d=8, v=50, bias=True), reduction="mean", chunk_budget=4 * 40 * 3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_repeated_and_scaled_backward(backend, reduction):
    # Repeated backward (retain_graph) accumulates the same gradients again; a
    # scaled loss with a frozen bias scales them.
    hidden, weight, target, bias, cw = make_problem(bias=True, class_weight=True, ignore=(2,))
    kw = dict(
        class_weight=backend.tensor(cw),
        reduction=reduction,
        label_smoothing=0.1,
        z_loss=1e-2,
        softcap=4.0,
        temperature=0.8,
        chunk_budget=4 * 40,
    )
    h, w, b = (backend.tensor(x).requires_grad_() for x in (hidden, weight, bias))
    loss = lce(h, w, backend.tensor(target), bias=b, **kw)
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    loss.backward()  # accumulates the same gradients again
    for x, g in zip((h, w, b), first):
        assert_close(x.grad, 2 * g, 1e-6, 1e-6, "second backward")
    h2, w2 = (backend.tensor(x).requires_grad_() for x in (hidden, weight))
    (3.0 * lce(h2, w2, backend.tensor(target), bias=backend.tensor(bias), **kw)).backward()
    for x, g in zip((h2, w2), first):
        assert_close(x.grad, 3 * g, 1e-5 * g.abs().max().item(), 1e-5, "scaled loss")


@pytest.mark.parametrize("shape", [{"v": 1}, {"d": 1}, {"v": 1, "d": 1}, {"lead": (7,)}, {"lead": (2, 3, 2)}], ids=str)
def test_edge_shapes(backend, shape):
    for reduction in REDUCTIONS:
        run_case(backend, make_problem(**shape), reduction=reduction, label_smoothing=0.1)


def test_all_ignored_batch(backend):
    hidden, weight, target, _, _ = make_problem()
    target.fill_(-100)
    h = backend.tensor(hidden).requires_grad_()
    w = backend.tensor(weight).requires_grad_()
    t = backend.tensor(target)
    for reduction in ("none", "sum"):
        out = lce(h, w, t, reduction=reduction, z_loss=1e-2)
        assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
        out.sum().backward()
        assert torch.equal(h.grad.cpu(), torch.zeros_like(hidden)) and torch.equal(
            w.grad.cpu(), torch.zeros_like(weight)
        )
        h.grad = w.grad = None
    out = lce(h, w, t, reduction="mean")
    assert torch.isnan(out).item()  # 0 / 0, as F.cross_entropy
    assert torch.isnan(F.cross_entropy((hidden @ weight.T).reshape(-1, 37), target.reshape(-1))).item()
    out.backward()
    assert torch.equal(h.grad.cpu(), torch.zeros_like(hidden))  # no NaN gradients


def test_return_lse(backend):
    hidden, weight, target, _, _ = make_problem()
    _loss, lse = lce(
        backend.tensor(hidden),
        backend.tensor(weight),
        backend.tensor(target),
        return_lse=True,
        temperature=0.5,
        chunk_budget=4 * 40,
    )
    assert lse.shape == target.shape and lse.dtype == torch.float32
    assert_close(lse, torch.logsumexp(hidden.double() @ weight.double().T / 0.5, -1), 1e-5, 1e-5, "lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_target_gradient_when_nearly_certain(backend, dtype):
    # p_y = 1 - O(1e-5): dL/dx_y = p_y - 1 must keep its relative precision
    # (a bf16 p_y rounds to 1 and gives 0). With weight = I the hidden
    # gradient is the logits gradient itself.
    v = 8
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, v, generator=g, dtype=torch.float64)
    target = torch.tensor([1, 5, 0, 7])
    hidden[torch.arange(4), target] = torch.tensor([12.0, 14.0, 11.0, 13.0], dtype=torch.float64)
    hidden = hidden.to(dtype)
    weight = torch.eye(v, dtype=dtype)
    h = backend.tensor(hidden).requires_grad_()
    lce(h, backend.tensor(weight), backend.tensor(target), reduction="sum").backward()
    expected = torch.softmax(hidden.double(), -1) - F.one_hot(target, v).double()
    got = h.grad.double().cpu()
    assert (got[torch.arange(4), target] < 0).all()
    # Limit: s = sum exp(z - m) = 1 + O(1e-5) carries fp32 rounding of ~6e-8
    # absolute, so p_y - 1 is good to ~1e-7 absolute (bf16 logits: 0).
    assert_close(got, expected, 2e-7, 1e-5 if dtype == torch.float32 else 8e-3, "near-certain target gradient")


def test_matches_torch_linear_cross_entropy(backend):
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    hidden, weight, target, bias, cw = make_problem(lead=(10,), bias=True, class_weight=True, ignore=(3,))
    # label_smoothing = 0 takes torch's chunked path, 0.1 its reference fallback.
    for reduction, ls in [(r, ls) for r in REDUCTIONS for ls in (0.0, 0.1)]:
        ours = lce(
            backend.tensor(hidden),
            backend.tensor(weight),
            backend.tensor(target),
            bias=backend.tensor(bias),
            class_weight=backend.tensor(cw),
            reduction=reduction,
            label_smoothing=ls,
            chunk_budget=4 * 40,
        )
        opts = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
        theirs = F.linear_cross_entropy(
            hidden,
            weight,
            target,
            linear_bias=bias,
            weight=cw,
            reduction=reduction,
            ignore_index=-100,
            label_smoothing=ls,
            options=opts,
        )
        assert_close(ours, theirs, 1e-5, 1e-5, f"vs F.linear_cross_entropy {reduction} {ls}")


def test_bad_input(backend):
    hidden, weight, target, _, _ = make_problem()
    h, w = backend.tensor(hidden), backend.tensor(weight)
    bad = target.clone()
    bad[1, 2] = 37
    with pytest.raises(ValueError, match="target"):
        lce(h, w, backend.tensor(bad))
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="target"):
        lce(h, w, backend.tensor(bad))
    with pytest.raises(ValueError, match="weight"):
        lce(h, w[:, :3], backend.tensor(target))
    with pytest.raises(ValueError, match="target"):
        lce(h, w, backend.tensor(target[:1]))
    with pytest.raises(TypeError, match="weight"):
        lce(h, w.double(), backend.tensor(target))
    with pytest.raises(ValueError, match="bias"):
        lce(h, w, backend.tensor(target), bias=w[0])
    with pytest.raises(ValueError, match="reduction"):
        lce(h, w, backend.tensor(target), reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        lce(h, w, backend.tensor(target), softcap=0.0)


def test_opcheck(backend):
    # (No ignored token: its z_target is NaN, which opcheck does not compare as equal.)
    hidden, weight, target, bias, cw = make_problem(lead=(6,), bias=True, class_weight=True)
    h, w, t, b, c = (backend.tensor(x) for x in (hidden, weight, target, bias, cw))
    ops = backend.ops
    torch.library.opcheck(ops.linear_ce_stats, (h, w, t, b, c, -100, 2.0, 0.9, 4 * 40))
    stats = ops.linear_ce_stats(h, w, t, b, c, -100, 0.0, 1.0, 1 << 20)
    lse = normaliser_tensor(
        max=column(stats, LceStateField.MAX), log_sum_exp=column(stats, LceStateField.SUM_EXP).log()
    )
    coef = torch.randn(6, 4).to(h.device)
    torch.library.opcheck(ops.linear_ce_backward, (h, w, t, b, c, lse, coef, 0.0, 1.0, 4 * 40, True))
    torch.library.opcheck(ops.linear_ce_backward, (h, w, t, None, None, lse, coef, 2.0, 1.0, 1 << 20, False))


def test_module(backend):
    hidden, weight, target, _, _ = make_problem(ignore=(1,))
    loss_fn = logitkit.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)
    out = loss_fn(backend.tensor(hidden), backend.tensor(weight), backend.tensor(target))
    expected = reference(hidden, weight, target, label_smoothing=0.1, z_loss=1e-3)
    assert_close(out, expected, *tolerances.LINEAR_CROSS_ENTROPY[torch.float32], "module")


def test_torch_compile_fullgraph_with_ignored_rows():
    hidden, weight, target, _, _ = make_problem(ignore=(0, 1, 5, 9))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, w, t):
        return logitkit.linear_cross_entropy(h, w, t, label_smoothing=0.1, chunk_budget=4 * 40)

    out = step(h, w, target)
    out.backward()
    hr = hidden.double().requires_grad_()
    wr = weight.double().requires_grad_()
    ref = reference(hr, wr, target, label_smoothing=0.1)
    ref.backward()
    atol, rtol = tolerances.LINEAR_CROSS_ENTROPY[torch.float32]
    assert_close(out, ref, atol, rtol, "compiled loss")
    assert_close(h.grad, hr.grad, atol * hr.grad.abs().max().item(), rtol, "compiled grad")


def test_peak_memory_no_logits_buffer():
    # N * V * 4 = 64 MiB of fp32 logits; the chunked loss must stay far below.
    script = textwrap.dedent(
        """
        import torch, logitkit
        torch.set_num_threads(1)
        n, d, v = 256, 32, 65536
        h = torch.randn(n, d, requires_grad=True)
        w = (torch.randn(v, d) * 0.2).requires_grad_()
        t = torch.randint(0, v, (n,))
        # Touch gradient-sized buffers first so that they are part of the baseline.
        h.grad = torch.zeros_like(h); w.grad = torch.zeros_like(w); h.grad = w.grad = None
        g_h, g_w = torch.ones_like(h), torch.ones_like(w)
        del g_h, g_w
        kind = "%s"
        def peak():  # VmHWM: the peak resident set since the last reset
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        def reset_peak():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        if kind == "logitkit":
            logitkit.linear_cross_entropy(h[:4], w[:64], t[:4] %% 64, chunk_budget=1 << 20).backward()  # warm-up
        else:
            torch.nn.functional.cross_entropy(h[:4] @ w[:64].T, t[:4] %% 64).backward()
        h.grad = w.grad = None
        reset_peak()
        base = peak()
        if kind == "logitkit":
            loss = logitkit.linear_cross_entropy(h, w, t, chunk_budget=1 << 20)
        else:
            loss = torch.nn.functional.cross_entropy(h @ w.T, t)
        loss.backward()
        print((peak() - base) / 2**20)
        """
    )
    deltas = {}
    for kind in ("logitkit", "materialised"):
        res = subprocess.run([sys.executable, "-c", script % kind], capture_output=True, text=True, check=True)
        deltas[kind] = float(res.stdout.strip().splitlines()[-1])
    logits_mib = 256 * 65536 * 4 / 2**20
    assert deltas["materialised"] >= logits_mib, deltas  # the probe does see an N x V buffer
    assert deltas["logitkit"] < 0.25 * logits_mib, deltas


def test_log_probs_and_entropy(backend):
    hidden, weight, target, bias, _ = make_problem(bias=True)
    h, w, b = (backend.tensor(x).requires_grad_() for x in (hidden, weight, bias))
    lp, ent = logitkit.linear_log_probs_and_entropy(
        h, w, backend.tensor(target), bias=b, temperature=0.8, chunk_budget=4 * 40
    )
    hr, wr, br = (x.double().requires_grad_() for x in (hidden, weight, bias))
    lp_ref, ent_ref = references.linear_log_probs_and_entropy(hr, wr, target, bias=br, temperature=0.8)
    atol, rtol = tolerances.LINEAR_CROSS_ENTROPY[torch.float32]
    assert_close(lp, lp_ref, atol, rtol, "log_prob")
    assert_close(ent, ent_ref, atol, rtol, "entropy")
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    (lp * backend.tensor(g_lp) + ent * backend.tensor(g_ent)).sum().backward()
    (lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum().backward()
    for name, x, xr in (("hidden", h, hr), ("weight", w, wr), ("bias", b, br)):
        assert_close(x.grad, xr.grad, atol * xr.grad.abs().max().item(), rtol, f"grad {name}")


def masked_problem(dtype, n=8, d=16, v=100, masked=(slice(0, 30), slice(50, 60)), seed=0):
    """A vocabulary mask as a bias of -inf (a block at the start, so that small tiles are entirely
    masked, and one inside); targets among the unmasked entries."""
    hidden, weight, _, _, _ = make_problem(lead=(n,), d=d, v=v, dtype=dtype, seed=seed)
    bias = torch.zeros(v, dtype=dtype)
    for block in masked:
        bias[block] = -math.inf
    allowed = torch.nonzero(bias == 0).squeeze(1)
    target = allowed[torch.randint(0, allowed.numel(), (n,), generator=torch.Generator().manual_seed(seed))]
    return hidden, weight, target, bias, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("budget", [256, 1024, None], ids=str)
def test_masked_logits(backend, dtype, budget):
    """A bias holding -inf: finite loss and gradients equal to torch's, whatever the tiling (at
    256 B tiles lie entirely in the masked block), for the loss and with z-loss and temperature."""
    options = {} if budget is None else {"chunk_budget": budget}
    problem = masked_problem(dtype)
    run_case(backend, problem, reduction="mean", **options)
    run_case(backend, problem, reduction="none", z_loss=1e-3, temperature=0.7, **options)


def test_masked_logits_default_budget_large_hidden(backend):
    """The reported case: bf16, D = 4096, V = 1000 with 300 masked entries, default budget."""
    problem = masked_problem(torch.bfloat16, n=4, d=4096, v=1000, masked=(slice(0, 300),), seed=2)
    loss = run_case(backend, problem, reduction="mean")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("budget", [256, None], ids=str)
def test_masked_log_probs_and_entropy(backend, budget):
    """Entropy and log-probabilities with -inf logits: 0 log 0 = 0, finite gradients."""
    hidden, weight, target, bias, _ = masked_problem(torch.float32)
    options = {} if budget is None else {"chunk_budget": budget}
    h, w = backend.tensor(hidden).requires_grad_(), backend.tensor(weight).requires_grad_()
    lp, ent = logitkit.linear_log_probs_and_entropy(h, w, backend.tensor(target), bias=backend.tensor(bias), **options)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp_ref, ent_ref = references.linear_log_probs_and_entropy(hr, wr, target, bias=bias.double())
    atol, rtol = tolerances.LINEAR_CROSS_ENTROPY[torch.float32]
    assert_close(lp, lp_ref, atol, rtol, "masked log_prob")
    assert_close(ent, ent_ref, atol, rtol, "masked entropy")
    (lp.sum() + ent.sum()).backward()
    (lp_ref.sum() + ent_ref.sum()).backward()
    for name, x, xr in (("hidden", h, hr), ("weight", w, wr)):
        assert_close(x.grad, xr.grad, atol * xr.grad.abs().max().item(), rtol, f"masked grad {name}")


def peaked_problem(n=64, d=32, v=500, seed=0):
    """Zipf-like targets with a hidden state that predicts them: most of each row's probability on
    its target, a long tail of tiny probabilities (what gradient filtering is for)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    target = torch.multinomial(1.0 / ranks, n, replacement=True, generator=g)
    hidden = 6.0 * weight[target] * math.sqrt(d) / weight[target].norm(dim=1, keepdim=True)
    hidden = hidden + 0.3 * torch.randn(n, d, generator=g)
    return hidden, weight, target


def test_grad_filter_eps(backend):
    """grad_filter_eps: the loss is unchanged; a threshold below every gradient changes nothing;
    a real one (1e-6 of the largest probability coefficient) keeps the gradients within a
    tolerance of the fp64 reference; a coarse one (1e-2) skips some tiles, and the error stays
    within the bound of the dropped terms; skipped first tiles leave zeros, not garbage."""
    hidden, weight, target = peaked_problem()
    # Tiles of 64 x 64 logits, 8 per pass. (Smaller tiles mean more launches, each a block of OS
    # threads per token when emulated.) At eps = 1e-6 no tile here is below the threshold (each
    # holds some p >= 1e-6); at 1e-2 some are.
    budget = 4 * 64 * 64

    def run(**kw):
        h, w = backend.tensor(hidden).requires_grad_(), backend.tensor(weight).requires_grad_()
        loss = lce(h, w, backend.tensor(target), chunk_budget=budget, **kw)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    exact, tiny, filtered = run(), run(grad_filter_eps=1e-30), run(grad_filter_eps=1e-6)
    for a, b in zip(exact, tiny):
        assert torch.equal(a, b)
    assert torch.equal(exact[0], filtered[0])
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    reference(hr, wr, target).backward()
    for got, ref in zip(filtered[1:], (hr.grad, wr.grad)):
        assert_close(got, ref, 1e-5 * ref.abs().max().item(), 1e-4, "filtered gradient")
    # Each dropped |dL/dz| is below eps * max|a| = eps / N (mean): the error of grad_weight's row
    # v is within eps / N * sum_n |h_n|, that of grad_hidden's row n within eps / N * sum_v |w_v|.
    eps, n = 1e-2, hidden.shape[0]
    coarse = run(grad_filter_eps=eps)
    assert not torch.equal(coarse[2], exact[2]) and coarse[2].any(), "some tiles skipped, not all"
    for got, ref, leaf in zip(coarse[1:], (hr.grad, wr.grad), (weight, hidden)):
        bound = eps / n * leaf.double().abs().sum(0) + 1e-5 * ref.abs().max().item()
        assert ((got.cpu().double() - ref).abs() <= bound).all(), "coarse filtering beyond its bound"
    everything = run(grad_filter_eps=1e30)  # every tile skipped: zero gradients
    assert not everything[1].any() and not everything[2].any()
    h, w, t = backend.tensor(hidden), backend.tensor(weight), backend.tensor(target)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="grad_filter_eps"):
            lce(h, w, t, grad_filter_eps=bad)


@pytest.mark.parametrize("threads, schedule", [(32, "in_order"), (129, "random"), (256, "reversed")])
def test_emulated_launch_shapes(threads, schedule):
    """The CUDA chunk kernels under block sizes of 1, 5 (partial last warp) and 8 warps with each
    thread schedule: every option, so every field of the per-token state (softmax state, target
    logit, label-smoothing sum) goes through the block reduction."""
    from conftest import EMULATED_DEFAULTS, Backend, emulated_configure
    from logitkit import _loader

    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    emulated = Backend("emulated-cuda")
    emulated_configure(threads_per_block=threads, max_elements_per_block=4096, schedule=schedule, seed=threads)
    try:
        problem_kw, options = split_options(OPTIONS["all"])
        with use_backend(emulated.name):
            run_case(emulated, make_problem(v=300, **problem_kw), reduction="mean", **options)
    finally:
        emulated_configure(**EMULATED_DEFAULTS)


# ---------------------------------------------------------------------------
# Fake kernels: the C++ argument checks, with the C++ messages
# ---------------------------------------------------------------------------


def op_inputs(backend):
    """Valid arguments of linear_ce_stats and linear_ce_backward (as dicts, to be spoiled one by one)."""
    hidden, weight, target, bias, cw = make_problem(lead=(6,), bias=True, class_weight=True)
    tensors = dict(hidden=hidden, weight=weight, target=target, bias=bias, class_weight=cw)
    tensors = {k: backend.tensor(v) for k, v in tensors.items()}
    scalars = dict(softcap=2.0, temperature=0.9, chunk_budget=4 * 40)
    per_token = dict(normaliser=backend.tensor(torch.zeros(6, 2)), coefficients=backend.tensor(torch.zeros(6, 4)))
    return {**tensors, "ignore_index": -100, **scalars}, {**tensors, **per_token, **scalars, "bias_grad": True}


BAD_INPUTS = {  # name -> (argument, spoiled value from the valid one)
    "hidden int64": ("hidden", lambda h: h.long()),
    "hidden 0-d": ("hidden", lambda h: h[0, 0]),
    "hidden 3-D": ("hidden", lambda h: h[None]),
    "weight 1-D": ("weight", lambda w: w[0]),
    "weight float64": ("weight", lambda w: w.double()),
    "weight D": ("weight", lambda w: w[:, :5]),
    "weight V = 0": ("weight", lambda w: w[:0]),
    "target int32": ("target", lambda t: t.int()),
    "target N": ("target", lambda t: t[:5]),
    "target 2-D": ("target", lambda t: t[:, None]),
    "softcap < 0": ("softcap", lambda c: -1.0),
    "softcap NaN": ("softcap", lambda c: math.nan),
    "temperature 0": ("temperature", lambda c: 0.0),
    "temperature inf": ("temperature", lambda c: math.inf),
    "chunk_budget 0": ("chunk_budget", lambda c: 0),
    "bias int64": ("bias", lambda b: b.long()),
    "bias V": ("bias", lambda b: b[:36]),
    "class_weight 2-D": ("class_weight", lambda c: c[None]),
}
BAD_BACKWARD_INPUTS = {
    "normaliser width": ("normaliser", lambda n: torch.zeros(6, 3, device=n.device)),
    "normaliser float64": ("normaliser", lambda n: n.double()),
    "coefficients width": ("coefficients", lambda c: torch.zeros(6, 5, device=c.device)),
    "coefficients N": ("coefficients", lambda c: c[:5]),
}


def raised(fn, *args):
    """(type, message) of the exception fn(*args) raises."""
    with pytest.raises(Exception) as info:
        fn(*args)
    return type(info.value), str(info.value)


def spoil(args, case):
    arg, change = case
    return {**args, arg: change(args[arg])}


def fake_call(op, args):
    with FakeTensorMode() as mode:
        fakes = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        return op(*fakes.values())


@pytest.mark.parametrize("name", [*BAD_INPUTS, *BAD_BACKWARD_INPUTS])
def test_fake_kernels_check_like_cpp(backend, name):
    """Every C++ argument check of linear_ce_stats and linear_ce_backward fails the same way (type
    and message) in the fake kernel, where torch.compile and opcheck see it."""
    stats_args, backward_args = op_inputs(backend)
    calls = [(backend.ops.linear_ce_backward, backward_args)]
    if name in BAD_INPUTS:
        calls.append((backend.ops.linear_ce_stats, stats_args))
    for op, args in calls:
        bad = spoil(args, {**BAD_INPUTS, **BAD_BACKWARD_INPUTS}[name])
        eager = raised(op, *bad.values())
        assert eager[1].startswith("logitkit.linear_cross_entropy"), eager
        assert raised(fake_call, op, bad) == eager


def test_fake_kernels_check_devices(backend):
    if backend.device != "cuda":
        pytest.skip("needs tensors on two devices")
    stats_args, _ = op_inputs(backend)
    for arg in ("weight", "target", "bias", "class_weight"):
        bad = {**stats_args, arg: stats_args[arg].cpu()}
        eager = raised(backend.ops.linear_ce_stats, *bad.values())
        assert f"{arg} is on cpu but hidden is on cuda:0" in eager[1]
        assert raised(fake_call, backend.ops.linear_ce_stats, bad) == eager


@pytest.mark.parametrize("name", ["weight float64", "target N", "softcap NaN", "bias V"])
def test_compile_reports_bad_input_at_trace_time(backend, name):
    stats_args, _ = op_inputs(backend)
    bad = spoil(stats_args, BAD_INPUTS[name])
    _, message = raised(backend.ops.linear_ce_stats, *bad.values())
    compiled = torch.compile(
        lambda: backend.ops.linear_ce_stats(*bad.values()), fullgraph=True, backend="aot_eager", dynamic=False
    )
    with pytest.raises(Exception, match=re.escape(message)):
        compiled()


def test_default_chunk_budget(backend):
    """chunk_budget=None is the device's default: the measured 8 MiB on CPU (the same result as
    passing it), on CUDA 1/256 of the device memory within CUDA_CHUNK_BUDGET_RANGE."""
    from logitkit.linear_ce import CUDA_CHUNK_BUDGET_RANGE

    budget = logitkit.default_chunk_budget(backend.device)
    if backend.device == "cpu":
        assert budget == logitkit.DEFAULT_CHUNK_BUDGET
    else:
        assert CUDA_CHUNK_BUDGET_RANGE[0] <= budget <= CUDA_CHUNK_BUDGET_RANGE[1]
    hidden, weight, target, _, _ = make_problem()
    h, w, t = backend.tensor(hidden), backend.tensor(weight), backend.tensor(target)
    assert torch.equal(lce(h, w, t), lce(h, w, t, chunk_budget=budget))
