"""Tests of Top-H truncation (logitkit.top_h / top_h_mask) and Top-H sampling
on every backend (the shared `backend` fixture): CPU kernels, the CUDA kernel
run through the SIMT emulator, and real CUDA when present. The reference is
logitkit.testing.references.top_h, which follows docs/top_h.md literally: it
sorts (stable: among equal logits the lower index first) and scans, in
float64."""

from __future__ import annotations

import math

import pytest
import torch

import logitkit
from conftest import Backend
from logitkit import _loader
from logitkit.testing import references, tolerances

CPU = Backend("cpu")


@pytest.fixture
def backend(backend):
    """The shared fixture with this module's emulated launch shape: 80 threads (the last warp is
    partial), whole rows per block, random start order with yields."""
    if backend.name == "emulated-cuda":
        _loader._C_emulated.configure(threads_per_block=80, max_elements_per_block=0, schedule="random", seed=7)
    yield backend
    if _loader._C_emulated is not None:
        _loader._C_emulated.configure()


def run_mask(backend, x, alpha, temperature=1.0, rule="hf", cap=-1):
    """logitkit.top_h_mask on the backend (the fixture selected it), back on the CPU."""
    mask = logitkit.top_h_mask(
        backend.tensor(x), alpha, temperature=temperature, rule=rule, cap=None if cap == -1 else cap
    )
    return mask.cpu()


# ---------------------------------------------------------------------------
# Comparison with the float64 reference: keep sorted token k iff c_k <= tau
# (a prefix), token 0 always kept and zero probabilities (in float32) never kept.
# ---------------------------------------------------------------------------


