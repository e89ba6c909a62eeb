"""logitkit.linear_cross_entropy on every backend, against an fp64
materialised reference: F.cross_entropy on softcap((hidden @ W.T + b) / T),
plus the z-loss term."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import logitkit
from logitkit.linear_ce import _linear_cross_entropy

REDUCTIONS = ["none", "mean", "sum"]


def lce(backend, hidden, weight, target, **kw):
    return _linear_cross_entropy(backend.namespace, hidden, weight, target, **kw)


def reference(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              class_weight=None, softcap=None, z_loss=0.0, temperature=1.0):
    """fp64, with the N x V logits materialised (differentiable)."""
    x = hidden.double() @ weight.double().T
    if bias is not None:
        x = x + bias.double()
    z = x / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    v = weight.shape[0]
    z2, t1 = z.reshape(-1, v), target.reshape(-1)
    cw = None if class_weight is None else class_weight.double()
    loss = F.cross_entropy(z2, t1, weight=cw, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = t1 != ignore_index
        zl = torch.where(valid, z_loss * torch.logsumexp(z2, -1) ** 2, torch.zeros((), dtype=z2.dtype))
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            w_y = valid.double() if cw is None else cw[torch.where(valid, t1, 0)] * valid
            loss = loss + zl.sum() / w_y.sum()
    return loss.reshape(target.shape) if reduction == "none" else loss


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


def assert_close(actual, expected, atol, rtol, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    err = (actual - expected).abs()
    ok = (err <= atol + rtol * expected.abs()) | (torch.isnan(actual) & torch.isnan(expected))
    assert bool(ok.all()), f"{what}: max abs error {err.max().item():.3e} (atol {atol}, rtol {rtol})"


def run_case(backend, problem, *, reduction="mean", grad_seed=1, check_grads=True, tol=None, **options):
    """Loss and gradients of logitkit vs the fp64 reference (same rounded inputs)."""
    hidden, weight, target, bias, cw = problem
    dtype = hidden.dtype
    leaves = [backend.tensor(t).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_leaves = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = lce(backend, leaves[0], leaves[1], backend.tensor(target), bias=leaves[2],
              class_weight=None if cw is None else backend.tensor(cw), reduction=reduction, **options)
    ref_options = {k: v for k, v in options.items() if k != "chunk_budget"}
    ref = reference(ref_leaves[0], ref_leaves[1], target, bias=ref_leaves[2], class_weight=cw, reduction=reduction,
                    **ref_options)
    assert out.dtype == dtype
    atol, rtol = tol or {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    assert_close(out, ref, atol, rtol, f"loss {reduction} {options}")
    if not check_grads:
        return out
    # Non-uniform upstream gradient for "none".
    grad = torch.rand(ref.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64) + 0.5
    out.backward(backend.tensor(grad.to(dtype)))
    ref.backward(grad.to(dtype).double())
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        if leaf is None:
            continue
        scale = max(ref_leaf.grad.abs().max().item(), 1e-2)  # V = 1: the exact gradient is 0
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, ref_leaf.grad, atol * scale, rtol, f"grad {name} {reduction} {options}")
    return out


OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "class_weight": {"class_weight": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "z_loss": {"z_loss": 1e-2},
    "temperature": {"temperature": 0.7},
    "ignore_index": {"ignore": (1, 4, 7)},
    "all": {"bias": True, "class_weight": True, "label_smoothing": 0.2, "softcap": 2.5, "z_loss": 1e-3,
            "temperature": 1.3, "ignore": (0, 3)},
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_half_dtypes(backend, dtype, reduction):
    problem_kw, options = split_options(OPTIONS["all"])
    run_case(backend, make_problem(dtype=dtype, **problem_kw), reduction=reduction, **options)
    run_case(backend, make_problem(dtype=dtype), reduction=reduction, chunk_budget=4 * 24)


@pytest.mark.parametrize("budget", [4, 4 * 8, 4 * 37, 4 * 100, 4 * 10 * 37, 1 << 26])
def test_chunk_budgets(backend, budget):
    # Tiles from 1 x 1 (4 bytes) through token-split tiles to a single tile.
    run_case(backend, make_problem(ignore=(2,)), reduction="none", chunk_budget=budget, label_smoothing=0.1,
             z_loss=1e-3)


def test_many_token_chunks_cpu():
    from conftest import Backend

    cpu = Backend("cpu", "cpu", "logitkit")
    run_case(cpu, make_problem(lead=(300,), d=8, v=50, bias=True), reduction="mean", chunk_budget=4 * 40 * 3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_repeated_and_scaled_backward(backend, reduction):
    # Repeated backward (retain_graph) accumulates the same gradients again; a
    # scaled loss with a frozen bias scales them.
    hidden, weight, target, bias, cw = make_problem(bias=True, class_weight=True, ignore=(2,))
    kw = dict(class_weight=backend.tensor(cw), reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=4.0,
              temperature=0.8, chunk_budget=4 * 40)
    h, w, b = (backend.tensor(x).requires_grad_() for x in (hidden, weight, bias))
    loss = lce(backend, h, w, backend.tensor(target), bias=b, **kw)
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    loss.backward()  # accumulates the same gradients again
    for x, g in zip((h, w, b), first):
        assert_close(x.grad, 2 * g, 1e-6, 1e-6, "second backward")
    h2, w2 = (backend.tensor(x).requires_grad_() for x in (hidden, weight))
    (3.0 * lce(backend, h2, w2, backend.tensor(target), bias=backend.tensor(bias), **kw)).backward()
    for x, g in zip((h2, w2), first):
        assert_close(x.grad, 3 * g, 1e-5 * g.abs().max().item(), 1e-5, "scaled loss")


@pytest.mark.parametrize("shape", [{"v": 1}, {"d": 1}, {"v": 1, "d": 1}, {"lead": (7,)}, {"lead": (2, 3, 2)}],
                         ids=str)
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
        out = lce(backend, h, w, t, reduction=reduction, z_loss=1e-2)
        assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
        out.sum().backward()
        assert torch.equal(h.grad.cpu(), torch.zeros_like(hidden)) and torch.equal(w.grad.cpu(), torch.zeros_like(weight))
        h.grad = w.grad = None
    out = lce(backend, h, w, t, reduction="mean")
    assert torch.isnan(out).item()  # 0 / 0, as F.cross_entropy
    assert torch.isnan(F.cross_entropy((hidden @ weight.T).reshape(-1, 37), target.reshape(-1))).item()
    out.backward()
    assert torch.equal(h.grad.cpu(), torch.zeros_like(hidden))  # no NaN gradients


def test_return_lse(backend):
    hidden, weight, target, _, _ = make_problem()
    loss, lse = lce(backend, backend.tensor(hidden), backend.tensor(weight), backend.tensor(target), return_lse=True,
                    temperature=0.5, chunk_budget=4 * 40)
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
    lce(backend, h, backend.tensor(weight), backend.tensor(target), reduction="sum").backward()
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
        ours = lce(backend, backend.tensor(hidden), backend.tensor(weight), backend.tensor(target),
                   bias=backend.tensor(bias), class_weight=backend.tensor(cw), reduction=reduction,
                   label_smoothing=ls, chunk_budget=4 * 40)
        opts = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
        theirs = F.linear_cross_entropy(hidden, weight, target, linear_bias=bias, weight=cw, reduction=reduction,
                                        ignore_index=-100, label_smoothing=ls, options=opts)
        assert_close(ours, theirs, 1e-5, 1e-5, f"vs F.linear_cross_entropy {reduction} {ls}")


def test_bad_input(backend):
    hidden, weight, target, _, _ = make_problem()
    h, w = backend.tensor(hidden), backend.tensor(weight)
    bad = target.clone()
    bad[1, 2] = 37
    with pytest.raises(ValueError, match="target"):
        lce(backend, h, w, backend.tensor(bad))
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="target"):
        lce(backend, h, w, backend.tensor(bad))
    with pytest.raises(ValueError, match="weight"):
        lce(backend, h, w[:, :3], backend.tensor(target))
    with pytest.raises(ValueError, match="target"):
        lce(backend, h, w, backend.tensor(target[:1]))
    with pytest.raises(TypeError, match="weight"):
        lce(backend, h, w.double(), backend.tensor(target))
    with pytest.raises(ValueError, match="bias"):
        lce(backend, h, w, backend.tensor(target), bias=w[0])
    with pytest.raises(ValueError, match="reduction"):
        lce(backend, h, w, backend.tensor(target), reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        lce(backend, h, w, backend.tensor(target), softcap=0.0)


def test_opcheck(backend):
    # (No ignored token: its z_target is NaN, which opcheck does not compare as equal.)
    hidden, weight, target, bias, cw = make_problem(lead=(6,), bias=True, class_weight=True)
    h, w, t, b, c = (backend.tensor(x) for x in (hidden, weight, target, bias, cw))
    ops = backend.ops
    torch.library.opcheck(ops.linear_ce_stats, (h, w, t, b, c, -100, 2.0, 0.9, 4 * 40))
    stats = ops.linear_ce_stats(h, w, t, b, c, -100, 0.0, 1.0, 1 << 20)
    lse = torch.stack([stats[:, 0], stats[:, 1].log()], -1)
    coef = torch.randn(6, 4).to(h.device)
    torch.library.opcheck(ops.linear_ce_backward, (h, w, t, b, c, lse, coef, 0.0, 1.0, 4 * 40, True))
    torch.library.opcheck(ops.linear_ce_backward, (h, w, t, None, None, lse, coef, 2.0, 1.0, 1 << 20, False))


def test_module(backend):
    hidden, weight, target, _, _ = make_problem(ignore=(1,))
    loss_fn = logitkit.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)
    out = loss_fn(hidden, weight, target) if backend.name == "cpu" else None
    if out is not None:
        assert_close(out, reference(hidden, weight, target, label_smoothing=0.1, z_loss=1e-3), 2e-5, 2e-5, "module")


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
    assert_close(out, ref, 2e-5, 2e-5, "compiled loss")
    assert_close(h.grad, hr.grad, 2e-5 * hr.grad.abs().max().item(), 2e-5, "compiled grad")


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
    from logitkit.linear_ce import _linear_log_probs_and_entropy

    hidden, weight, target, bias, _ = make_problem(bias=True)
    h, w, b = (backend.tensor(x).requires_grad_() for x in (hidden, weight, bias))
    lp, ent = _linear_log_probs_and_entropy(backend.namespace, h, w, backend.tensor(target), bias=b, temperature=0.8,
                                            chunk_budget=4 * 40)
    hr, wr, br = (x.double().requires_grad_() for x in (hidden, weight, bias))
    logp = torch.log_softmax((hr @ wr.T + br) / 0.8, -1)
    lp_ref = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent_ref = -(logp.exp() * logp).sum(-1)
    assert_close(lp, lp_ref, 2e-5, 2e-5, "log_prob")
    assert_close(ent, ent_ref, 2e-5, 2e-5, "entropy")
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    (lp * backend.tensor(g_lp) + ent * backend.tensor(g_ent)).sum().backward()
    (lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum().backward()
    for name, x, xr in (("hidden", h, hr), ("weight", w, wr), ("bias", b, br)):
        assert_close(x.grad, xr.grad, 2e-5 * xr.grad.abs().max().item(), 2e-5, f"grad {name}")


@pytest.mark.parametrize("threads, schedule", [(32, "in_order"), (129, "random"), (256, "reversed")])
def test_emulated_launch_shapes(threads, schedule):
    """The CUDA chunk kernels under block sizes of 1, 5 (partial last warp) and 8 warps with each
    thread schedule: every option, so every field of the per-token state (softmax state, target
    logit, label-smoothing sum) goes through the block reduction."""
    from conftest import Backend, emulated_configure
    from logitkit import _loader

    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    emulated = Backend("emulated-cuda", "cpu", "logitkit_emulated")
    emulated_configure(threads_per_block=threads, max_elements_per_block=4096, schedule=schedule, seed=threads)
    try:
        problem_kw, options = split_options(OPTIONS["all"])
        run_case(emulated, make_problem(v=300, **problem_kw), reduction="mean", **options)
    finally:
        emulated_configure(threads_per_block=80, max_elements_per_block=4096, schedule="random", seed=1)
