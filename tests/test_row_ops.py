"""softmax, log_softmax, logsumexp, entropy and softmax_stats on every backend,
against the fp64 references of logitkit.testing (the definitions, in plain
PyTorch), through the public functions (the backend fixture selects the
backend) and the raw ops."""

from __future__ import annotations

import math

import pytest
import torch

import logitkit
from logitkit.testing import DTYPES as DTYPES_BY_NAME
from logitkit.testing import assert_close, assert_no_worse_than_torch, references, tolerances

DTYPES = list(DTYPES_BY_NAME.values())
NEG_INF = float("-inf")
REFERENCES = references.ROW_OPS
TOLERANCES = tolerances.ROW_OPS


def random_logits(rows, vocab, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed + vocab + rows)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def vocab_sizes(backend):
    # The emulator runs one OS thread per CUDA thread: keep its rows modest.
    return [1, 31, 1000, 50257] if backend.name == "emulated-cuda" else [1, 31, 1000, 50257, 128256]


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(REFERENCES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_fp64_reference(backend, op, dtype):
    for vocab in vocab_sizes(backend):
        x = random_logits(3, vocab, dtype)
        for t in (1.0, 0.7):
            out = getattr(logitkit, op)(backend.tensor(x), t)
            expected_dtype = torch.float32 if op == "entropy" else dtype
            assert out.dtype == expected_dtype
            atol, rtol = TOLERANCES[op][dtype]
            expected = REFERENCES[op](x, t)
            assert_close(out, expected, atol, rtol, f"{op} V={vocab} T={t}")
            if dtype != torch.float32:  # no less accurate than PyTorch itself in the same dtype
                plain = REFERENCES[op](x, t, dtype=dtype)
                assert_no_worse_than_torch(out, plain, expected, what=f"{op} V={vocab} T={t}")


@pytest.mark.parametrize("op", list(REFERENCES))
def test_leading_shapes_and_non_contiguous(backend, op):
    base = random_logits(2 * 5 * 3, 333, torch.float32).reshape(2, 5, 3, 333)
    views = {
        "3d": base[:, :, 0, :],  # leading dims collapse to one row stride
        "last_row": base[:, -1, :, :],  # like logits[:, -1, :]
        "transposed": base.transpose(1, 2),  # leading dims do not collapse
        "strided_vocab": base[..., ::2],  # vocabulary not unit-stride
        "1d": base[0, 0, 0],
    }
    for name, x in views.items():
        out = getattr(logitkit, op)(backend.tensor(x), 1.3)
        atol, rtol = TOLERANCES[op][torch.float32]
        assert_close(out, REFERENCES[op](x, 1.3), atol, rtol, f"{op} {name}")


@pytest.mark.parametrize("op", list(REFERENCES))
def test_large_magnitudes(backend, op):
    # Logits around +-1e4: no overflow, and no precision lost to z - lse.
    x = random_logits(4, 1000, torch.float32, scale=3.0) + torch.tensor([[1e4], [-1e4], [3e4], [0.0]])
    x[3] = x[3] * 3000.0
    out = getattr(logitkit, op)(backend.tensor(x), 1.0)
    atol, rtol = TOLERANCES[op][torch.float32]
    if op in ("logsumexp",):
        rtol = 2e-7 * 4  # the result itself is ~3e4: a few ulps
    assert_close(out, REFERENCES[op](x, 1.0), atol, rtol, op)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_and_merge(backend, dtype):
    x = random_logits(4, 1000, dtype)
    x[1, ::3] = NEG_INF
    stats = logitkit.softmax_stats(backend.tensor(x), 0.8)
    assert stats.dtype == torch.float32 and stats.shape == (4, 3)
    ref = references.softmax_stats(x, 0.8)
    assert_close(stats[..., 0], ref[..., 0], 0, 3e-7, "max")  # z = x * (1/T) in fp32
    assert_close(stats[..., 1:], ref[..., 1:], 1e-3, 1e-5, "sums")
    # Shard the vocabulary, merge the shard states: same lse and entropy.
    shards = [logitkit.softmax_stats(backend.tensor(s.contiguous()), 0.8) for s in x.split([1, 400, 599], -1)]
    merged = logitkit.merge_stats(shards)
    assert_close(
        logitkit.stats_logsumexp(merged),
        references.logsumexp(x, 0.8),
        *TOLERANCES["logsumexp"][torch.float32],
        "merged lse",
    )
    assert_close(
        logitkit.stats_entropy(merged),
        references.entropy(x, 0.8),
        *TOLERANCES["entropy"][torch.float32],
        "merged entropy",
    )
    stacked = logitkit.merge_stats(torch.stack(shards, 1), dim=1)
    assert torch.equal(stacked, merged)


def test_merge_stats_with_empty_shards():
    empty = torch.tensor([[NEG_INF, 0.0, 0.0]])
    x = torch.randn(1, 50)
    s = logitkit.softmax_stats(x)
    merged = logitkit.merge_stats([empty, s, empty])
    assert torch.allclose(merged, s)
    assert logitkit.stats_logsumexp(logitkit.merge_stats([empty, empty])).item() == NEG_INF


@pytest.mark.parametrize(
    "threads, per_block, schedule",
    [(32, 64, "in_order"), (48, 96, "reversed"), (80, 400, "random"), (129, 1000, "random"), (256, 0, "random")],
)
def test_emulated_launch_shapes(threads, per_block, schedule):
    """The CUDA kernels under several block sizes (partial warps) and row splits
    (several blocks per row, a partial last slice), with each thread schedule."""
    from logitkit import _loader

    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    ops = torch.ops.logitkit_emulated
    _loader._C_emulated.configure(
        threads_per_block=threads, max_elements_per_block=per_block, schedule=schedule, seed=threads
    )
    try:
        x = random_logits(2, 1001, torch.bfloat16)
        x[1, ::7] = NEG_INF
        x_misaligned = random_logits(2, 1003, torch.float16)[:, 1:]  # rows start off a 16-byte boundary
        for op in REFERENCES:
            for inp in (x, x_misaligned):
                atol, rtol = TOLERANCES[op][inp.dtype]
                assert_close(getattr(ops, op)(inp, 1.1), REFERENCES[op](inp, 1.1), atol, rtol, f"{op} {threads}")
        y = ops.softmax(x.float(), 1.0)
        g = torch.randn_like(y)
        expected = y.double() * (g.double() - (g.double() * y.double()).sum(-1, keepdim=True))
        assert_close(ops.softmax_backward(g, y, 1.0), expected, 1e-6, 1e-4, "softmax_backward")
    finally:
        _loader._C_emulated.configure(threads_per_block=80, max_elements_per_block=4096, schedule="random", seed=1)


# ---------------------------------------------------------------------------
# Special values
# ---------------------------------------------------------------------------
def special_rows():
    x = torch.randn(6, 40, dtype=torch.float64).float()
    x[1, :20] = NEG_INF  # partly masked
    x[2, :] = NEG_INF  # all masked
    x[3, 7] = float("inf")  # +inf
    x[4, 11] = float("nan")  # NaN
    x[5, :39] = NEG_INF  # a single live token
    return x


def test_special_values(backend):
    x = special_rows()
    xt = backend.tensor(x)
    lse = logitkit.logsumexp(xt).cpu()
    sm = logitkit.softmax(xt).cpu()
    lsm = logitkit.log_softmax(xt).cpu()
    ent = logitkit.entropy(xt).cpu()
    # Normal and partly masked rows are exact references.
    for r in (0, 1, 5):
        for op, out in (("softmax", sm), ("log_softmax", lsm), ("entropy", ent)):
            assert_close(out[r], REFERENCES[op](x[r]), *TOLERANCES[op][torch.float32], f"{op} row {r}")
    assert sm[1, :20].eq(0).all() and lsm[1, :20].eq(NEG_INF).all()
    assert sm[5, 39].item() == 1.0 and ent[5].item() == 0.0
    # All -inf: lse = -inf, the rest NaN (as torch.softmax gives NaN).
    assert lse[2].item() == NEG_INF
    assert sm[2].isnan().all() and lsm[2].isnan().all() and math.isnan(ent[2].item())
    # +inf: lse = +inf, the distribution is undefined (NaN).
    assert lse[3].item() == float("inf")
    assert sm[3].isnan().all() and lsm[3].isnan().all() and math.isnan(ent[3].item())
    # NaN stays in its row.
    assert math.isnan(lse[4].item()) and sm[4].isnan().all() and lsm[4].isnan().all() and math.isnan(ent[4].item())
    assert not sm[[0, 1, 5]].isnan().any()


def test_empty_inputs(backend):
    for shape in [(0, 10), (3, 0), (0,)]:
        x = backend.tensor(torch.empty(shape))
        assert logitkit.softmax(x).shape == x.shape
        assert logitkit.log_softmax(x).shape == x.shape
        lse = logitkit.logsumexp(x).cpu()
        ent = logitkit.entropy(x).cpu()
        assert lse.shape == shape[:-1] and ent.shape == shape[:-1]
        if shape == (3, 0):
            assert lse.eq(NEG_INF).all() and ent.isnan().all()
        stats = logitkit.softmax_stats(x)
        assert stats.shape == (*shape[:-1], 3)


def test_vocab_of_one_million(backend):
    if backend.name == "emulated-cuda":
        pytest.skip("one-million-wide rows are checked on the CPU kernels")
    x = random_logits(2, 1_000_003, torch.float32, scale=5.0)
    x[1, 500_000:] = NEG_INF
    for op in REFERENCES:
        out = getattr(logitkit, op)(backend.tensor(x), 1.0)
        atol, rtol = TOLERANCES[op][torch.float32]
        assert_close(out, REFERENCES[op](x, 1.0), atol * 10, rtol, op)


def test_results_past_the_huge_page_threshold():
    """Results of 8 MiB and more are advised to use transparent huge pages (empty_row_output in
    csrc/frontend/common.h): the same values, whether or not the system grants them, for every
    op that allocates its result that way (bool results need 8 Mi tokens)."""
    x = random_logits(9, 1_000_003, torch.float32, scale=5.0)
    x[1, 500_000:] = NEG_INF
    for op in ("softmax", "log_softmax"):
        atol, rtol = TOLERANCES[op][torch.float32]
        assert_close(getattr(logitkit, op)(x, 1.0), REFERENCES[op](x, 1.0), atol * 10, rtol, op)
    y = x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    logitkit.softmax(y).backward(grad)
    p = torch.softmax(x.double(), -1)
    assert_close(y.grad, p * (grad - (grad * p).sum(-1, keepdim=True)), 1e-6, 1e-4, "softmax backward")
    kept = logitkit.truncation_mask(x, min_p=0.3)
    p_max = torch.softmax(x.double(), -1).amax(-1, keepdim=True)
    assert torch.equal(kept, torch.softmax(x.double(), -1) >= 0.3 * p_max)
    assert torch.equal(logitkit.filter_logits(x, min_p=0.3), torch.where(kept, x, -math.inf))
    rows = torch.cat([logitkit.top_h_mask(x[i : i + 1], 0.5, rule="exact") for i in range(9)])  # (4 MB each)
    assert torch.equal(logitkit.top_h_mask(x, 0.5, rule="exact"), rows)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(REFERENCES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(backend, op, dtype):
    x = random_logits(3, 517, dtype)
    x[1, ::5] = NEG_INF
    t = 1.7
    xt = backend.tensor(x).requires_grad_(True)
    out = getattr(logitkit, op)(xt, t)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out.backward(backend.tensor(g.to(out.dtype)))
    xr = x.double().requires_grad_(True)
    REFERENCES[op](xr, t).backward(g.to(out.dtype).double())
    expected = torch.nan_to_num(xr.grad, nan=0.0)
    scale = expected.abs().max().item()
    atol = scale * (2e-5 if dtype == torch.float32 else 2e-2)
    assert_close(xt.grad, expected, atol, 1e-2 if dtype != torch.float32 else 1e-4, f"{op} grad")


def test_gradcheck_fp32_against_reference(backend):
    # Analytic gradients of all four ops against finite differences of the
    # fp64 reference evaluated at the same point (our kernels are fp32-only).
    x = random_logits(2, 13, torch.float32)
    for op in REFERENCES:
        xt = backend.tensor(x).requires_grad_(True)
        out = getattr(logitkit, op)(xt, 0.9)
        w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * backend.tensor(w)).sum().backward()
        xd = x.double().requires_grad_(True)
        (REFERENCES[op](xd, 0.9) * w.double()).sum().backward()
        assert_close(xt.grad, xd.grad, 1e-5, 1e-4, op)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp", "entropy", "softmax_stats"])
def test_bad_input(backend, op):
    fn = getattr(backend.ops, op)
    arg = "logits" if op == "entropy" else "x"
    with pytest.raises(TypeError, match=f"{op}: {arg} must be float32, bfloat16(,| or) float16"):
        fn(backend.tensor(torch.ones(2, 3, dtype=torch.int64)), 1.0)
    if backend.name != "cpu":  # the CPU kernels take float64 (test_float64_*)
        with pytest.raises(TypeError, match="float64"):
            fn(backend.tensor(torch.ones(2, 3, dtype=torch.float64)), 1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fn(backend.tensor(torch.ones(2, 3)), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        fn(backend.tensor(torch.ones(2, 3)), -1.0)
    with pytest.raises(ValueError, match="temperature"):
        fn(backend.tensor(torch.ones(2, 3)), float("nan"))
    with pytest.raises(ValueError, match="at least one dimension"):
        fn(backend.tensor(torch.tensor(1.0)), 1.0)


def test_backward_bad_input(backend):
    y = backend.tensor(torch.rand(2, 5))
    with pytest.raises(ValueError, match="grad must have shape"):
        backend.ops.softmax_backward(backend.tensor(torch.rand(2, 4)), y, 1.0)
    with pytest.raises(TypeError, match="grad has dtype"):
        backend.ops.softmax_backward(backend.tensor(torch.rand(2, 5, dtype=torch.float16)), y, 1.0)
    with pytest.raises(ValueError, match="grad must have shape"):
        backend.ops.entropy_backward(backend.tensor(torch.rand(3)), y, 1.0)


def test_backward_rejects_complex_and_integer_grads(backend):
    x = backend.tensor(torch.rand(2, 5))
    y = backend.ops.softmax(x, 1.0)
    for bad in (torch.complex64, torch.int64):
        grad = backend.tensor(torch.ones(2, 5)).to(bad)
        with pytest.raises(TypeError, match="softmax_backward: grad must be a real floating-point tensor"):
            backend.ops.softmax_backward(grad, y, 1.0)
        with pytest.raises(TypeError, match="entropy_backward: grad must be a real floating-point tensor"):
            backend.ops.entropy_backward(backend.tensor(torch.ones(2)).to(bad), x, 1.0)


def test_meta_tensors_mixed_with_real_ones_raise():
    """A meta tensor among CPU ones dispatches to the fake kernel: it must
    raise as the C++ op does, not return an uninitialised CPU tensor."""
    y = torch.rand(2, 5)
    with pytest.raises(ValueError, match="softmax_backward: all tensor arguments must be on one device"):
        torch.ops.logitkit.softmax_backward(torch.rand(2, 5, device="meta"), y, 1.0)
    with pytest.raises(ValueError, match="entropy_backward: all tensor arguments must be on one device"):
        torch.ops.logitkit.entropy_backward(torch.rand(2, device="meta"), y, 1.0)
    # All-meta calls are shape inference, and fine.
    assert torch.ops.logitkit.softmax(torch.rand(2, 5, device="meta"), 1.0).device.type == "meta"


def test_softmax_stats_is_not_differentiable(backend):
    x = backend.tensor(torch.randn(2, 7)).requires_grad_(True)
    stats = logitkit.softmax_stats(x)
    assert not stats.requires_grad  # marked non-differentiable: no silent zero gradient
    with pytest.raises(RuntimeError, match="does not require grad"):
        stats.sum().backward()


def test_stats_functions_reject_bad_states():
    good = logitkit.softmax_stats(torch.randn(2, 7))
    for fn in (logitkit.stats_logsumexp, logitkit.stats_entropy, lambda s: logitkit.merge_stats([s, s])):
        with pytest.raises(TypeError, match="stats must be a floating-point tensor"):
            fn(good.to(torch.int64))
        with pytest.raises(ValueError, match="last dimension of 3"):
            fn(good[..., :2])
    with pytest.raises(ValueError, match=r"stats\[1\] is \[3, 3\]"):
        logitkit.merge_stats([good, torch.zeros(3, 3)])


# ---------------------------------------------------------------------------
# NaN wins over +inf, in every position, on every backend
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("nan_at", [0, 4, 298, 2047, 4000, 4999])
def test_nan_wins_over_inf(backend, nan_at):
    """A row holding both +inf and NaN is NaN for every op, wherever the two
    sit (the same tile, tiles merged in either order, different threads or
    blocks), as torch gives."""
    x = torch.randn(3, 5000)
    x[0, 1] = float("inf")
    x[0, nan_at] = float("nan")
    x[1, nan_at] = float("nan")
    x[1, 4998] = float("inf")
    x[2, nan_at] = float("inf")  # +inf alone: lse = +inf
    xt = backend.tensor(x)
    for op in REFERENCES:
        out = getattr(logitkit, op)(xt, 1.0).cpu()
        assert out[:2].isnan().all(), f"{op} NaN at {nan_at}"
    assert logitkit.logsumexp(xt).cpu()[2].item() == float("inf")
    stats = logitkit.softmax_stats(xt).cpu()
    assert stats[:2].isnan().all()
    assert math.isnan(logitkit.stats_logsumexp(stats)[0].item())


def test_merge_stats_nan_wins():
    nan_shard = logitkit.softmax_stats(torch.tensor([[0.0, float("nan")]]))
    inf_shard = logitkit.softmax_stats(torch.tensor([[float("inf"), 0.0]]))
    normal = logitkit.softmax_stats(torch.tensor([[1.0, 2.0]]))
    for order in ([nan_shard, inf_shard], [inf_shard, nan_shard], [normal, nan_shard, inf_shard]):
        merged = logitkit.merge_stats(order)
        assert math.isnan(logitkit.stats_logsumexp(merged).item())
        assert math.isnan(logitkit.stats_entropy(merged).item())


# ---------------------------------------------------------------------------
# Tiny temperatures: 1 / T overflows, z = x / T does not
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 2.0**-127])
def test_tiny_temperature(backend, temperature):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 1e-38
    x[1, :10] = NEG_INF
    xt = backend.tensor(x)
    z = x.double() / temperature
    for op in REFERENCES:
        out = getattr(logitkit, op)(xt, temperature).cpu()
        # z = x / T rounded once to float32: compare with the fp64 op of that z.
        expected = REFERENCES[op](z.float(), 1.0)
        assert_close(out, expected, *TOLERANCES[op][torch.float32], f"{op} T={temperature}")
    # Ordinary logits: z overflows to +-inf exactly as torch's x / T does.
    big = torch.tensor([[1.0, -2.0, 0.5]])
    assert logitkit.logsumexp(backend.tensor(big), 1e-39).item() == torch.logsumexp(big / 1e-39, -1).item()


def test_tiny_temperature_gradient(backend):
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(1)) * 1e-38
    for op in REFERENCES:
        xt = backend.tensor(x).requires_grad_(True)
        out = getattr(logitkit, op)(xt, 1e-39)
        # Small weights: the gradients carry 1 / T = 1e39 and must fit in float32.
        w = torch.linspace(-1, 1, out.numel()).reshape(out.shape) * 1e-3
        (out * backend.tensor(w)).sum().backward()
        xd = x.double().requires_grad_(True)
        (REFERENCES[op](xd, 1e-39) * w.double()).sum().backward()
        scale = xd.grad.abs().max().item()
        assert_close(xt.grad, xd.grad, scale * 1e-5, 1e-3, op)