def assert_matches_reference(mask_row, x, alpha, temperature, rule, cap=-1, tol=tolerances.TOP_H_CUT):
    if x.numel() and (torch.isnan(x).any() or (x == math.inf).any()):
        assert not mask_row.any()
        return
    if x.numel() and (x == -math.inf).all():
        assert mask_row.tolist() == [True] + [False] * (x.numel() - 1)
        return
    ref = references.top_h(x, alpha, temperature, rule, cap)
    kept, c, tau = int(ref.kept), ref.criterion, ref.tau.item()
    got = int(mask_row.sum())
    expected_set = torch.zeros_like(mask_row)
    expected_set[ref.order[:got]] = True
    assert torch.equal(mask_row, expected_set), f"kept set is not the top-{got} prefix of the sorted order ({rule})"
    if got != kept:
        # Only acceptable when the criterion is within rounding of tau at the cut.
        lo, hi = min(got, kept), max(got, kept)
        for k in range(lo, hi):
            assert bool(ref.positive[k]), f"{rule}: kept {got}, reference {kept} (zero-probability token)"
            assert abs(c[k].item() - tau) <= tol * (1 + abs(tau)), (
                f"{rule}: kept {got} tokens, reference {kept}; c[{k}]={c[k].item():.9g} tau={tau:.9g}"
            )


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def make_rows(V, temperature, seed):
    """A few rows of one shape: plain, wide, peaked (probabilities underflow to
    0 after the top 3), and with -inf entries."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(V, generator=g) * 2, torch.randn(V, generator=g) * 6]
    peaked = torch.randn(V, generator=g)
    peaked[: min(3, V)] += 150 * temperature
    rows.append(peaked)
    masked = torch.randn(V, generator=g) * 3
    masked[torch.rand(V, generator=g) < 0.3] = -math.inf
    if V > 1:
        masked[V // 2] = 4.0  # at least one finite entry
    rows.append(masked)
    return torch.stack(rows)


TEMPERATURES = [0.3, 0.7, 1.0, 1.5, 3.0]


def _check_rows(backend, x, alpha, T, rule, cap=-1):
    mask = run_mask(backend, x, alpha, T, rule, cap)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    for r in range(x.shape[0]):
        assert_matches_reference(mask[r], x[r], alpha, T, rule, cap)


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
@pytest.mark.parametrize("V", [1, 2, 99, 100, 101, 1000])
@pytest.mark.parametrize("alpha", [0.05, 0.4, 0.9, 1.0])
def test_against_reference(backend, rule, V, alpha):
    T = TEMPERATURES[(V + int(alpha * 100)) % len(TEMPERATURES)]
    x = make_rows(V, T, seed=V * 31 + int(alpha * 1000))
    _check_rows(backend, x, alpha, T, rule)


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
@pytest.mark.parametrize("T", TEMPERATURES)
def test_large_vocab_cpu(rule, T):
    x = make_rows(50257, T, seed=int(T * 10))
    _check_rows(CPU, x, 0.4, T, rule)


@pytest.mark.parametrize("rule", ["hf", "official"])
def test_cap(backend, rule):
    x = make_rows(300, 1.0, seed=3)
    for cap in (1, 7, 250, 1000):
        _check_rows(backend, x, 0.7, 1.0, rule, cap)


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
def test_emulated_multi_tile_and_schedules(backend, rule):
    """Rows longer than many tiles, various block sizes and thread orders."""
    if backend.name != "emulated-cuda":
        pytest.skip("emulator-specific launch shapes")
    x = make_rows(700, 1.5, seed=11)
    for threads, schedule in ((32, "in_order"), (45, "reversed"), (96, "random")):
        _loader._C_emulated.configure(threads_per_block=threads, schedule=schedule, seed=threads)
        _check_rows(backend, x, 0.6, 1.5, rule)


def large_magnitude_rows(V, top, temperature, seed):
    """Rows whose largest scaled logit z = x / T is `top` (|top| >= 200, where a
    first-digit radix bin spans tens to thousands in z): most tokens within 100
    of it and a fifth far below (probability 0); a super-peaked row (every
    token but one 60 to 100 below the top); a row of close tokens."""
    g = torch.Generator().manual_seed(seed)
    spread = top - 100 * torch.rand(V, generator=g, dtype=torch.float64)
    spread[torch.rand(V, generator=g) < 0.2] -= 1000 + 500 * torch.rand(1, generator=g, dtype=torch.float64)
    spread[V // 2] = top
    peaked = top - 60 - 40 * torch.rand(V, generator=g, dtype=torch.float64)
    peaked[V // 3] = top
    close = top - 6 * torch.rand(V, generator=g, dtype=torch.float64)
    close[V - 1] = top
    return (torch.stack([spread, peaked, close]) * temperature).float()


def assert_count_close(mask_row, x, alpha, temperature, rule, rel=tolerances.TOP_H_CUT_RELATIVE):
    """Stricter than assert_matches_reference for rows with a tiny entropy
    budget: a kept count differing from the reference's needs c_k within a
    relative `rel` of tau."""
    ref = references.top_h(x, alpha, temperature, rule)
    kept, c, tau = int(ref.kept), ref.criterion, ref.tau.item()
    got = int(mask_row.sum())
    for k in range(min(got, kept), max(got, kept)):
        assert abs(c[k].item() - tau) <= rel * abs(tau), f"{rule}: kept {got}, reference {kept}, tau={tau:.9g}"


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
@pytest.mark.parametrize("top", [200.0, 1000.0, 1e4, -1000.0, -1e4, 1030.0])
def test_large_magnitudes(backend, rule, top):
    """Large |z|: the top first-digit bin's upper end can lie far above the row
    max (1030: just above the bin boundary 1024, whose bin ends at 1280), so
    "exact" must not sum that bin relative to its upper end."""
    V = 300
    for T, alpha in ((1.0, 0.3), (0.7, 0.8), (1.3, 0.05)):
        x = large_magnitude_rows(V, top, T, seed=int(abs(top)) + int(T * 10))
        mask = run_mask(backend, x, alpha, T, rule)
        for r in range(x.shape[0]):
            assert_matches_reference(mask[r], x[r], alpha, T, rule)
            # The peaked rows at T != 1 have budgets ~1e-24: z - m of the top
            # token must be exactly 0 (no FMA contraction of x / T - m; see
            # core::scaled_logit), or the kept count is off by hundreds.
            assert_count_close(mask[r], x[r], alpha, T, rule)
        if rule == "exact":
            # Far-below tokens (probability 0) are never kept; unless alpha
            # is tiny, the peaked row keeps more than its top token (the
            # tokens 60 below have probabilities ~1e-27, positive in float32).
            assert not (mask[0] & (x[0] / T < top - 900)).any()
            assert alpha < 0.3 or int(mask[1].sum()) > 1


# ---------------------------------------------------------------------------
# transformers' own TopHLogitsWarper (rule "hf")
# ---------------------------------------------------------------------------


def _transformers_warper():
    try:
        from transformers.generation.logits_process import TopHLogitsWarper
    except Exception:  # pragma: no cover - transformers missing or too old
        return None
    return TopHLogitsWarper


@pytest.mark.parametrize("V", [2, 99, 100, 101, 1000])
@pytest.mark.parametrize("alpha", [0.05, 0.4, 0.9, 1.0])
def test_hf_against_transformers(backend, V, alpha):
    Warper = _transformers_warper()
    if Warper is None:
        pytest.skip("transformers with TopHLogitsWarper is not installed")
    T = 1.5
    g = torch.Generator().manual_seed(V + int(alpha * 100))
    x = torch.randn(6, V, generator=g) * 3
    theirs = Warper(top_h=alpha)(torch.zeros(6, 1, dtype=torch.long), x / T) != -math.inf
    ours = run_mask(backend, x, alpha, T, "hf")
    diff = (ours != theirs).sum(-1)
    # alpha = 1: float32 rounding of their cumulative sum may drop the last token (note).
    assert int(diff.max()) <= (1 if alpha == 1.0 else 0), diff


# ---------------------------------------------------------------------------
# Ties, special rows, bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
def test_ties_lower_index_first(backend, rule):
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(3):
        x = torch.randint(-3, 4, (150,), generator=g).float()  # many exact ties everywhere
        rows.append(x)
    rows.append(torch.zeros(150))  # all equal
    x = torch.stack(rows)
    for alpha in (0.2, 0.5, 0.95):
        _check_rows(backend, x, alpha, 1.0, rule)
    # All-equal row: a prefix of the lowest indices is kept.
    mask = run_mask(backend, x, 0.5, 1.0, rule)[3]
    k = int(mask.sum())
    assert k >= 1 and mask[:k].all() and not mask[k:].any()


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
def test_special_rows(backend, rule):
    V = 130
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, V, generator=g)
    x[1, 17] = math.nan
    x[2, :] = -math.inf
    x[3, 5] = math.inf
    x[4, :] = -math.inf
    x[4, 77] = 1.0  # a single finite token
    x[5, 40] = 200.0  # one-hot after underflow
    mask = run_mask(backend, x, 0.5, 1.0, rule)
    assert not mask[1].any() and not mask[3].any()  # NaN / +inf: nothing kept
    assert mask[2].tolist() == [True] + [False] * (V - 1)  # all -inf: token 0
    assert mask[4].nonzero().flatten().tolist() == [77]
    assert mask[5].nonzero().flatten().tolist() == [40]
    # The NaN row does not affect the others.
    clean = x.clone()
    clean[1] = 0.0
    clean[3] = 0.0
    other = run_mask(backend, clean, 0.5, 1.0, rule)
    for r in (0, 2, 4, 5):
        assert torch.equal(mask[r], other[r])
    for r in (0,):
        assert_matches_reference(mask[r], x[r], 0.5, 1.0, rule)


def test_dtypes_shapes_and_top_h(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 257, generator=g) * 2
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = backend.tensor(x.to(dtype))
        mask = logitkit.top_h_mask(xd, 0.4, temperature=1.3, rule="exact")
        assert mask.shape == x.shape
        for r in range(6):
            assert_matches_reference(
                mask.reshape(6, -1)[r].cpu(), xd.reshape(6, -1)[r].float().cpu(), 0.4, 1.3, "exact"
            )
        out = logitkit.top_h(xd, 0.4, temperature=1.3, rule="hf", filter_value=-1e4)
        m2 = logitkit.top_h_mask(xd, 0.4, temperature=1.3, rule="hf")
        assert out.dtype == dtype
        assert torch.equal(out[m2], xd[m2]) and (out[~m2] == -1e4).all()
    # Non-contiguous input (a slice of the last position).
    seq = backend.tensor(torch.randn(3, 5, 64, generator=g))
    assert torch.equal(logitkit.top_h_mask(seq[:, -1, :], 0.5), logitkit.top_h_mask(seq[:, -1, :].contiguous(), 0.5))
    # Empty inputs.
    assert logitkit.top_h_mask(backend.tensor(torch.empty(0, 10)), 0.5).shape == (0, 10)
    assert logitkit.top_h_mask(backend.tensor(torch.empty(3, 0)), 0.5).shape == (3, 0)


def test_bad_input(backend):
    op = backend.ops.top_h_mask
    x = backend.tensor(torch.randn(2, 10))
    for alpha in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            op(x, alpha, 1.0, "hf", -1)
    for T in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            op(x, 0.5, T, "hf", -1)
    with pytest.raises(ValueError, match="rule"):
        op(x, 0.5, 1.0, "top-p", -1)
    with pytest.raises(ValueError, match="cap"):
        op(x, 0.5, 1.0, "hf", 0)
    with pytest.raises(TypeError, match="float32"):
        op(backend.tensor(torch.randint(0, 5, (2, 10))), 0.5, 1.0, "hf", -1)
    with pytest.raises(ValueError, match="alpha"):
        logitkit.top_h(x, 2.0)
    with pytest.raises(ValueError, match="rule"):
        logitkit.top_h_mask(x, 0.5, rule="nope")


def test_sample_bad_input(backend):
    op = backend.ops.sample
    x, u = backend.tensor(torch.randn(2, 10)), backend.tensor(torch.rand(2))
    with pytest.raises(ValueError, match=r"logitkit\.sample: alpha"):
        op(x, u, 1.5, 1.0, "hf", -1)
    with pytest.raises(ValueError, match=r"logitkit\.sample: temperature"):
        op(x, u, None, 0.0, "hf", -1)
    with pytest.raises(ValueError, match=r"logitkit\.sample: rule"):
        op(x, u, 0.5, 1.0, "nope", -1)
    with pytest.raises(ValueError, match="uniform must have shape"):
        op(x, backend.tensor(torch.rand(3)), 0.5, 1.0, "hf", -1)
    with pytest.raises(TypeError, match="uniform must be float32"):
        op(x, u.double(), 0.5, 1.0, "hf", -1)
    with pytest.raises(TypeError, match="float32"):
        logitkit.sample(backend.tensor(torch.randint(0, 5, (2, 10))))
    with pytest.raises(ValueError, match="alpha"):
        logitkit.sample(x, top_h=0.0)


def test_opcheck(backend):
    g = torch.Generator().manual_seed(2)
    for rule in ("hf", "official", "exact"):
        x = backend.tensor(torch.randn(3, 37, generator=g))
        torch.library.opcheck(backend.ops.top_h_mask, (x, 0.5, 1.2, rule, 10))
        u = backend.tensor(torch.rand(3, generator=g))
        torch.library.opcheck(backend.ops.sample, (x, u, 0.5, 1.2, rule, 10))
    torch.library.opcheck(backend.ops.sample, (x, u, None, 1.2, "hf", -1))


def test_compile_fullgraph(backend):
    f = torch.compile(lambda x: logitkit.top_h(x, 0.4, temperature=1.5, rule="exact"), fullgraph=True)
    x = backend.tensor(torch.randn(4, 300))
    assert torch.equal(f(x), logitkit.top_h(x, 0.4, temperature=1.5, rule="exact"))
    # (dynamo cannot trace a torch.Generator argument; compiled code may draw
    # its uniforms with its own RNG, so check the tokens, not the stream)
    draw = torch.compile(lambda x: logitkit.sample(x, temperature=0.7, top_h=0.6), fullgraph=True)
    tokens = draw(x)
    keep = logitkit.top_h_mask(x, 0.6, temperature=0.7)
    assert tokens.shape == (4,) and keep[torch.arange(4), tokens].all()


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
def test_sample_chi_square(rule):
    g = torch.Generator().manual_seed(123)
    V, T, alpha = 12, 1.3, 0.8
    x = torch.randn(V, generator=g) * 1.5
    keep = logitkit.top_h_mask(x, alpha, temperature=T, rule=rule)
    n = 40000
    tokens = logitkit.sample(x.expand(n, V), temperature=T, top_h=alpha, rule=rule, generator=g)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[~keep].sum() == 0  # never a dropped token
    p = torch.softmax(torch.where(keep, x.double() / T, torch.tensor(-math.inf, dtype=torch.float64)), 0)
    kept = keep.nonzero().flatten()
    expected = p[kept] * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = max(1, kept.numel() - 1)
    # 99.99% quantile of chi-square is below dof + 8 sqrt(2 dof) + 15 for these dof.
    assert chi2 < dof + 8 * math.sqrt(2 * dof) + 15, (chi2, dof)


def run_sample(backend, x, u, alpha, temperature=1.0, rule="hf", cap=-1):
    """The sample op at the given uniforms u on the backend, back on the CPU."""
    return backend.ops.sample(backend.tensor(x), backend.tensor(u), alpha, temperature, rule, cap).cpu()


def kept_probabilities(x, alpha, temperature, rule, backend):
    """float64 softmax(x / T) over the kept set of each row (all tokens when alpha is None)."""
    keep = torch.ones_like(x, dtype=torch.bool) if alpha is None else run_mask(backend, x, alpha, temperature, rule)
    z = torch.where(keep, x.double() / temperature, torch.tensor(-math.inf, dtype=torch.float64))
    return torch.softmax(z, -1), keep


@pytest.mark.parametrize("rule,alpha", [("hf", 0.8), ("official", 0.5), ("exact", 0.4), ("exact", 1.0), ("hf", None)])
@pytest.mark.parametrize("V", [12, 700])
def test_sample_stratified_inverse_cdf(backend, rule, alpha, V):
    """n rows of the same logits at stratified u = (j + 1/2) / n: the draw is the
    inverse CDF, so each kept token is drawn n * p times up to +-1 (rounding of
    the CDF at a stratum boundary), and a dropped token never."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(V, generator=g) * 1.5
    x[V // 3] = -math.inf
    n, T = (24 if backend.name == "emulated-cuda" else 600), 1.3  # the emulator runs one OS thread per CUDA thread
    u = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
    tokens = run_sample(backend, x.expand(n, V), u, alpha, T, rule)
    p, keep = kept_probabilities(x[None], alpha, T, rule, backend)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[~keep[0]].sum() == 0 and counts[V // 3] == 0
    assert (counts - n * p[0]).abs().max() <= 1.01
    # Inverse CDF is monotone in u.
    assert (tokens.diff() >= 0).all() or (tokens[: n // 2].diff() >= 0).all()


@pytest.mark.parametrize("rule", ["hf", "exact"])
def test_sample_draw_matches_cdf(backend, rule):
    """Random rows, random u: the drawn token's CDF interval holds u (up to
    rounding); u = 0 gives the first kept token, u just below 1 one whose
    kept successors have negligible mass."""
    g = torch.Generator().manual_seed(11)
    V = 1200 if backend.name == "emulated-cuda" else 128256
    x = torch.randn(6, V, generator=g) * 2
    u = torch.rand(6, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2.0**-24
    for alpha in (0.9, None):
        tokens = run_sample(backend, x, u, alpha, 0.8, rule)
        p, keep = kept_probabilities(x, alpha, 0.8, rule, backend)
        cdf = torch.cumsum(p, -1)
        for r in range(6):
            t = int(tokens[r])
            assert keep[r, t] and p[r, t] > 0
            lo, hi = (cdf[r, t - 1].item() if t > 0 else 0.0), cdf[r, t].item()
            assert lo - 1e-5 <= u[r].item() <= hi + 1e-5, (r, t, lo, hi, u[r].item())
        kept = keep[0].nonzero().flatten()
        assert int(tokens[0]) == int(kept[0])
        assert p[1, int(tokens[1]) + 1 :].sum() <= 1e-5


@pytest.mark.parametrize("rule,alpha", [("hf", 0.8), ("official", 0.5), ("exact", 0.4), ("exact", 1.0), ("hf", None)])
@pytest.mark.parametrize("top", [1000.0, -1e4, 1030.0])
def test_sample_large_magnitudes(backend, rule, alpha, top):
    """Stratified inverse CDF (as above) on rows near |z| = 1000 to 1e4, where
    the kept mass comes out of the selection's bin sums; and, at u just below
    1, never a token of probability 0 (the tail of the row underflows)."""
    V, T = 300, 1.0
    g = torch.Generator().manual_seed(int(abs(top)))
    x = top + torch.randn(V, generator=g) * 1.5
    x[V - 40 :] = top - 200  # probability 0 in float32, at the end of the row
    x[V // 2] = top + 4
    n = 24 if backend.name == "emulated-cuda" else 600
    u = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
    u[-1] = 1.0 - 2.0**-24
    tokens = run_sample(backend, x.expand(n, V), u, alpha, T, rule)
    p, keep = kept_probabilities(x[None], alpha, T, rule, backend)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[~keep[0]].sum() == 0 and counts[V - 40 :].sum() == 0
    assert (p[0][tokens] > 0).all()
    # u[-1] moved from the last stratum's centre to its end: one count may move.
    assert (counts - n * p[0]).abs().max() <= 1.01 + 1
    assert (tokens.diff() >= 0).all()


@pytest.mark.parametrize("rule,alpha", [("hf", 0.6), ("official", 0.6), ("exact", 0.5), ("exact", 0.9)])
def test_sample_ties(backend, rule, alpha):
    """Stratified inverse CDF on rows of many exact ties, where the cut splits
    a tie group (its lowest indices are kept): the kept mass must count the
    kept part of the group only."""
    g = torch.Generator().manual_seed(17)
    V, T = 150, 1.0
    x = torch.randint(-3, 4, (V,), generator=g).float()
    n = 24 if backend.name == "emulated-cuda" else 600
    u = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
    tokens = run_sample(backend, x.expand(n, V), u, alpha, T, rule)
    p, keep = kept_probabilities(x[None], alpha, T, rule, backend)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[~keep[0]].sum() == 0
    assert (counts - n * p[0]).abs().max() <= 1.01
    assert (tokens.diff() >= 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_ties_resolved_at_second_digit(backend, dtype):
    """bf16 / fp16 logits widened to float leave their keys' low 13 bits constant, so each bin of
    the CUDA selection's second digit holds one value: "exact" resolves its cut there, keeping the
    lowest indices of a tie group it splits, as the last digit would one pass later (a negative
    value's key has those constant bits set: rows below zero too). Rows of many exact ties
    (integers, quarters, a repeated value near the top, negative integers) and a plain row below
    -10: the mask and stratified draws against the float64 reference; on the emulator the mask
    takes at most 3 passes (pass 1, the second digit, the write)."""
    g = torch.Generator().manual_seed(23)
    V = 700
    x = torch.stack(
        [
            torch.randint(-3, 4, (V,), generator=g).float(),
            torch.round(torch.randn(V, generator=g) * 8.0) / 4.0,
            torch.randn(V, generator=g) * 2.0,
            torch.randint(-9, -1, (V,), generator=g).float(),
            torch.randn(V, generator=g) * 2.0 - 20.0,
        ]
    )
    x[2, 100:300] = 2.5  # a tie group of 200 near the top of the plain row
    x = x.to(dtype)
    for alpha in (0.2, 0.5, 0.9):
        mask = run_mask(backend, x, alpha, 1.0, "exact")
        for r in range(x.shape[0]):
            assert_matches_reference(mask[r], x[r].float(), alpha, 1.0, "exact")
    n = 12 if backend.name == "emulated-cuda" else 300  # (the emulator: ~0.2 s a row of draws)
    u = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
    for r in range(x.shape[0]):
        tokens = run_sample(backend, x[r].expand(n, V), u, 0.5, 1.0, "exact")
        p, keep = kept_probabilities(x[r : r + 1].float(), 0.5, 1.0, "exact", backend)
        counts = torch.bincount(tokens, minlength=V).double()
        assert counts[~keep[0]].sum() == 0
        assert (counts - n * p[0]).abs().max() <= 1.01
    if backend.name == "emulated-cuda":
        emulator = _loader._C_emulated
        for r in range(x.shape[0]):
            emulator.count_row_reads(True)
            try:
                logitkit.top_h_mask(backend.tensor(x[r : r + 1]), 0.5, rule="exact")
            finally:
                reads = emulator.row_reads()
                emulator.count_row_reads(False)
            assert reads <= 3 * V, (r, reads / V)


def test_sample_special_rows(backend):
    x = torch.randn(5, 50)
    x[0, 7] = math.nan
    x[1, 3] = math.inf
    x[2] = -math.inf
    x[3, :40] = -math.inf
    u = torch.full((5,), 0.999)
    for alpha in (0.5, None):
        for rule in ("hf", "official", "exact"):
            tokens = run_sample(backend, x, u, alpha, 1.0, rule)
            assert tokens[:3].tolist() == [-1, -1, 0]
            assert 40 <= int(tokens[3]) < 50
    assert run_sample(backend, torch.empty(3, 0), torch.rand(3), 0.5).tolist() == [-1, -1, -1]
    assert run_sample(backend, torch.empty(0, 4), torch.rand(0), 0.5).shape == (0,)
    y = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    t = run_sample(backend, y, torch.rand(2, 3), 0.7, 1.0, "exact")
    assert t.shape == (2, 3) and t.dtype == torch.int64


def test_sample_reproducible_and_special_rows():
    x = torch.randn(5, 300)
    x[2, 4] = math.nan
    a = logitkit.sample(x, temperature=0.8, top_h=0.5, generator=torch.Generator().manual_seed(9))
    b = logitkit.sample(x, temperature=0.8, top_h=0.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and a.shape == (5,) and a.dtype == torch.int64
    assert a[2] == -1
    keep = logitkit.top_h_mask(x, 0.5, temperature=0.8)
    for r in (0, 1, 3, 4):
        assert keep[r, a[r]]
    plain = logitkit.sample(x[[0, 1]], temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert ((plain >= 0) & (plain < 300)).all()


# ---------------------------------------------------------------------------
# transformers integration
# ---------------------------------------------------------------------------


def test_transformers_processor_matches_theirs():
    Warper = _transformers_warper()
    if Warper is None:
        pytest.skip("transformers with TopHLogitsWarper is not installed")
    from logitkit.integrations.transformers import OfficialTopHLogitsWarper, TopHLogitsWarper

    g = torch.Generator().manual_seed(4)
    scores = torch.randn(4, 500, generator=g) * 2
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(TopHLogitsWarper(0.4)(ids, scores), Warper(top_h=0.4)(ids, scores))
    official = OfficialTopHLogitsWarper(0.4, temperature=1.5)(ids, scores)
    assert torch.equal(official != -math.inf, logitkit.top_h_mask(scores, 0.4, temperature=1.5, rule="official"))


def test_transformers_processor_attribute_names():
    """transformers' names (top_h, top_n) read and set the same state as ours (alpha, cap)."""
    Warper = _transformers_warper()
    if Warper is None:
        pytest.skip("transformers with TopHLogitsWarper is not installed")
    from logitkit.integrations.transformers import TopHLogitsWarper

    ours, theirs = TopHLogitsWarper(0.4), Warper(top_h=0.4)
    assert (ours.top_h, ours.top_n) == (theirs.top_h, theirs.top_n) == (0.4, 100)
    ours.top_n = theirs.top_n = 7
    ours.top_h = theirs.top_h = 0.9
    assert (ours.alpha, ours.cap) == (0.9, 7)
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 3
    ids = torch.zeros(3, 1, dtype=torch.long)
    assert torch.equal(ours(ids, scores), theirs(ids, scores))
    with pytest.raises(ValueError, match="top_h"):
        ours.top_h = 0.0
    with pytest.raises(ValueError, match="top_n"):
        ours.top_n = 0


def test_transformers_generate_same_tokens():
    Warper = _transformers_warper()
    if Warper is None:
        pytest.skip("transformers with TopHLogitsWarper is not installed")
    import transformers
    from transformers import LogitsProcessorList

    from logitkit.integrations.transformers import TopHLogitsWarper

    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    outs = []
    for proc in (TopHLogitsWarper(0.6), Warper(top_h=0.6)):
        torch.manual_seed(42)
        outs.append(
            model.generate(
                prompt,
                do_sample=True,
                max_new_tokens=8,
                logits_processor=LogitsProcessorList([proc]),
                top_k=None,
                top_p=None,
                temperature=1.0,
                pad_token_id=0,
            )
        )
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------
# Per-row alpha and temperature (top_h_mask_per_row)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
def test_per_row_alpha_and_temperature(backend, rule):
    """One alpha and one temperature per row equal row-by-row calls with numbers; alpha 0 turns
    Top-H off for its row (all True, whatever the row holds), and a special row keeps its
    definition (NaN: nothing; all -inf: token 0) when Top-H is on."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 301, generator=g) * 3
    x[1, 1, 5] = math.nan  # alpha 0.7: nothing kept
    x[1, 2] = -math.inf  # alpha 0.2: token 0
    x[0, 3, 9] = math.nan  # alpha 0: all True
    alpha = torch.tensor([[0.05, 0.4, 1.0, 0.0], [0.9, 0.7, 0.2, 0.0]])
    temperature = torch.tensor([[0.5, 1.0, 2.0, 1.0], [0.7, 1.3, 0.9, 3.0]])
    xd = backend.tensor(x)
    got = logitkit.top_h_mask(xd, backend.tensor(alpha), temperature=backend.tensor(temperature), rule=rule).cpu()
    for i in range(2):
        for j in range(4):
            a, t = alpha[i, j].item(), temperature[i, j].item()
            if a == 0.0:
                assert got[i, j].all()
            else:
                row = logitkit.top_h_mask(xd[i, j : j + 1], a, temperature=t, rule=rule).cpu()[0]
                assert torch.equal(got[i, j], row), (i, j)
    assert not got[1, 1].any() and got[1, 2].tolist() == [True] + [False] * 300
    # a number for one of the two, and a non-contiguous input
    half = logitkit.top_h_mask(xd, backend.tensor(alpha), temperature=1.3, rule=rule).cpu()
    assert torch.equal(half[1, 1], logitkit.top_h_mask(xd[1, 1:2], 0.7, temperature=1.3, rule=rule).cpu()[0])
    per_t = logitkit.top_h_mask(xd, 0.4, temperature=backend.tensor(temperature), rule=rule).cpu()
    assert torch.equal(per_t[0, 2], logitkit.top_h_mask(xd[0, 2:3], 0.4, temperature=2.0, rule=rule).cpu()[0])
    strided = backend.tensor(torch.randn(3, 2, 200, generator=g))[:, 1, :]
    a3, t3 = backend.tensor(torch.tensor([0.3, 0.0, 0.8])), backend.tensor(torch.tensor([1.0, 0.5, 2.0]))
    assert torch.equal(
        logitkit.top_h_mask(strided, a3, temperature=t3, rule=rule),
        logitkit.top_h_mask(strided.contiguous(), a3, temperature=t3, rule=rule),
    )
    filtered = logitkit.top_h(xd, backend.tensor(alpha), temperature=backend.tensor(temperature), rule=rule)
    torch.testing.assert_close(filtered.cpu(), torch.where(got, x, -math.inf), rtol=0, atol=0, equal_nan=True)


def test_per_row_bad_input(backend):
    op = backend.ops.top_h_mask_per_row
    x = backend.tensor(torch.randn(2, 10))
    ones = backend.tensor(torch.ones(2))
    with pytest.raises(ValueError, match="alpha must have shape"):
        op(x, backend.tensor(torch.ones(3)), ones, "hf", -1)
    with pytest.raises(TypeError, match="temperature must be float32"):
        op(x, ones, ones.double(), "hf", -1)
    with pytest.raises(ValueError, match="rule"):
        op(x, ones, ones, "nope", -1)
    if backend.device == "cpu":  # (CUDA tensors are not checked: a host synchronisation)
        for bad in (1.5, -0.1, math.nan):
            with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\] per row"):
                op(x, backend.tensor(torch.tensor([0.5, bad])), ones, "hf", -1)
            with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\] per row"):
                logitkit.top_h_mask(x, backend.tensor(torch.tensor([0.5, bad])))
        for bad in (0.0, -1.0, math.inf, math.nan, 1e-39):
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                op(x, ones, backend.tensor(torch.tensor([1.0, bad])), "hf", -1)
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                logitkit.top_h_mask(x, 0.5, temperature=backend.tensor(torch.tensor([1.0, bad])))
    with pytest.raises(ValueError, match="alpha must be a number or a tensor of shape"):
        logitkit.top_h_mask(x, backend.tensor(torch.ones(2, 1)))
    with pytest.raises(TypeError, match="alpha must be a floating-point tensor"):
        logitkit.top_h_mask(x, backend.tensor(torch.ones(2, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        logitkit.top_h_mask(x, 0.0)  # a number: 0 is not "off" (None is, in sample)


def test_per_row_opcheck_and_compile(backend):
    g = torch.Generator().manual_seed(3)
    x = backend.tensor(torch.randn(3, 37, generator=g))
    alpha = backend.tensor(torch.tensor([0.5, 0.0, 0.9]))
    temperature = backend.tensor(torch.tensor([1.2, 0.7, 2.0]))
    for rule in ("hf", "official", "exact"):
        torch.library.opcheck(backend.ops.top_h_mask_per_row, (x, alpha, temperature, rule, 10))
    f = torch.compile(lambda x, a, t: logitkit.top_h(x, a, temperature=t, rule="exact"), fullgraph=True)
    assert torch.equal(f(x, alpha, temperature), logitkit.top_h(x, alpha, temperature=temperature, rule="exact"))


@pytest.mark.parametrize("rule", ["hf", "official", "exact"])
def test_sample_per_row_alpha(backend, rule):
    """The fused Top-H sampler with one alpha per row (op sample_per_row; alpha 0: the whole row)
    draws the token the same call with numbers draws row by row (counter-based uniforms: the
    same u per row), and its outputs describe each row's own kept set."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 700, generator=g) * 2
    x[4, 9] = math.nan
    x[5] = -math.inf
    alpha = torch.tensor([0.3, 0.0, 0.9, 0.6, 0.5, 0.0])
    seed = torch.arange(6) * 7 + 1
    xd = backend.tensor(x)
    out = logitkit.sample(
        xd,
        top_h=backend.tensor(alpha),
        temperature=0.8,
        rule=rule,
        seed=backend.tensor(seed),
        return_logprobs=True,
        return_entropy=True,
        return_kept=True,
    )
    for i in range(6):
        a = alpha[i].item()
        one = logitkit.sample(
            xd[i : i + 1],
            top_h=None if a == 0.0 else a,
            temperature=0.8,
            rule=rule,
            seed=int(seed[i]),
            return_kept=True,
        )
        assert out.tokens[i].item() == one.tokens[0].item(), i
        if a != 0.0:
            assert out.kept[i].item() == one.kept[0].item(), i
    tok = out.tokens.cpu()
    assert tok[4].item() == -1 and tok[5].item() == 0
    assert out.kept.cpu()[4:].tolist() == [0, 1]
    keep = logitkit.top_h_mask(xd, backend.tensor(alpha), temperature=0.8, rule=rule).cpu()
    assert keep[:4].gather(-1, tok[:4, None]).all() and keep[1].all()
    assert torch.equal(out.kept.cpu()[:4], keep[:4].sum(-1))
    q = torch.softmax((x[:4].double() / 0.8).masked_fill(~keep[:4], -math.inf), -1)
    log_q = q.gather(-1, tok[:4, None]).squeeze(-1).log()
    torch.testing.assert_close(out.logprobs[:4].cpu().double(), log_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        out.entropy[:4].cpu().double(), references.entropy_terms(q).sum(-1), atol=1e-4, rtol=1e-4
    )
    op = backend.ops.sample_per_row
    u = backend.tensor(torch.rand(6, generator=g))
    ones = backend.tensor(torch.ones(6))
    torch.library.opcheck(op, (xd[:4], u[:4], backend.tensor(alpha[:4]), ones[:4], rule, 10))
    with pytest.raises(ValueError, match="alpha must have shape"):
        op(xd, u, backend.tensor(torch.ones(5)), ones, rule, -1)
    with pytest.raises(ValueError, match="uniform must have shape"):
        op(xd, u[:5], ones, ones, rule, -1)
    if backend.device == "cpu":
        with pytest.raises(ValueError, match=r"logitkit\.sample: alpha must be in \[0, 1\] per row"):
            op(xd, u, ones * 1.5, ones, rule, -1)