# ---------------------------------------------------------------------------
# float64 on the CPU: computed in float64, gradcheck-able
# ---------------------------------------------------------------------------
def cpu_only(backend):
    if backend.name != "cpu":
        pytest.skip("float64 is taken by the CPU kernels only")


@pytest.mark.parametrize("op", list(REFERENCES))
def test_float64_matches_reference(backend, op):
    cpu_only(backend)
    for vocab in (1, 31, 1000, 50257):
        x = random_logits(3, vocab, torch.float64)
        if vocab > 1:
            x[1, ::3] = NEG_INF
        out = getattr(logitkit, op)(backend.tensor(x), 0.7)
        assert out.dtype == torch.float64
        assert_close(out, REFERENCES[op](x, 0.7), 1e-13, 1e-12, f"{op} V={vocab}")
    stats = logitkit.softmax_stats(backend.tensor(x), 0.7)
    assert stats.dtype == torch.float64
    assert_close(stats, references.softmax_stats(x, 0.7), 1e-12, 1e-12, "stats")


@pytest.mark.parametrize("op", list(REFERENCES))
def test_float64_gradcheck(backend, op):
    cpu_only(backend)
    fn = getattr(logitkit, op)
    x = random_logits(3, 37, torch.float64)
    x[1, ::4] = NEG_INF
    # -inf entries have no finite differences: check the gradient at the live
    # ones (and of the live outputs: log_softmax is -inf at the masked ones).
    live = torch.isfinite(x)

    def f(values: torch.Tensor) -> torch.Tensor:
        out = fn(x.masked_scatter(live, values), 0.8)
        return out[live] if out.shape == x.shape else out

    assert torch.autograd.gradcheck(f, (x[live].clone().requires_grad_(True),))
    xt = random_logits(2, 33, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, 1.3), (xt,))
    assert torch.autograd.gradcheck(lambda t: fn(t, 1.3)[..., :5], (xt[:, 2:].detach().requires_grad_(True),))


@pytest.mark.parametrize("op", list(REFERENCES))
def test_float64_gradgradcheck(backend, op):
    """Second derivatives: the backward is differentiable (create_graph=True runs its
    composite form), including rows with -inf entries and T != 1."""
    cpu_only(backend)
    fn = getattr(logitkit, op)
    x = random_logits(3, 11, torch.float64)
    x[1, ::4] = NEG_INF
    live = torch.isfinite(x)

    def f(values: torch.Tensor) -> torch.Tensor:
        out = fn(x.masked_scatter(live, values), 0.8)
        return out[live] if out.shape == x.shape else out

    assert torch.autograd.gradgradcheck(f, (x[live].clone().requires_grad_(True),))
    xt = random_logits(2, 7, torch.float64).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: fn(t, 1.3), (xt,))


def test_double_backward_matches_torch(backend):
    """Hessian-vector products of every row op in float32 against torch's own double backward."""
    x = random_logits(3, 40, torch.float32)
    v = torch.randn_like(x)

    def hessian_vector_product(fn) -> torch.Tensor:
        xt = backend.tensor(x).requires_grad_(True)
        vt = backend.tensor(v)
        out = fn(xt)
        weights = vt[..., 0] if out.dim() == 1 else vt  # a fixed linear functional of the output
        (g,) = torch.autograd.grad((out * weights).sum(), xt, create_graph=True)
        (hv,) = torch.autograd.grad((g * vt).sum(), xt)
        return hv.cpu()

    for op in REFERENCES:
        ours = hessian_vector_product(lambda t, op=op: getattr(logitkit, op)(t, 0.9))
        theirs = hessian_vector_product(lambda t, op=op: REFERENCES[op](t, 0.9, torch.float32))
        assert_close(ours, theirs, 1e-4, 1e-3, f"{op} Hessian-vector product")
