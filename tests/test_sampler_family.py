"""Tests of the row-statistics rules of the sampler family (logitkit.truncation_mask,
filter_logits, sample with top_k / min_p / top_n_sigma / p_less / epsilon / eta / typical / EDT /
temperature 0, counter-based seeds, mirostat_sample) on every backend. References:
logitkit.testing.references.truncation_mask (float64, sort and scan of the published
definitions), references.mirostat_keep and transformers' warpers."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import logitkit
import logitkit.testing
from conftest import EMULATED_DEFAULTS
from logitkit import _loader
from logitkit.testing import backends, references

# The CUDA kernels' gathered path (csrc/cuda/row_filters_kernels.cuh): a top-k of at most
# GATHERED_TOP_K tokens gathers its survivors, ties included, into GATHER_CAPACITY slots of shared
# memory, and typical's and top-p's selections stop at a crossing bin of at most CROSSING_CAPACITY
# candidates; a top-k that does not gather its survivors stops its selection at a crossing bin of
# at most TOP_K_CROSSING_CAPACITY tokens, which pass 1 gathers (test_gather_sizes_match_the_kernels).
GATHERED_TOP_K = 896
GATHER_CAPACITY = 1024
CROSSING_CAPACITY = 1024
TOP_K_CROSSING_CAPACITY = 8192

RULES = {
    "min_p": dict(min_p=0.1),
    "top_n_sigma": dict(top_n_sigma=1.0),
    "p_less": dict(p_less=True),
    "epsilon": dict(epsilon=3e-4),
    "eta": dict(eta=3e-4),
    "all": dict(min_p=0.02, top_n_sigma=2.0, p_less=True, epsilon=1e-4, eta=1e-3),
    "none": dict(),
    "top_k": dict(top_k=20),
    "top_k_then_rest": dict(top_k=40, top_n_sigma=1.0, p_less=True, epsilon=3e-3, eta=3e-3),
    "edt": dict(edt_theta=1.0),
    "edt_min_p": dict(edt_theta=0.5, edt_base=0.6, min_p=0.1, top_k=100),
    "top_p": dict(top_p=0.8),
    "top_k_top_p_min_p": dict(top_k=50, top_p=0.9, min_p=0.02),
    "top_p_epsilon_eta": dict(top_p=0.7, epsilon=1e-3, eta=3e-3),
    "typical": dict(typical_p=0.6),
    "top_k_top_p_min_p_typical": dict(top_k=60, top_p=0.9, min_p=0.02, typical_p=0.8),
    "typical_then_epsilon_eta": dict(typical_p=0.4, top_n_sigma=2.0, p_less=True, epsilon=1e-3, eta=3e-3),
    "min_p_then_epsilon_eta": dict(min_p=0.3, epsilon=0.06, eta=0.05),
}


def rows(n: int, vocab: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("vocab", [1, 31, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_kept_set_matches_reference(backend, rule, vocab, temperature):
    x = rows(6, vocab)
    got = logitkit.truncation_mask(backend.tensor(x), temperature=temperature, **RULES[rule]).cpu()
    expected = references.truncation_mask(x, temperature=temperature, **RULES[rule])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["min_p", "top_n_sigma", "eta", "typical"])
def test_low_precision_inputs(backend, dtype, rule):
    x = rows(4, 1000).to(dtype)  # the reference sees the same rounded values
    got = logitkit.truncation_mask(backend.tensor(x), temperature=0.9, **RULES[rule]).cpu()
    assert torch.equal(got, references.truncation_mask(x, temperature=0.9, **RULES[rule]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_filter_logits_writes_kept_logits(backend, dtype):
    """filter_logits: the logits (exactly, in their dtype) where the mask keeps them, filter_value
    elsewhere, special rows included; with requires_grad the gradient reaches the kept logits."""
    x = rows(5, 1000).to(dtype)
    x[1, 5] = math.nan
    x[2] = -math.inf
    x[3, :900] = -math.inf
    rules = dict(temperature=0.9, top_k=100, min_p=0.02, eta=1e-3)
    keep = references.truncation_mask(x, **rules)
    for fill in (-math.inf, -123.0):
        got = logitkit.filter_logits(backend.tensor(x), filter_value=fill, **rules).cpu()
        assert got.dtype == dtype
        assert torch.equal(got, torch.where(keep, x, torch.tensor(fill, dtype=dtype)))
    leaf = backend.tensor(x[4:].float()).requires_grad_()
    logitkit.filter_logits(leaf, **rules).masked_fill(~keep[4:].to(leaf.device), 0.0).sum().backward()
    assert torch.equal(leaf.grad.cpu(), keep[4:].float())


def test_large_vocab_and_non_contiguous(backend):
    x = rows(2, 2 * 50257, scale=2.0)[:, ::2]
    got = logitkit.truncation_mask(backend.tensor(x), min_p=0.05, top_n_sigma=3.0).cpu()
    typical = logitkit.truncation_mask(backend.tensor(x), typical_p=0.9, top_k=5000).cpu()
    assert torch.equal(typical, references.truncation_mask(x, typical_p=0.9, top_k=5000))
    assert torch.equal(got, references.truncation_mask(x, min_p=0.05, top_n_sigma=3.0))


def ulp_ladder(start: float, n: int) -> torch.Tensor:
    """n float32 values from `start` up, each one ulp above the one before."""
    ladder = torch.full((n,), start)
    for i in range(1, n):
        ladder[i] = torch.nextafter(ladder[i - 1], torch.tensor(math.inf))
    return ladder


def rank_selection_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows whose k-th largest logit the CUDA kernels' radix selection resolves at each of its
    digits: lone tokens far above the rest (a first-digit bin of one token), a tie group across
    the k-th, fp32 neighbours one ulp apart (only the last digit separates them), signed zeros,
    -inf past the k-th, one value everywhere (more tokens than the CUDA gather capacity), few
    distinct values, tiny magnitudes."""
    x = rows(9, 1100, scale=2.0, seed=7)
    x[0, :3] = torch.tensor([30.0, 20.0, 14.0])
    x[1, :40] = 7.0
    x[2, 100:130] = ulp_ladder(5.0, 30)
    x[3] = -x[3].abs()
    x[3, 10:15] = 0.0
    x[3, 20:25] = -0.0
    x[4, 500:] = -math.inf
    x[5] = 1.5
    x[6] = torch.randint(-4, 5, (1100,), generator=torch.Generator().manual_seed(3)).float()
    x[7] *= 1e-30
    x[8, ::7] = -x[8, ::7] * 4.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_selection_at_every_digit(backend, dtype):
    """top-k and min_tokens_to_keep on rows built for the k-th-largest selection (CUDA: it stops
    at the first digit whose crossing bin holds one value, 16-bit inputs at the second digit at
    the latest): the kept set equals the float64 reference for k around the ties, the lone
    tokens and the -inf tail; with top-k / min-p alone (the cut needs only the row max, which the
    CUDA selection's first pass finds: no statistics pass) and with top-p and other rules after
    it (CUDA: a top-k of at most 896 tokens with at most 1024 survivors, ties included, is
    gathered, or spelled out by the selection's last digit, and the rules, typical included, run
    over that copy; a larger tie group takes the row passes) the sampler's draws stay in that set
    and its kept count and log-probs match the reference."""
    x = rank_selection_rows(dtype)
    for k in (1, 2, 12, 40, 41, 300, GATHERED_TOP_K, GATHERED_TOP_K + 1, 999):
        for rules in (
            dict(top_k=k),
            dict(top_k=k, min_p=0.05, temperature=0.7),
            dict(min_p=0.5, min_tokens_to_keep=k),
            dict(top_k=k, top_p=0.8, eta=1e-3, temperature=0.7),
            dict(top_k=k, top_p=0.9, typical_p=0.7, top_n_sigma=2.0),
            dict(top_k=k, typical_p=0.5, temperature=0.7),
            dict(top_k=k, typical_p=0.9, min_p=0.02, min_tokens_to_keep=3),
        ):
            # row 7 (|z| ~ 1e-30: equal weights, top-p and typical decided by rounding) only without sums
            y = x[[0, 1, 2, 3, 4, 5, 6, 8]] if "top_p" in rules or "typical_p" in rules else x
            got = logitkit.truncation_mask(backend.tensor(y), **rules).cpu()
            assert torch.equal(got, references.truncation_mask(y, **rules)), (k, rules)
    # NaN of either sign (a negative NaN's key lies below -inf's) leaves the row undefined
    negative_nan = torch.tensor(-4194304, dtype=torch.int32).view(torch.float32)  # bits 0xFFC00000
    nan_rows = x[:2].float().clone()
    nan_rows[0, 500] = negative_nan
    nan_rows[1, 500] = math.nan
    for rules in (dict(top_k=3), dict(min_p=0.5, min_tokens_to_keep=3)):
        assert not logitkit.truncation_mask(backend.tensor(nan_rows.to(dtype)), **rules).cpu().any()
    for rules in (
        dict(top_k=12, min_p=0.01, temperature=0.7),
        dict(top_k=40, top_p=0.9, temperature=0.7),
        dict(top_k=40, typical_p=0.5, temperature=0.7),
    ):
        check_sampled_statistics(backend, x[[0, 1, 2, 3, 4, 5, 6, 8]] if "typical_p" in rules else x, rules)


def test_top_k_ties_of_scaled_logits(backend):
    """top-k (and top-p after it) compare z = x * (1/T) in float32, as transformers' warpers do
    after its float32 temperature division: logits one ulp apart that round to one z are ties
    there, so top-k keeps all of them (the float64 reference of x / T keeps exactly k). Equal to
    the reference over the float32 z at T = 1 on every backend (CUDA: the survivors spelled out
    by the selection's last digit are complete only when the key below the k-th largest scales
    to a smaller z, and a range gathered after the selection stopped early only when the key
    below the range does; other rows take the gather pass)."""
    x = rows(4, 1000, scale=1.0, seed=11)
    x[:, 100:141] = ulp_ladder(3.6, 41).flip(0)  # above every other logit of the rows
    inv_t = torch.tensor(1 / 0.7, dtype=torch.float32)
    z = x * inv_t
    assert z[0, 100:141].unique().numel() < 41  # the scaling merges neighbours
    ties = []
    for k in (3, 4, 5, 30):
        for rules in (dict(top_k=k), dict(top_k=k, top_p=0.55), dict(top_k=k, top_p=0.55, min_p=0.2)):
            got = logitkit.truncation_mask(backend.tensor(x), temperature=0.7, **rules).cpu()
            assert torch.equal(got, references.truncation_mask(z, **rules)), (k, rules)
            if len(rules) == 1:  # top-k alone: k, or more where z ties across the k-th
                ties.append(got.sum(-1) - k)
    assert torch.stack(ties).min() == 0 and torch.stack(ties).max() > 0
    # x_k at the lowest key of a first-digit bin (3.5 = 1.75 * 2) whose lower neighbour scales
    # to the same z (5.0): CUDA's selection stops early at that bin when it holds few tokens,
    # and the survivor below the bin needs the gather pass
    below = torch.nextafter(torch.tensor(3.5), torch.tensor(-math.inf))
    assert below * inv_t == torch.tensor(3.5) * inv_t
    for k in (3, 5):
        y = rows(2, 1000, scale=1.0, seed=12)
        y[:, 200 : 200 + k] = ulp_ladder(3.5, k)
        y[:, 200 + k] = below
        for rules in (dict(top_k=k, top_p=0.55), dict(top_k=k, top_p=0.4, typical_p=0.9)):
            got = logitkit.truncation_mask(backend.tensor(y), temperature=0.7, **rules).cpu()
            assert torch.equal(got, references.truncation_mask(y * inv_t, **rules)), (k, rules)


# The CUDA kernels' worst-case passes over a row (docs/sampling.md, "Passes over the row") per
# rule set of the mask op: for rows whose top-k survivors (ties included) are at most
# GATHER_CAPACITY, and
# for rows with more (a tie group at the k-th logit: the gather overflows, and the row takes the
# rank selection's digit passes (fp32 3, bf16 / fp16 2) + the gather + the path without top-k).
# typical outside top-k's gathered survivors, and top-p there when no later rule reads its kept
# sums, take one pass more on a row whose crossing bin holds more than CROSSING_CAPACITY
# candidates (CROSSING_TIE_PASS).
PASS_BUDGETS = [
    (dict(top_k=50, top_p=0.9), 4, 3 + 1 + 4),
    (dict(top_k=800, top_p=0.7, min_p=0.01), 4, 3 + 1 + 4),
    (dict(top_k=50, top_p=0.9, eta=1e-3, temperature=0.7), 4, 3 + 1 + 4),
    (dict(top_k=50, typical_p=0.5), 4, 3 + 1 + 5),
    (dict(top_k=120, top_p=0.95, typical_p=0.9, top_n_sigma=2.0), 4, 3 + 1 + 8),
    (dict(top_k=50), 4, 4),  # top-k alone: its digit passes + the write, no gather
    (dict(top_p=0.9), 3, None),
    (dict(min_p=0.1, temperature=0.7), 2, None),
    (dict(typical_p=0.5), 4, None),
    # typical's first digit needs the center c: 6 where its guess from top-p's passes misses (4 where it
    # holds: test_typical_after_top_p_guesses_its_first_digit)
    (dict(top_p=0.9, typical_p=0.9), 6, None),
    (dict(top_p=0.9, epsilon=1e-5), 4, None),  # top-p cannot leave its crossing bin to the write pass
    # Top-H first ("hf", K = 100 / 256): 4, + a partial pass where its cut splits a tie group
    # (its K candidates never overflow: x_K's tie group is stored up to the capacity and counted)
    (dict(top_h=0.5, top_k=50, top_p=0.9), 5, None),
    (dict(top_h=0.3, typical_p=0.7, min_p=0.02, temperature=0.7), 5, None),
    (dict(top_h=0.8, cap=256, top_p=0.9, eta=1e-3, min_tokens_to_keep=3), 5, None),
]


CROSSING_TIE_PASS = 1

# bf16 / fp16 logits: each bin of the second digit of their keys holds one value (the low 13 bits
# of a widened 16-bit float are constant), so a top-p that cannot leave its crossing bin to the
# write pass (a later rule reads its kept sums) resolves at the second digit, one pass early.
SIXTEEN_BIT_PASS_BUDGETS = [
    (dict(top_p=0.9, typical_p=0.9), 5, None),
    (dict(top_p=0.9, epsilon=1e-5), 3, None),
]


def largest_tie_group(row: torch.Tensor) -> int:
    """The number of tokens of the row's most frequent value."""
    return int(row.float().unique(return_counts=True)[1].max())


def emulated_passes(op, row: torch.Tensor, **rules) -> float:
    """Passes over the row that op(row, **rules) made on the emulated-CUDA backend (one row):
    the kernels' reads of input elements, counted by the emulator, over the row length."""
    _loader._C_emulated.count_row_reads(True)
    try:
        op(row, **rules)
    finally:
        reads = _loader._C_emulated.row_reads()
        _loader._C_emulated.count_row_reads(False)
    return reads / row.shape[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_passes_within_budget(dtype):
    """The CUDA kernels keep the pass budgets that docs/sampling.md states, counted by the
    emulator one row per call (rows of every digit of the rank selection, random rows), and the
    sampler adds at most one warp's share of a pass (the draw) and the drawn token's read."""
    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    x = torch.cat([rank_selection_rows(torch.float32), rows(4, 1100, scale=3.0, seed=2)]).to(dtype)
    _loader._C_emulated.configure(**EMULATED_DEFAULTS)
    draw_share = -(-x.shape[-1] // -(-EMULATED_DEFAULTS["threads_per_block"] // 32)) + 1
    short_rank = 1 if dtype != torch.float32 else 0  # 16-bit keys: at most 2 digit passes
    with backends.use_backend("emulated-cuda"):
        sixteen_bit = SIXTEEN_BIT_PASS_BUDGETS if dtype != torch.float32 else []
        for rules, budget, overflow_budget in PASS_BUDGETS + sixteen_bit:
            for r in range(x.shape[0]):
                row = x[r : r + 1]
                k = rules.get("top_k", 0)
                survivors = int((row.float() >= row.float().topk(k).values[0, -1]).sum()) if k else 0
                overflows = overflow_budget is not None and survivors > GATHER_CAPACITY
                limit = overflow_budget - short_rank if overflows else budget
                outside_gather = not 0 < k <= GATHERED_TOP_K and "top_h" not in rules
                top_p_waits = "top_p" in rules and not {"typical_p", "epsilon", "eta"} & rules.keys()
                gathers_crossing = outside_gather and ("typical_p" in rules or top_p_waits)
                if gathers_crossing and largest_tie_group(row) > CROSSING_CAPACITY:
                    limit += CROSSING_TIE_PASS  # (this row's one value everywhere)
                mask = emulated_passes(logitkit.truncation_mask, row, **rules)
                assert mask <= limit, (rules, r, mask)
                drawn = emulated_passes(functools.partial(logitkit.sample, seed=1), row, **rules)
                assert drawn <= limit + draw_share / x.shape[-1], (rules, r, drawn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_typical_resolves_its_crossing_bin(backend, dtype):
    """typical's selection on CUDA stops at the first digit whose crossing bin holds at most
    CROSSING_CAPACITY candidates, and the write / draw pass gathers that bin's candidates
    and finds d* among them (resolve_typical_crossing). Rows of 8000 logits, some of whose
    first-digit crossing bins hold more (so the second digit's is gathered), with ties of distance
    (bf16 values, a grid of quarters, a repeated value, a dense cluster that bf16 turns into one
    tie group, a wider one of bf16 ties of up to about 500), a crossing set by min_tokens_to_keep,
    typical after min-p: the mask, filter_logits and
    the sampler's token, log-prob and kept count equal the float64 reference. On the emulator the
    mask takes at most 4 passes (3 when the first digit's bin is gathered), 5 on a row whose
    crossing bin is a tie group of more than CROSSING_CAPACITY."""
    g = torch.Generator().manual_seed(5)
    x = rows(6, 8000, scale=0.5, seed=11)
    x[1, :2000] = 1.0 + 1e-3 * torch.randn(2000, generator=g)
    x[2] = torch.round(x[2] * 8.0) / 4.0
    x[3, 100:400] = x[3, 7]  # 301 tokens of one distance
    x[4] = x[4] * 4.0 - 3.0
    x[5, :2000] = 1.0 + 1e-2 * torch.randn(2000, generator=g)  # bf16: ties of up to about 500
    x = x.to(dtype)
    rule_sets = [
        dict(typical_p=0.5, temperature=1.0),
        dict(typical_p=0.9, temperature=0.8),
        dict(typical_p=0.05, min_tokens_to_keep=700, temperature=1.0),
        dict(typical_p=0.7, min_p=0.05, temperature=1.0),
    ]
    for rules in rule_sets:
        check_mask_logits_and_draws(backend, x, rules)
    if backend.name == "emulated-cuda":
        passes = [emulated_passes(logitkit.truncation_mask, x[r : r + 1], **rule_sets[0]) for r in range(6)]
        heavy_ties = [int(largest_tie_group(x[r]) > CROSSING_CAPACITY) for r in range(6)]
        assert all(p <= 4 + t * CROSSING_TIE_PASS for p, t in zip(passes, heavy_ties)), passes
        assert 4 in passes, passes  # some row gathered its second digit's bin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_top_p_resolves_at_second_digit(backend, dtype):
    """bf16 / fp16 logits: each second-digit bin of their keys holds one value, so top-p's selection
    on CUDA, when it cannot leave its crossing bin to the write pass (typical, epsilon or eta
    follow), resolves a failing bin there as a tie group kept whole (SIXTEEN_BIT_PASS_BUDGETS).
    Rows of ties at negative and positive values (negative integers, all logits below -10,
    quarters below zero, small integers; a negative value's key has its constant low bits set):
    the mask, filter_logits and the sampler's token, kept count and log-prob equal the float64
    reference."""
    g = torch.Generator().manual_seed(8)
    x = torch.stack(
        [
            torch.randint(-9, -1, (3000,), generator=g).float(),
            torch.randn(3000, generator=g) * 2.0 - 20.0,
            torch.round(torch.randn(3000, generator=g) * 8.0) / 4.0 - 5.0,
            torch.randint(-3, 4, (3000,), generator=g).float(),
        ]
    ).to(dtype)
    for rules in (
        dict(top_p=0.9, epsilon=1e-5, temperature=1.0),
        dict(top_p=0.5, typical_p=0.9, temperature=0.8),
        dict(top_p=0.7, eta=1e-3, temperature=1.0),
    ):
        check_mask_logits_and_draws(backend, x, rules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_typical_after_top_p_guesses_its_first_digit(backend, dtype):
    """typical after top-p on CUDA: top-p's digit passes build typical's first digit around the
    center of the kept sums above top-p's crossing bin (TypicalFirstDigitGuess), typical's first
    digit pass builds the second digit of the bin that guess names (GuessedBinSecondDigit), and the
    walk over the exact first digit takes it when it refines into that bin (no second digit pass),
    else goes on as without the guess. Rows of 20000 logits where the guess holds (N(0, 1),
    N(0, 9)) and where the mass above top-p's crossing is far from the rest (a few tokens at 6 or
    4 above a dense cluster at top-p's crossing, a tie group in bf16): the mask, filter_logits and
    the sampler equal the float64 reference; on the emulator the N(0, sigma^2) rows take 4 passes
    (5 or 6 without the guess; a forced wrong guess gave those counts and the same outputs), as does
    a bf16 N(0, 9) row of 128256 logits whose first-digit crossing bin of top-p holds much of the
    kept mass (5 when the guessed center counted only the mass above that bin)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 20000, generator=g)
    x[1] *= 3.0
    x[2, :40] = 6.0 + 0.01 * torch.randn(40, generator=g)
    x[2, 100:6100] = 2.0 + 0.002 * torch.randn(6000, generator=g)
    x[3, :200] = 4.0 + 0.1 * torch.randn(200, generator=g)
    x[3, 1000:9000] = 1.0 + 0.01 * torch.randn(8000, generator=g)
    x = x.to(dtype)
    rule_sets = [dict(top_p=0.9, typical_p=0.9, temperature=1.0), dict(top_p=0.7, typical_p=0.5, temperature=1.0)]
    for rules in rule_sets:
        check_mask_logits_and_draws(backend, x, rules)
    if backend.name == "emulated-cuda":
        _loader._C_emulated.configure(**EMULATED_DEFAULTS)
        passes = [emulated_passes(logitkit.truncation_mask, x[r : r + 1], **rule_sets[0]) for r in range(2)]
        assert passes == [4.0, 4.0], passes
        if dtype == torch.bfloat16:
            wide = (torch.randn(10, 128256, generator=torch.Generator().manual_seed(0))[5:6] * 3.0).to(dtype)
            assert emulated_passes(logitkit.truncation_mask, wide, **rule_sets[0]) == 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_typical_after_a_threshold_rule_guesses_its_first_digit(backend, dtype):
    """typical after min-p, p-less or top-n-sigma (no top-p) on CUDA: those rules move the
    candidates' threshold, so their sums take a pass of their own; pass 1 builds the logits' first
    digit, and that pass also builds typical's first digit around the center of the bins wholly
    above the threshold (typical_passes, as TypicalFirstDigitGuess does in top-p's passes), whose
    guessed crossing bin typical's first digit pass refines at once (GuessedBinSecondDigit). Rows
    where the guess holds (N(0, 1), N(0, 9)) and where the candidates' mass is far from the bins
    above the threshold (a dense cluster in the threshold's own bin, a tie group in bf16): the
    mask, filter_logits and the sampler equal the float64 reference; on the emulator min-p's
    N(0, sigma^2) rows take 4 passes (the N(0, 1) row took 5 without the guess)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 20000, generator=g)
    x[1] *= 3.0
    x[2, :10] = 4.0
    x[2, 100:8100] = -0.6 + 0.01 * torch.randn(8000, generator=g)
    x[3, :300] = 3.0 + 0.1 * torch.randn(300, generator=g)
    x[3, 1000:9000] = 0.5 + 0.001 * torch.randn(8000, generator=g)
    x = x.to(dtype)
    rule_sets = [
        dict(min_p=0.01, typical_p=0.5, temperature=1.0),
        dict(p_less=True, typical_p=0.9, temperature=1.0),
        dict(top_n_sigma=2.0, typical_p=0.7, temperature=0.8),
    ]
    for rules in rule_sets:
        check_mask_logits_and_draws(backend, x, rules)
    if backend.name == "emulated-cuda":
        _loader._C_emulated.configure(**EMULATED_DEFAULTS)
        passes = [emulated_passes(logitkit.truncation_mask, x[r : r + 1], **rule_sets[0]) for r in range(2)]
        assert passes == [4.0, 4.0], passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_p_resolves_its_crossing_bin(backend, dtype):
    """When no later rule reads top-p's kept sums (no typical, epsilon, eta), top-p's selection on
    CUDA stops at the first digit whose crossing bin holds at most CROSSING_CAPACITY candidates,
    and the write / draw pass gathers that bin and finds top-p's threshold among them, then the
    final one with the other rules and the keep floor (resolve_crossing). Rows of 8000 logits,
    some of whose first-digit crossing bins hold more (so the second digit's is gathered), with
    ties (bf16 values, a grid of quarters, a tie group of 2000 at the top, a cluster), rule
    sets where min-p, top-n-sigma, p-less or top-k move the threshold above top-p's and where
    min_tokens_to_keep moves it below: the mask, filter_logits and the sampler's token, log-prob
    and kept count equal the float64 reference; also where the key below the crossing bin scales
    to the z of the bin's lowest key (T < 1). On the emulator the mask takes 2 passes when the
    first digit's bin is gathered, 3 when the second's is, 4 when the crossing bin is a tie group
    of more than CROSSING_CAPACITY."""
    g = torch.Generator().manual_seed(6)
    x = rows(6, 8000, scale=1.5, seed=12)
    x[1, :3000] = 2.0 + 0.2 * torch.rand(3000, generator=g)  # one first-digit bin, bf16: 13 values
    x[2] = torch.round(x[2] * 4.0) / 4.0
    x[3, :2000] = 5.0  # one value above the rest, 2000 tokens
    x[4] = x[4] * 4.0 - 3.0
    x[5, :2000] = 1.0 + 1e-2 * torch.randn(2000, generator=g)  # bf16: ties of up to about 500
    x = x.to(dtype)
    rule_sets = [
        dict(top_p=0.5, temperature=1.0),
        dict(top_p=0.9, min_p=0.05, temperature=0.8),
        dict(top_p=0.3, min_tokens_to_keep=700, temperature=1.0),
        dict(top_k=3000, top_p=0.8, temperature=0.7),
        dict(top_k=1000, top_p=0.99, min_tokens_to_keep=1500, temperature=1.0),  # top-k: k = 1500
        dict(top_p=0.95, top_n_sigma=1.5, p_less=True, temperature=1.0),
    ]
    for rules in rule_sets:
        check_mask_logits_and_draws(backend, x, rules)
    # the crossing bin's lowest key (3.5 = 1.75 * 2) and the key below it scale to one z at
    # T = 0.7: the token below would be decided without top-p's threshold, so CUDA's selection
    # refines that bin instead of gathering it
    inv_t = torch.tensor(1 / 0.7, dtype=torch.float32)
    below = torch.nextafter(torch.tensor(3.5), torch.tensor(-math.inf))
    assert below * inv_t == torch.tensor(3.5) * inv_t
    y = rows(2, 1000, scale=1.0, seed=13)
    y[:, 200:205] = ulp_ladder(3.5, 5)
    y[:, 205] = below
    for top_p in (0.02, 0.1, 0.2):
        got = logitkit.truncation_mask(backend.tensor(y), temperature=0.7, top_p=top_p).cpu()
        assert torch.equal(got, references.truncation_mask(y * inv_t, top_p=top_p)), top_p
    if backend.name == "emulated-cuda":
        passes = [emulated_passes(logitkit.truncation_mask, x[r : r + 1], **rule_sets[0]) for r in range(6)]
        heavy_ties = [int(largest_tie_group(x[r]) > CROSSING_CAPACITY) for r in range(6)]
        assert all(p <= 3 + t * CROSSING_TIE_PASS for p, t in zip(passes, heavy_ties)), passes
        assert 2 in passes and 3 in passes, passes  # rows gathered the first and the second digit's bin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_resolves_its_crossing_bin(backend, dtype):
    """A top-k of more than GATHERED_TOP_K tokens whose cut needs pass 1 (top-p, typical, epsilon,
    top-n-sigma, ...): its selection on CUDA stops at the first digit whose crossing bin holds at
    most TOP_K_CROSSING_CAPACITY tokens, pass 1 gathers that bin's keys and counts only the tokens
    above it, and after the pass the k-th largest is selected among the bin's keys, whose survivors
    join the statistics and top-p's first digit (resolve_top_k_crossing). Rows of 10000 logits
    whose k-th largest lies in a first-digit bin of at most that many tokens (one of the capacity
    - 500; one whose k-th largest is in a tie group of half the capacity, a single digit for the
    selection's atomics) or in a larger one (a cluster of the capacity + 1000), on a grid of
    quarters (ties across the k-th), in a tie group of the capacity + 500 (the selection goes on
    to the last digit), among -inf entries: the mask, filter_logits and the sampler's token,
    log-prob and kept count equal the float64 reference; also at T < 1 where the key below the
    bin scales to the z of the bin's lowest key (check_top_k_bin_with_a_scaled_neighbour). On the
    emulator, fp32 rows whose crossing bin is gathered take one or two digit passes fewer than the
    selection's three (top-k + epsilon: 3 passes where the first digit's bin is gathered, 4 where
    the second's is, 5 on the tie group)."""
    g = torch.Generator().manual_seed(7)
    cluster, tie_group = TOP_K_CROSSING_CAPACITY + 1000, TOP_K_CROSSING_CAPACITY + 500
    gathered = TOP_K_CROSSING_CAPACITY - 500
    x = rows(8, 10000, scale=1.5, seed=14)
    x[1, :cluster] = 2.0 + 0.2 * torch.rand(cluster, generator=g)  # the k-th in a first-digit bin of `cluster`
    x[2] = torch.round(x[2] * 4.0) / 4.0
    x[3, :tie_group] = 5.0  # the k-th in a tie group of `tie_group`
    x[4] = x[4] * 4.0 - 3.0
    x[5, ::3] = -math.inf
    x[6, :gathered] = 2.0 + 0.2 * torch.rand(gathered, generator=g)  # a first-digit bin of `gathered`
    x[7, : TOP_K_CROSSING_CAPACITY // 2] = 3.0  # the k-th in a gathered tie group
    x = x.to(dtype)
    rule_sets = [
        dict(top_k=1500, top_p=0.9, temperature=1.0),
        dict(top_k=1000, top_p=0.5, min_p=0.05, temperature=0.7),
        dict(top_k=2500, typical_p=0.8, temperature=1.0),
        dict(top_k=1200, epsilon=3e-4, top_n_sigma=2.0, temperature=1.3),
        dict(top_k=3000, top_p=0.95, p_less=True, temperature=1.0),
    ]
    for rules in rule_sets:
        check_mask_logits_and_draws(backend, x, rules)
    if dtype == torch.float32:
        check_top_k_bin_with_a_scaled_neighbour(backend)
    if backend.name == "emulated-cuda" and dtype == torch.float32:
        rules = dict(top_k=1500, epsilon=3e-4)
        passes = [emulated_passes(logitkit.truncation_mask, x[r : r + 1], **rules) for r in range(len(x))]
        # rows 1 (the cluster: the second digit's bin gathered) and 3 (the tie group) aside, the
        # first digit's bin is gathered
        assert passes[1] <= 4 and passes[3] <= 5, passes
        assert all(p <= 3 for r, p in enumerate(passes) if r not in (1, 3)), passes


def check_top_k_bin_with_a_scaled_neighbour(backend) -> None:
    """A row whose k-th largest logit, 3.5, is the lowest key of its first- and second-digit bins,
    and the key just below it scales to 3.5's z at T = 0.7, so that token survives top-k too: a
    selection that stopped at 3.5's bin would leave it out of pass 1's sums (CUDA's selection
    refines such a bin instead). An epsilon between a token's renormalised probability with and
    without that token's weight shows whether it was summed."""
    g = torch.Generator().manual_seed(8)
    inv_t = torch.tensor(1 / 0.7, dtype=torch.float32)
    below = torch.nextafter(torch.tensor(3.5), torch.tensor(-math.inf))
    assert below * inv_t == torch.tensor(3.5) * inv_t
    y = rows(1, 3000, scale=1.0, seed=15) - 3.0
    y[0, :995] = 3.6 + 0.3 * torch.rand(995, generator=g)  # 995 tokens above 3.5's bins, in its first digit's
    y[0, 995:1000] = ulp_ladder(3.5, 5)
    y[0, 1000] = below
    z = y * inv_t
    survivors = references.truncation_mask(z, top_k=1000)[0]
    assert survivors[1000] and int(survivors.sum()) == 1001
    p = torch.softmax(z[0].double().masked_fill(~survivors, -math.inf), -1)
    weight_below = float(p[1000])
    for i in (100, 500, 900):
        epsilon = float(p[survivors].sort().values[i]) * (1 + weight_below / 2)
        rules = dict(top_k=1000, epsilon=epsilon)
        got = logitkit.truncation_mask(backend.tensor(y), temperature=0.7, **rules).cpu()
        expected = references.truncation_mask(z, **rules)
        assert torch.equal(got, expected) and not torch.equal(expected, survivors[None]), i


def check_mask_logits_and_draws(backend, x: torch.Tensor, rules: dict) -> None:
    """The mask and filter_logits equal the float64 reference's kept set, and the sampler's
    draws agree with it (check_sampled_statistics)."""
    keep = references.truncation_mask(x, **rules)
    assert torch.equal(logitkit.truncation_mask(backend.tensor(x), **rules).cpu(), keep), rules
    got = logitkit.filter_logits(backend.tensor(x), filter_value=-7.0, **rules).cpu()
    assert torch.equal(got, torch.where(keep, x, torch.tensor(-7.0, dtype=x.dtype))), rules
    check_sampled_statistics(backend, x, rules)


def check_sampled_statistics(backend, x: torch.Tensor, rules: dict) -> None:
    """The sampler's token lies in the reference's kept set; its kept count and log-prob under the
    processed distribution match the float64 reference."""
    out = logitkit.sample(backend.tensor(x), seed=5, return_logprobs=True, return_kept=True, **rules)
    keep = references.truncation_mask(x, **rules)
    q = torch.softmax((x.double() / rules["temperature"]).masked_fill(~keep, -math.inf), -1)
    tok = out.tokens.cpu()
    assert keep.gather(-1, tok[:, None]).all()
    assert torch.equal(out.kept.cpu(), keep.sum(-1))
    torch.testing.assert_close(
        out.logprobs.cpu().double(), q.gather(-1, tok[:, None]).squeeze(-1).log(), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("min_tokens_to_keep", [1, 5])
@pytest.mark.parametrize("warper", ["MinP", "Epsilon", "Eta", "TopK", "Typical"])
def test_equals_transformers_warpers(backend, warper, min_tokens_to_keep):
    tlp = pytest.importorskip("transformers.generation.logits_process")
    x = rows(8, 1000, scale=2.0)
    x[0] *= 20  # a peaked row: most rules keep fewer than min_tokens_to_keep there
    x[1, :10] = x[1, 10]  # a tie across the k-th largest logit: top-k keeps the whole group
    args = {"MinP": ("min_p", 0.1), "Epsilon": ("epsilon", 3e-3), "Eta": ("eta", 3e-3), "TopK": ("top_k", 4)}
    args["Typical"] = ("typical_p", 0.7)
    arg = args[warper]
    theirs = getattr(tlp, f"{warper}LogitsWarper")(arg[1], min_tokens_to_keep=min_tokens_to_keep)
    expected = theirs(None, tlp.TemperatureLogitsWarper(0.8)(None, x.clone())) != -math.inf
    got = logitkit.truncation_mask(
        backend.tensor(x), temperature=0.8, min_tokens_to_keep=min_tokens_to_keep, **{arg[0]: arg[1]}
    ).cpu()
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "chain",
    [
        [("TopK", 30), ("MinP", 0.05)],
        [("TopK", 50), ("Epsilon", 1e-2)],
        [("TopK", 50), ("Eta", 1e-2)],
        [("MinP", 0.02), ("Eta", 3e-3)],
        [("TopK", 40), ("TopP", 0.8), ("MinP", 0.05)],
        [("TopP", 0.9), ("MinP", 0.1)],
        [("TopP", 0.95), ("Epsilon", 2e-3)],
        [("TopP", 0.9), ("Eta", 3e-3)],
        [("TopK", 100), ("TopP", 0.97), ("Eta", 1e-2)],
        [("Typical", 0.5)],
        [("TopK", 40), ("Typical", 0.9)],
        [("TopP", 0.9), ("Typical", 0.5)],
        [("MinP", 0.05), ("Typical", 0.8)],
        [("TopK", 80), ("TopP", 0.95), ("MinP", 0.02), ("Typical", 0.7)],
        [("MinP", 0.3), ("Epsilon", 0.06)],
        [("Epsilon", 1e-3), ("Eta", 4e-3)],
        [("TopP", 0.9), ("Epsilon", 1e-3), ("Eta", 4e-3)],
        [("Typical", 0.8), ("Epsilon", 2e-3)],
        [("Typical", 0.9), ("Eta", 3e-3)],
        [("TopK", 100), ("TopP", 0.95), ("MinP", 0.01), ("Typical", 0.9), ("Epsilon", 1e-3), ("Eta", 3e-3)],
    ],
)
@pytest.mark.parametrize("min_tokens_to_keep", [1, 5])
def test_equals_transformers_chain(backend, chain, min_tokens_to_keep):
    """transformers' chain in its documented order (temperature, top-k, top-p, min-p, typical,
    epsilon, eta): top-k first, the rules after it on the renormalised survivors, min-p invariant
    to that (epsilon and eta after top-p see its renormalised survivors; typical sees the
    survivors of all the rules before it renormalised; epsilon and eta after min-p, typical or
    each other, or after top-p with a floor above one token, take a kernel call of their own
    on the survivors of the calls before). On peaked rows too, where min_tokens_to_keep keeps
    more than the rules would."""
    tlp = pytest.importorskip("transformers.generation.logits_process")
    x = rows(8, 1000, scale=2.0)
    x[0] *= 20  # peaked rows: the floor of min_tokens_to_keep decides there
    x[1] *= 6
    scores = tlp.TemperatureLogitsWarper(0.8)(None, x.clone())
    names = {"TopK": "top_k", "TopP": "top_p", "MinP": "min_p", "Epsilon": "epsilon", "Eta": "eta"}
    names["Typical"] = "typical_p"
    for warper, value in chain:
        scores = getattr(tlp, f"{warper}LogitsWarper")(value, min_tokens_to_keep=min_tokens_to_keep)(None, scores)
    kwargs = {names[w]: v for w, v in chain}
    keep = dict(temperature=0.8, min_tokens_to_keep=min_tokens_to_keep)
    got = logitkit.truncation_mask(backend.tensor(x), **keep, **kwargs).cpu()
    assert torch.equal(got, scores != -math.inf)
    assert torch.equal(got, references.truncation_mask(x, **keep, **kwargs))
    filtered = logitkit.filter_logits(backend.tensor(x), filter_value=-5.0, **keep, **kwargs).cpu()
    assert torch.equal(filtered, torch.where(got, x, -5.0))
    out = logitkit.sample(backend.tensor(x), seed=3, return_logprobs=True, return_kept=True, **keep, **kwargs)
    assert got.gather(-1, out.tokens.cpu()[:, None]).all()
    assert torch.equal(out.kept.cpu(), got.sum(-1))
    log_q = torch.log_softmax((x.double() / 0.8).masked_fill(~got, -math.inf), -1).gather(-1, out.tokens.cpu()[:, None])
    torch.testing.assert_close(out.logprobs.cpu().double(), log_q.squeeze(-1), atol=1e-4, rtol=1e-4)
    raw = torch.log_softmax(x.double(), -1).gather(-1, out.tokens.cpu()[:, None]).squeeze(-1)
    torch.testing.assert_close(out.raw_logprobs.cpu().double(), raw, atol=1e-4, rtol=1e-4)


def test_typical_keeps_the_tokens_nearest_the_entropy(backend):
    """typical is not a prefix of the probability ranking: on a row with one token of p ~ 0.3
    and a flat tail its kept set drops the most probable token (as transformers' warper does);
    min_tokens_to_keep keeps the most *typical* tokens, not the largest logits; the kept set is
    never empty."""
    tlp = pytest.importorskip("transformers.generation.logits_process")
    x = rows(3, 1000, scale=0.5)
    x[0, 17] = 6.5  # p ~ 0.37, -log p ~ 1 nat, H ~ 5 nats: dropped by typical_p = 0.5
    x[2] *= 40  # peaked: the most typical tokens are the most probable ones
    for typical_p, keep in ((0.5, 1), (1e-6, 3), (0.95, 1)):
        got = logitkit.truncation_mask(backend.tensor(x), typical_p=typical_p, min_tokens_to_keep=keep).cpu()
        theirs = tlp.TypicalLogitsWarper(typical_p, min_tokens_to_keep=keep)(None, x.clone()) != -math.inf
        assert torch.equal(got, theirs), typical_p
        assert torch.equal(got, references.truncation_mask(x, typical_p=typical_p, min_tokens_to_keep=keep))
        assert (got.sum(-1) >= keep).all()
        if typical_p < 0.9:  # the most probable token is not among the most typical ones
            assert not got[0, 17]
        if keep == 3:
            assert got[0].sum() == 3


@pytest.mark.parametrize("top_h_rule", ["hf", "official", "exact"])
@pytest.mark.parametrize(
    "rules",
    [
        dict(top_k=40),
        dict(top_p=0.9, min_p=0.05),
        dict(top_k=80, top_p=0.95, min_p=0.02, typical_p=0.7),
        dict(eta=3e-3, top_n_sigma=1.5),
    ],
)
def test_top_h_then_chain(backend, top_h_rule, rules):
    """Top-H with the chain's rules: Top-H first (transformers' order: temperature, TopH, TopK,
    TopP, MinP, Typical, ...), the chain on its survivors; equal to the float64 reference of that
    composition and, for rule "hf" (transformers' TopHLogitsWarper), to transformers' chain.
    Special rows as the chain's; the sampler's outputs describe the composed distribution."""
    x = rows(6, 1000, scale=2.0)
    x[4, 3] = math.nan
    x[5] = -math.inf
    args = dict(temperature=0.8, top_h=0.5, rule=top_h_rule, **rules)
    got = logitkit.truncation_mask(backend.tensor(x), **args).cpu()
    expected = references.truncation_mask(x, temperature=0.8, top_h=0.5, top_h_rule=top_h_rule, **rules)
    assert torch.equal(got, expected)
    assert not got[4].any() and got[5].tolist() == [True] + [False] * 999
    filtered = logitkit.filter_logits(backend.tensor(x), filter_value=-7.0, **args).cpu()
    assert torch.equal(filtered, torch.where(got, x, -7.0))
    tlp = pytest.importorskip("transformers.generation.logits_process")
    if top_h_rule == "hf" and "top_n_sigma" not in rules:
        scores = tlp.TopHLogitsWarper(0.5)(None, tlp.TemperatureLogitsWarper(0.8)(None, x[:4].clone()))
        warpers = {"top_k": "TopK", "top_p": "TopP", "min_p": "MinP", "typical_p": "Typical", "eta": "Eta"}
        for name, value in rules.items():
            scores = getattr(tlp, f"{warpers[name]}LogitsWarper")(value)(None, scores)
        assert torch.equal(got[:4], scores != -math.inf)
    out = logitkit.sample(
        backend.tensor(x), seed=5, return_logprobs=True, return_entropy=True, return_kept=True, **args
    )
    tok = out.tokens.cpu()
    assert tok[4].item() == -1 and tok[5].item() == 0
    assert got[:4].gather(-1, tok[:4, None]).all()
    assert torch.equal(out.kept.cpu(), got.sum(-1))
    q = torch.softmax((x[:4].double() / 0.8).masked_fill(~got[:4], -math.inf), -1)
    log_q = q.gather(-1, tok[:4, None]).squeeze(-1).log()
    torch.testing.assert_close(out.logprobs[:4].cpu().double(), log_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        out.entropy[:4].cpu().double(), references.entropy_terms(q).sum(-1), atol=1e-4, rtol=1e-4
    )
    raw = torch.log_softmax(x[:4].double(), -1).gather(-1, tok[:4, None]).squeeze(-1)
    torch.testing.assert_close(out.raw_logprobs[:4].cpu().double(), raw, atol=1e-4, rtol=1e-4)
    assert out.raw_logprobs[4:].isnan().all()


def test_per_row_parameters_equal_row_by_row(backend):
    x = rows(5, 300)
    params = dict(
        top_k=torch.tensor([0, 5, 3, 400, 40]),
        edt_theta=torch.tensor([0.0, 0.0, 0.5, 1.0, 0.0]),
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 1.3]),
        min_p=torch.tensor([0.0, 0.2, 0.1, 0.05, 0.0]),
        top_n_sigma=torch.tensor([math.inf, 1.0, 2.0, math.inf, 0.5]),
        p_less=torch.tensor([False, True, False, False, True]),
        epsilon=torch.tensor([0.0, 0.0, 1e-3, 1e-3, 0.0]),
        eta=torch.tensor([1e-3, 0.0, 0.0, 0.0, 2e-3]),
        min_tokens_to_keep=torch.tensor([1, 4, 1, 7, 30]),
        typical_p=torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0]),
    )
    on_backend = {k: backend.tensor(v) for k, v in params.items()}
    batched = logitkit.truncation_mask(backend.tensor(x), **on_backend).cpu()
    for r in range(x.shape[0]):
        one = {k: v[r].item() for k, v in params.items()}
        one["top_k"] = int(one["top_k"])
        assert torch.equal(batched[r], logitkit.truncation_mask(backend.tensor(x[r]), **one).cpu()), r
        assert torch.equal(batched[r], references.truncation_mask(x[r], **one))
    tokens = logitkit.sample(backend.tensor(x), seed=backend.tensor(torch.arange(5)), **on_backend).cpu()
    for r in range(x.shape[0]):
        one = {k: v[r].item() for k, v in params.items()}
        one["top_k"] = int(one["top_k"])
        assert logitkit.sample(backend.tensor(x[r : r + 1]), seed=r, **one).item() == tokens[r].item()
        assert batched[r, tokens[r]]


@pytest.mark.parametrize(
    "rule",
    [
        dict(min_p=0.1),
        dict(top_p=0.5),
        dict(typical_p=0.5),
        dict(top_k=5),
        dict(min_p=0.1, min_tokens_to_keep=3),
        dict(min_p=0.1, epsilon=1e-3, eta=1e-3),  # three kernel calls (transformers' order)
        dict(typical_p=0.5, epsilon=1e-3),
    ],
)
def test_special_rows(backend, rule):
    x = rows(4, 50)
    x[0, 7] = math.nan
    x[1, 3] = math.inf
    x[2] = -math.inf
    x[3, :40] = -math.inf
    mask = logitkit.truncation_mask(backend.tensor(x), **rule).cpu()
    assert not mask[0].any() and not mask[1].any()
    assert mask[2].tolist() == [True] + [False] * 49
    assert not mask[3, :40].any() and mask[3, 40:].any()
    assert torch.equal(mask[3], references.truncation_mask(x[3], **rule))
    filtered = logitkit.filter_logits(backend.tensor(x), filter_value=-7.0, **rule).cpu()
    assert torch.equal(filtered, torch.where(mask, x, -7.0))
    out = logitkit.sample(
        backend.tensor(x), seed=3, return_logprobs=True, return_entropy=True, return_kept=True, **rule
    )
    assert out.tokens.cpu().tolist()[:3] == [-1, -1, 0]
    assert out.tokens[3].item() >= 40
    assert out.logprobs[:2].isnan().all() and out.logprobs[2].item() == 0.0
    assert out.raw_logprobs[:3].isnan().all() and out.entropy[:2].isnan().all() and out.entropy[2].item() == 0.0
    assert out.kept.cpu().tolist()[:3] == [0, 0, 1]


@pytest.mark.parametrize(
    "rule",
    [dict(min_p=0.05), dict(top_p=0.8), dict(top_k=50, top_p=0.9, eta=1e-3), dict(typical_p=0.7, min_p=0.01)],
)
def test_statistics(backend, rule):
    x = rows(6, 1000)
    out = logitkit.sample(
        backend.tensor(x),
        temperature=0.8,
        seed=11,
        return_logprobs=True,
        return_entropy=True,
        return_kept=True,
        **rule,
    )
    keep = references.truncation_mask(x, temperature=0.8, **rule)
    q = torch.softmax((x.double() / 0.8).masked_fill(~keep, -math.inf), -1)
    tok = out.tokens.cpu()
    assert keep.gather(-1, tok[:, None]).all()
    torch.testing.assert_close(
        out.logprobs.cpu().double(), q.gather(-1, tok[:, None]).squeeze(-1).log(), atol=1e-4, rtol=1e-4
    )
    raw = torch.log_softmax(x.double(), -1).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(out.raw_logprobs.cpu().double(), raw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.entropy.cpu().double(), references.entropy_terms(q).sum(-1), atol=1e-4, rtol=1e-4)
    assert torch.equal(out.kept.cpu(), keep.sum(-1))


def top_h_tie_rows() -> torch.Tensor:
    """Rows of 1100 logits whose Top-H ("hf", K = 100) cut falls inside a tie group (of signed
    zeros, too), the group within the K largest, reaching past them, or larger than the CUDA
    kernels' gather capacity (GATHER_CAPACITY): the kept tokens of the group are its lowest
    indices (docs/top_h.md)."""
    x = rows(6, 1100, scale=1.0, seed=11) - 6.0
    x[0, 200:260:2] = 0.0  # 60 zeros on top, split by the cut: +0.0 and -0.0 are one value,
    x[0, 201:261:2] = -0.0  # ranked by index (CUDA ranked +0.0 first until December 5th)
    x[1] = 0.25  # one value everywhere
    x[2, 50:1080] = 1.0  # 1030 equal on top: past the capacity
    x[3, 5:8] = torch.tensor([4.0, 3.0, 2.5])
    x[3, 300:420] = 1.0  # a group across the K-th largest
    x[4] = torch.randint(-3, 3, (1100,), generator=torch.Generator().manual_seed(5)).float()
    x[5] = ulp_ladder(2.0, 1100)[torch.randperm(1100, generator=torch.Generator().manual_seed(6))]
    return x


@pytest.mark.parametrize(
    "rules",
    [
        dict(),
        dict(top_k=20),
        dict(top_p=0.8, min_p=0.05),
        dict(top_k=60, typical_p=0.6, min_tokens_to_keep=3),
        dict(top_k=7, top_p=0.9, eta=1e-3, temperature=0.7),
        dict(epsilon=1e-3, top_n_sigma=1.0, p_less=True),
    ],
)
def test_fused_top_h_equals_its_own_stage(backend, rules, monkeypatch):
    """Top-H "hf" with K = min(cap, V) <= 256 runs inside the chain's kernels (its first rule:
    docs/sampling.md); the mask, the filtered logits and the sampler's token and outputs equal
    those of Top-H as a stage of its own (top_h_mask and a masked copy), on rows whose Top-H cut
    splits tie groups of every size, per-row alpha (0: off) and greedy rows included; the kept
    set equals the float64 reference."""
    x = top_h_tie_rows()
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        # (alpha * K is never close to an integer: rows of equal logits are not on the budget's edge)
        args = {"temperature": torch.tensor([1.0, 0.8, 1.3, 0.0, 1.0, 0.6]), **rules}
        args["top_h"] = torch.tensor([0.373, 0.517, 0.213, 0.373, 0.0, 0.811])
        args = {k: backend.tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        results = []
        for fused in (True, False):
            with monkeypatch.context() as m:
                if not fused:
                    m.setattr(logitkit.filters, "FUSED_TOP_H_MAX_COUNT", 0)
                mask = logitkit.truncation_mask(backend.tensor(xd), **args).cpu()
                filtered = logitkit.filter_logits(backend.tensor(xd), filter_value=-7.0, **args).cpu()
                out = logitkit.sample(
                    backend.tensor(xd),
                    seed=backend.tensor(torch.arange(6)),
                    return_logprobs=True,
                    return_entropy=True,
                    return_kept=True,
                    **args,
                )
            results.append(dict(mask=mask, filtered=filtered, out=out))
        fused, unfused = results
        fused_mask = fused["mask"]
        assert torch.equal(fused["filtered"], torch.where(fused_mask, xd, -7.0))
        assert torch.equal(fused_mask, unfused["mask"]) and torch.equal(fused["filtered"], unfused["filtered"])
        assert torch.equal(fused["out"].tokens, unfused["out"].tokens)
        assert torch.equal(fused["out"].kept, unfused["out"].kept)
        for name in ("logprobs", "entropy"):
            torch.testing.assert_close(getattr(fused["out"], name), getattr(unfused["out"], name), equal_nan=True)
        # (the stage's raw log-prob came from a log_softmax in the input dtype; the kernels' is float32)
        tokens = fused["out"].tokens.cpu().clamp(min=0)[:, None]
        raw = torch.log_softmax(xd.double(), -1).gather(-1, tokens).squeeze(-1)
        torch.testing.assert_close(fused["out"].raw_logprobs.cpu().double(), raw, atol=1e-4, rtol=1e-4)
        ref_args = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        for r in range(x.shape[0] - 1):  # (not the ulp ladder: its float64 z differ from the kernels' float32)
            one = {k: v[r].item() if isinstance(v, torch.Tensor) else v for k, v in ref_args.items()}
            top_h = one.pop("top_h") or None  # (0: off)
            expected = references.truncation_mask(xd[r].float(), top_h=top_h, **one)
            assert torch.equal(fused_mask[r], expected), (dtype, r)


def test_top_h_constants_agree_with_the_kernels():
    """The Python layer's Top-H constants are the kernels' own (read from the extension), the
    float64 reference's default cap is the same, and the documented values hold."""
    assert logitkit.filters.TOP_H_DEFAULT_CAP == _loader._C.top_h_default_cap == references.TOP_H_DEFAULT_CAP == 100
    assert logitkit.filters.FUSED_TOP_H_MAX_COUNT == _loader._C.fused_top_h_max_count == 256
    x = torch.randn(2, 300)
    assert logitkit.filters.fused_top_h_count(x, "hf", None) == 100
    assert logitkit.filters.fused_top_h_count(x, "hf", 256) == 256
    assert logitkit.filters.fused_top_h_count(x, "hf", 257) == 0
    assert logitkit.filters.fused_top_h_count(x, "official", None) == 0
    assert logitkit.filters.fused_top_h_count(x[:, :100], "hf", None) == 0  # K = V: nothing to cut


def test_gather_sizes_match_the_kernels():
    """The gather sizes that the tests' rows and pass budgets are built around are the CUDA
    kernels' own (read from the emulated-CUDA module, which compiles them)."""
    if _loader._C_emulated is None:
        pytest.skip("emulated-CUDA module not built")
    kernels = _loader._C_emulated
    sizes = (kernels.gathered_top_k, kernels.gather_capacity, kernels.crossing_capacity)
    assert sizes == (GATHERED_TOP_K, GATHER_CAPACITY, CROSSING_CAPACITY)
    assert kernels.top_k_crossing_capacity == TOP_K_CROSSING_CAPACITY
    assert GATHERED_TOP_K >= logitkit.filters.FUSED_TOP_H_MAX_COUNT  # Top-H's K candidates are gathered


def test_typical_after_rules_that_keep_every_finite_token(backend):
    """typical over top-k survivors that include -inf logits (top-k's and the floor's k-th
    largest logit is -inf: fewer finite tokens than k), after top-p: the kept set equals the
    reference (the CUDA kernels summed (z - m) e = NaN for the -inf survivors, and kept nothing)."""
    x = rows(4, 150, seed=9)
    x[:, 2:] = -math.inf
    rules = dict(temperature=0.7, top_k=80, top_p=0.9, typical_p=0.7, min_tokens_to_keep=3)
    got = logitkit.truncation_mask(backend.tensor(x), **rules).cpu()
    assert torch.equal(got, references.truncation_mask(x, **rules))
    assert got[:, :2].all() and not got[:, 2:].any()


@pytest.mark.parametrize("top_h_rule", ["hf", "official", "exact"])
def test_per_row_top_h_in_the_chain(backend, top_h_rule):
    """Top-H's alpha and the temperature per row (alpha 0: Top-H off for that row; temperature
    0: greedy) in the chain: equal to row-by-row calls with numbers, in truncation_mask,
    filter_logits and sample (counter-based: the same token row by row). EDT is a temperature:
    Top-H and the chain both take the per-row T it gives."""
    x = rows(5, 1000, scale=2.0)
    x[4, 3] = math.nan
    top_h = torch.tensor([0.5, 0.0, 0.9, 0.3, 0.6])
    temperature = torch.tensor([0.8, 1.2, 0.0, 1.5, 1.0])
    seed = torch.tensor([3, 1, 4, 1, 5])
    chain = dict(min_p=0.02, top_k=torch.tensor([0, 50, 0, 20, 5]))
    xb = backend.tensor(x)
    per_row = dict(top_h=backend.tensor(top_h), temperature=backend.tensor(temperature), rule=top_h_rule)
    got = logitkit.truncation_mask(xb, **per_row, **chain).cpu()
    filtered = logitkit.filter_logits(xb, filter_value=-7.0, **per_row, **chain).cpu()
    out = logitkit.sample(xb, seed=backend.tensor(seed), return_logprobs=True, return_kept=True, **per_row, **chain)
    for i in range(5):
        a, t = top_h[i].item(), temperature[i].item()
        one = dict(
            top_h=None if a == 0.0 else a, temperature=t, rule=top_h_rule, min_p=0.02, top_k=int(chain["top_k"][i])
        )
        row = logitkit.truncation_mask(xb[i : i + 1], **one).cpu()[0]
        assert torch.equal(got[i], row), i
        token = logitkit.sample(xb[i : i + 1], seed=int(seed[i]), **one).cpu()[0]
        assert out.tokens[i].item() == token.item(), i
    assert got[2].sum() == 1 and got[2, x[2].argmax()]  # greedy
    assert not got[4].any() and out.tokens[4].item() == -1
    assert torch.equal(filtered, torch.where(got, x, -7.0))
    assert torch.equal(out.kept.cpu(), got.sum(-1))
    assert got[:4].gather(-1, out.tokens[:4, None].cpu()).all()
    # Top-H alone with per-row alpha: the chain's sampler on Top-H's survivors
    alone = logitkit.sample(xb, top_h=backend.tensor(top_h), rule=top_h_rule, seed=7, return_logprobs=True)
    keep = logitkit.top_h_mask(xb, backend.tensor(top_h), rule=top_h_rule).cpu()
    tok = alone.tokens.cpu()
    assert keep[:4].gather(-1, tok[:4, None]).all() and tok[4].item() == -1
    q = torch.softmax(x[:4].double().masked_fill(~keep[:4], -math.inf), -1)
    log_q = q.gather(-1, tok[:4, None]).squeeze(-1).log()
    torch.testing.assert_close(alone.logprobs[:4].cpu().double(), log_q, atol=1e-4, rtol=1e-4)
    # EDT then Top-H then min-p: the same as the per-row temperature EDT gives
    edt = logitkit.truncation_mask(xb, top_h=0.5, rule=top_h_rule, edt_theta=1.5, min_p=0.05).cpu()
    t_edt = logitkit.filters._edt_temperature(xb, 1.0, 1.5, None, "test")
    explicit = logitkit.truncation_mask(xb, top_h=0.5, rule=top_h_rule, temperature=t_edt, min_p=0.05).cpu()
    assert torch.equal(edt, explicit)


@pytest.mark.parametrize("top_h_rule", ["hf", "exact"])
def test_top_h_alone_with_per_row_temperature(backend, top_h_rule):
    """Top-H alone with a per-row temperature stays on the fused sampler (op sample_per_row) plus
    a greedy draw for its greedy rows, which skip Top-H: every largest logit is kept and the ties
    are drawn uniformly, as truncation_mask says, as the route with outputs (mask op + the
    chain's sampler) draws, and as row-by-row calls with numbers draw."""
    x = rows(6, 1000, scale=2.0)
    x[1, [10, 500, 900]] = x[1].max() + 1.0  # three tied maxima on a greedy row
    x[3, 7] = math.nan
    top_h = torch.tensor([0.5, 0.5, 0.0, 0.9, 0.3, 0.6])
    temperature = torch.tensor([0.8, 0.0, 0.0, 1.5, 1.0, 0.0])
    xb = backend.tensor(x)
    per_row = dict(top_h=backend.tensor(top_h), temperature=backend.tensor(temperature), rule=top_h_rule)
    mask = logitkit.truncation_mask(xb, **per_row).cpu()
    assert mask[1].nonzero().squeeze(1).tolist() == [10, 500, 900]
    assert not mask[3].any()
    defined = [0, 1, 2, 4, 5]
    drawn_ties = set()
    for draw in (0, 2, 4):  # these seeds draw each of the three ties (the seed fixes the token on every backend)
        seeds = torch.arange(6) + 100 * draw
        tokens = logitkit.sample(xb, seed=backend.tensor(seeds), **per_row).cpu()
        with_outputs = logitkit.sample(xb, seed=backend.tensor(seeds), return_kept=True, **per_row)
        assert torch.equal(tokens, with_outputs.tokens.cpu())
        assert tokens[3].item() == -1
        assert mask[defined].gather(-1, tokens[defined, None]).all()
        drawn_ties.add(tokens[1].item())
        for i in (0, 1, 5):
            one = dict(top_h=top_h[i].item(), temperature=temperature[i].item(), rule=top_h_rule)
            assert logitkit.sample(xb[i : i + 1], seed=int(seeds[i]), **one).item() == tokens[i].item()
    assert drawn_ties == {10, 500, 900}
    # no greedy row (the CPU then skips the greedy draw)
    per_row["temperature"] = backend.tensor(temperature + 0.5)
    tokens = logitkit.sample(xb, seed=backend.tensor(seeds), **per_row).cpu()
    with_outputs = logitkit.sample(xb, seed=backend.tensor(seeds), return_kept=True, **per_row)
    assert torch.equal(tokens, with_outputs.tokens.cpu())


@pytest.mark.parametrize("top_h_rule", ["hf", "exact"])
def test_top_h_statistics_and_special_rows(backend, top_h_rule):
    x = rows(6, 1000)
    x[4] = -math.inf  # all -inf: token 0, log q = 0, H = 0, count 1, raw NaN
    x[5, 7] = math.nan  # no distribution: token -1, NaN, count 0
    out = logitkit.sample(
        backend.tensor(x),
        top_h=0.6,
        rule=top_h_rule,
        temperature=0.8,
        seed=5,
        return_logprobs=True,
        return_entropy=True,
        return_kept=True,
    )
    tokens_only = logitkit.sample(backend.tensor(x), top_h=0.6, rule=top_h_rule, temperature=0.8, seed=5)
    assert torch.equal(out.tokens, tokens_only)
    keep = references.top_h_mask(x[:4], 0.6, 0.8, top_h_rule)
    q = torch.softmax((x[:4].double() / 0.8).masked_fill(~keep, -math.inf), -1)
    tok = out.tokens.cpu()
    assert keep.gather(-1, tok[:4, None]).all()
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logprobs.cpu()[:4].double(), q.gather(-1, tok[:4, None]).squeeze(-1).log(), **tol)
    raw = torch.log_softmax(x[:4].double(), -1).gather(-1, tok[:4, None]).squeeze(-1)
    torch.testing.assert_close(out.raw_logprobs.cpu()[:4].double(), raw, **tol)
    torch.testing.assert_close(out.entropy.cpu()[:4].double(), references.entropy_terms(q).sum(-1), **tol)
    assert torch.equal(out.kept.cpu()[:4], keep.sum(-1))
    assert tok[4:].tolist() == [0, -1] and out.kept.cpu()[4:].tolist() == [1, 0]
    assert out.logprobs[4].item() == 0.0 and out.entropy[4].item() == 0.0 and math.isnan(out.raw_logprobs[4].item())
    assert all(math.isnan(v[5].item()) for v in (out.logprobs, out.raw_logprobs, out.entropy))


@pytest.mark.parametrize("rule", ["min_p", "p_less", "none", "top_p", "typical", "min_p_then_epsilon_eta"])
def test_draws_follow_the_processed_distribution(backend, rule):
    """Chi-square of the draws (one row per draw, seeds 0..draws-1). The emulator runs a block in
    ~0.1 s, so there the draws are fewer and must equal the CPU kernel's draws instead (the
    chi-square on the CPU then covers them)."""
    vocab, draws = 12, 4000
    if backend.name == "emulated-cuda":
        x = rows(1, vocab, scale=1.0).expand(48, vocab)
        got = logitkit.sample(backend.tensor(x), temperature=0.9, seed=torch.arange(48), **RULES[rule])
        with logitkit.testing.use_backend("cpu"):
            assert torch.equal(got, logitkit.sample(x, temperature=0.9, seed=torch.arange(48), **RULES[rule]))
        return
    x = rows(1, vocab, scale=1.0).expand(draws, vocab)
    keep = references.truncation_mask(x[:1], temperature=0.9, **RULES[rule])[0]
    q = torch.softmax((x[0].double() / 0.9).masked_fill(~keep, -math.inf), -1)
    tokens = logitkit.sample(
        backend.tensor(x), temperature=0.9, seed=backend.tensor(torch.arange(draws)), **RULES[rule]
    ).cpu()
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~keep].sum() == 0
    expected = q[keep] * draws
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * max(dof, 1)) + 10, (chi2, dof)


def philox_reference(seed: int, offset: int) -> float:
    """Philox4x32-10 written out in Python (Salmon et al. 2011), first output word."""
    m32 = 0xFFFFFFFF
    k0, k1 = seed & m32, (seed >> 32) & m32
    c = [offset & m32, (offset >> 32) & m32, 0, 0]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & m32, p1 & m32, ((p0 >> 32) ^ c[3] ^ k1) & m32, p0 & m32]
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return (c[0] >> 8) / 2**24


def test_philox_known_answer_and_reference(backend):
    # Random123's known answer for key (0, 0), counter (0, 0, 0, 0): first word 0x6627e8d5.
    assert philox_reference(0, 0) == (0x6627E8D5 >> 8) / 2**24
    seeds = torch.tensor([0, 1, -1, 2**40 + 3, 123456789])
    offsets = torch.tensor([0, 5, 7, -2, 2**33])
    got = logitkit.philox_uniform(backend.tensor(seeds), backend.tensor(offsets)).cpu()
    expected = [philox_reference(s % 2**64, o % 2**64) for s, o in zip(seeds.tolist(), offsets.tolist())]
    assert got.tolist() == expected


def test_same_seed_same_token_on_every_backend():
    if _loader._C_emulated is None:
        pytest.skip("emulated backend not built")
    x = rows(64, 1000)
    seed, offset = torch.arange(64) * 7919, torch.full((64,), 3)
    params = logitkit.filters.filter_params(x, temperature=0.8, min_p=0.02, op="sample")
    tokens = {}
    for ns in ("logitkit", "logitkit_emulated"):
        ops = getattr(torch.ops, ns)
        u = ops.philox_uniform(seed, offset)
        tokens[ns] = ops.filter_sample(x, params, u, False)[0]
    assert torch.equal(tokens["logitkit"], tokens["logitkit_emulated"])
    # a row's token does not depend on the rest of the batch
    alone = torch.ops.logitkit.filter_sample(
        x[5:6], params[5:6], torch.ops.logitkit.philox_uniform(seed[5:6], offset[5:6]), False
    )[0]
    assert alone.item() == tokens["logitkit"][5].item()


@pytest.mark.parametrize("rule", ["min_p", "none", "top_p"])
@pytest.mark.parametrize("vocab", [1, 31, 1000, 5003])
def test_draw_is_the_inverse_cdf_at_u(backend, rule, vocab):
    """filter_sample's token for given u is the kept token whose fp64 CDF interval (kept weights
    in vocabulary order) holds u, up to float32 rounding of the sums: the CUDA kernel sums each
    warp's contiguous share and re-reads only the share holding u * mass (partial warps in the
    emulated launch), with or without top-p."""
    x = rows(1, vocab, seed=vocab)
    u = torch.tensor([0.0, 1e-6, 0.1, 0.37, 0.5, 0.77, 0.999, 1.0 - 2.0**-24])
    xs = x.expand(len(u), vocab).contiguous()
    params = logitkit.filters.filter_params(xs, temperature=0.8, op="sample", **RULES[rule])
    tokens = backend.ops.filter_sample(backend.tensor(xs), backend.tensor(params), backend.tensor(u), False)[0].cpu()
    kept = references.truncation_mask(x[0], temperature=0.8, **RULES[rule])
    z = x[0].double() / 0.8
    w = torch.where(kept, torch.exp(z - z.max()), 0.0)
    cdf = torch.cumsum(w, 0) / w.sum()
    for uu, token in zip(u.tolist(), tokens.tolist()):
        assert 0 <= token < vocab and kept[token], (uu, token)
        low = cdf[token - 1].item() if token > 0 else 0.0
        assert low - 1e-5 <= uu <= cdf[token].item() + 1e-5, (uu, token, low, cdf[token].item())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(min_p=1.5), ValueError, "min_p must be in"),
        (dict(epsilon=-1e-3), ValueError, "epsilon must be in"),
        (dict(eta=1.0), ValueError, "eta must be in"),
        (dict(top_n_sigma=-1.0), ValueError, "top_n_sigma must be"),
        (dict(temperature=-0.5), ValueError, "temperature must be"),
        (dict(min_p=torch.zeros(3)), ValueError, "min_p must be a number or a tensor of shape"),
        (dict(min_p=torch.tensor([0.1, 2.0])), ValueError, "min_p must be in"),
        (dict(min_p=0.1, min_tokens_to_keep=0), ValueError, "min_tokens_to_keep"),
        (dict(min_tokens_to_keep=torch.tensor([1, 0])), ValueError, "min_tokens_to_keep must be an int >= 1"),
        (dict(min_tokens_to_keep=torch.tensor([1.0, 2.0])), TypeError, "min_tokens_to_keep must be an int or an"),
        (dict(min_tokens_to_keep=torch.tensor([1, 2, 3])), ValueError, "min_tokens_to_keep must be a number or a"),
        (dict(seed=torch.zeros(2, dtype=torch.int32)), TypeError, "seed must be an int64"),
        (dict(seed=torch.zeros(3, dtype=torch.int64)), ValueError, "seed must be an int or an int64 tensor of shape"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either generator or seed"),
        (dict(offset=3), ValueError, "offset needs seed"),
        (dict(top_h=torch.tensor([0.5, 1.5]), min_p=0.1), ValueError, r"alpha must be in \[0, 1\] per row"),
        (dict(top_h=torch.ones(3)), ValueError, "alpha must be a number or a tensor of shape"),
        # greedy rows skip Top-H, but its arguments are still checked
        (dict(top_h=torch.ones(3), temperature=0.0), ValueError, "alpha must be a number or a tensor of shape"),
        (dict(top_h=torch.ones(3), temperature=torch.zeros(2)), ValueError, "alpha must be a number or a tensor"),
        (dict(top_h=1.5, temperature=0.0), ValueError, "alpha must be in"),
        (dict(top_h=0.5, temperature=torch.zeros(2), rule="nope"), ValueError, "rule must be"),
        (dict(top_h=0.5, temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature must be"),
        (dict(top_h=0.5, temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature must be"),
        (dict(top_h=0.5, edt_theta=1.0, min_tokens_to_keep=2), ValueError, "min_tokens_to_keep applies"),
        (dict(top_h=0.5, min_tokens_to_keep=3), ValueError, "min_tokens_to_keep applies to the rules after top_h"),
        (dict(top_h=1.5, min_p=0.1), ValueError, "alpha must be in"),
        (dict(top_h=0.5, min_p=0.1, rule="nope"), ValueError, "rule must be"),
        (dict(top_k=-1), ValueError, "top_k must be an int >= 0"),
        (dict(top_k=2.5), TypeError, "top_k must be an int or an integer tensor"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k must be an int or an integer tensor"),
        (dict(top_k=torch.tensor([1, -2])), ValueError, "top_k must be an int >= 0"),
        (dict(top_k=torch.tensor([1, 2, 3])), ValueError, "top_k must be a number or a tensor of shape"),
        (dict(edt_theta=-1.0), ValueError, "edt_theta must be a finite number >= 0"),
        (dict(edt_theta=1.0, edt_base=1.0), ValueError, "edt_base must be in"),
        (dict(edt_base=0.5), ValueError, "edt_base needs edt_theta"),
        (dict(top_p=0.0), ValueError, "top_p must be in"),
        (dict(top_p=1.5), ValueError, "top_p must be in"),
        (dict(top_p=math.nan), ValueError, "top_p must be in"),
        (dict(top_p=torch.tensor([0.5, 0.0])), ValueError, "top_p must be in"),
        (dict(top_p=torch.full((3,), 0.5)), ValueError, "top_p must be a number or a tensor of shape"),
        (dict(typical_p=0.0), ValueError, "typical_p must be in"),
        (dict(typical_p=1.5), ValueError, "typical_p must be in"),
        (dict(typical_p=math.nan), ValueError, "typical_p must be in"),
        (dict(typical_p=torch.tensor([0.5, -0.1])), ValueError, "typical_p must be in"),
    ],
)
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        logitkit.sample(torch.randn(2, 10), **kwargs)


def test_mask_and_sampler_agree_at_the_exp_cutoff(backend):
    """A token whose weight exp(z - m) is 0 in float32 is never kept. The CPU mask ops decide it
    from z - m without the exp (the vectorised exp's cutoff, found once), the sampler from the
    weight itself: both keep the same tokens around the cutoff (about -86.98 for at::vec's AVX-512
    exp, whose 2^n factor underflows there; the denormal range for CUDA's expf)."""
    shifts = torch.tensor([0.0, -80.0, -87.0, -87.3, -87.33, -87.336, -87.34, -87.35, -87.4, -88.0, -90.0, -92.0])
    x = torch.stack([shifts, shifts.flip(0), shifts * 0.5])
    xb = backend.tensor(x)
    mask = logitkit.truncation_mask(xb, min_p=1e-40).cpu()
    assert torch.equal(mask, logitkit.filter_logits(xb, min_p=1e-40).cpu() != -math.inf)
    out = logitkit.sample(xb, min_p=1e-40, seed=1, return_kept=True)
    assert torch.equal(mask.sum(-1), out.kept.cpu())
    assert mask[0, :2].all() and mask[2].all() and torch.equal(mask[0], mask[1].flip(0))
    assert (mask[0, 1:] <= mask[0, :-1]).all()  # a prefix of the decreasing shifts


@pytest.mark.parametrize("op", ["sample", "truncation_mask", "filter_logits"])
def test_top_h_alone_has_no_keep_floor(op):
    """min_tokens_to_keep applies to the rules after Top-H: every op refuses it without one; with
    one it is that rule's floor. transformers' TopHLogitsWarper has none, and generate() passes
    it to the other warpers only, so the fused warper ignores it there, as generate() does."""
    x = rows(2, 100)
    with pytest.raises(ValueError, match="min_tokens_to_keep applies to the rules after top_h"):
        getattr(logitkit, op)(x, top_h=0.5, min_tokens_to_keep=3)
    survivors = logitkit.top_h_mask(x, 0.5)
    kept = logitkit.truncation_mask(x, top_h=0.5, min_p=0.999, min_tokens_to_keep=3)
    assert torch.equal(kept.sum(-1), survivors.sum(-1).clamp(max=3)) and not (kept & ~survivors).any()
    pytest.importorskip("transformers")
    from logitkit.integrations.transformers import FusedSamplingLogitsWarper

    alone = FusedSamplingLogitsWarper(top_h=0.5, min_tokens_to_keep=3)(None, x.clone())
    assert torch.equal(alone != -math.inf, logitkit.top_h_mask(x, 0.5))


def test_seed_on_wrong_device():
    with pytest.raises(ValueError, match="seed is on meta but logits is on cpu"):
        logitkit.sample(torch.randn(2, 10), min_p=0.1, seed=torch.zeros(2, dtype=torch.int64, device="meta"))


def test_legacy_sample_with_seed(backend):
    x = rows(3, 100)
    a = logitkit.sample(backend.tensor(x), top_h=0.5, seed=4, offset=2).cpu()
    b = logitkit.sample(backend.tensor(x), top_h=0.5, seed=4, offset=2).cpu()
    assert torch.equal(a, b)
    assert logitkit.top_h_mask(x, 0.5).gather(-1, a[:, None]).all()


def test_opcheck_and_compile(backend):
    x = backend.tensor(rows(3, 40))
    params = logitkit.filters.filter_params(x, temperature=0.9, min_p=0.05, top_n_sigma=2.0)
    with_top_p = logitkit.filters.filter_params(x, temperature=0.9, top_p=backend.tensor(torch.tensor([0.5, 1.0, 0.9])))
    u = backend.tensor(torch.rand(3))
    ops = backend.ops
    for table in (params, with_top_p):
        torch.library.opcheck(ops.filter_mask, (x, table))
        torch.library.opcheck(ops.filter_logits, (x, table, -100.0))
        torch.library.opcheck(ops.filter_sample, (x, table, u, True))
    seeds = backend.tensor(torch.arange(3))
    torch.library.opcheck(ops.philox_uniform, (seeds, seeds))

    # per-row top_k / min_tokens_to_keep tensors: the kernels select the k-th largest logits
    # themselves, so there is no host read to break the graph
    ranks = dict(
        top_k=backend.tensor(torch.tensor([0, 5, 12])), min_tokens_to_keep=backend.tensor(torch.tensor([1, 3, 2]))
    )

    def chain(logits, seed, ranks):
        rules = dict(temperature=0.9, min_p=0.05, top_p=0.8, typical_p=0.95, **ranks)
        # epsilon and eta after typical: three kernel calls, each on the survivors of the last
        staged = dict(rules, epsilon=1e-3, eta=2e-3)
        return (
            logitkit.truncation_mask(logits, **rules),
            logitkit.sample(logits, seed=seed, **rules),
            logitkit.truncation_mask(logits, **staged),
            logitkit.filter_logits(logits, filter_value=-5.0, **staged),
            logitkit.sample(logits, seed=seed, return_kept=True, **staged).kept,
        )

    compiled = torch.compile(chain, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, seeds, ranks), chain(x, seeds, ranks)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("name", ["MinP", "Epsilon", "Eta", "TopP", "Typical"])
def test_processors_equal_transformers(backend, name):
    tlp = pytest.importorskip("transformers.generation.logits_process")
    from logitkit.integrations import transformers as lk_tf

    x = rows(4, 500, scale=2.0)
    value = {"MinP": 0.1, "Epsilon": 1e-3, "Eta": 1e-3, "TopP": 0.8, "Typical": 0.6}[name]
    kwargs = dict(filter_value=-100.0, min_tokens_to_keep=3)
    theirs = getattr(tlp, f"{name}LogitsWarper")(value, **kwargs)(None, x.clone())
    ours = getattr(lk_tf, f"{name}LogitsWarper")(value, **kwargs)(None, backend.tensor(x)).cpu()
    assert torch.equal(ours, theirs)


def test_fused_processor_equals_chain(backend):
    tlp = pytest.importorskip("transformers.generation.logits_process")
    from logitkit.integrations import transformers as lk_tf

    x = rows(4, 500, scale=2.0)
    theirs = tlp.MinPLogitsWarper(0.05)(None, tlp.TemperatureLogitsWarper(0.7)(None, x.clone()))
    ours = lk_tf.FusedSamplingLogitsWarper(0.7, min_p=0.05)(None, backend.tensor(x)).cpu()
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    torch.testing.assert_close(ours[ours.isfinite()], theirs[theirs.isfinite()])
    # a chain that needs more than one kernel call (epsilon and eta after typical: transformers' order)
    theirs = tlp.TemperatureLogitsWarper(0.7)(None, x.clone())
    for warper in (tlp.TopKLogitsWarper(200), tlp.TypicalLogitsWarper(0.9), tlp.EpsilonLogitsWarper(2e-3)):
        theirs = warper(None, theirs)
    theirs = tlp.EtaLogitsWarper(4e-3)(None, theirs)
    fused = lk_tf.FusedSamplingLogitsWarper(0.7, top_k=200, typical_p=0.9, epsilon=2e-3, eta=4e-3)
    ours = fused(None, backend.tensor(x)).cpu()
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    torch.testing.assert_close(ours[ours.isfinite()], theirs[theirs.isfinite()])


def test_edt_temperature_follows_the_entropy(backend):
    """EDT: T = T0 * N^(theta / H): flat rows (large H) keep a temperature near T0, peaked rows
    (small H) a lower one; the kept set and draws are those of that per-row temperature."""
    x = rows(4, 500, scale=1.0)
    x[1] *= 8.0  # peaked
    x[2] = 0.0  # uniform: H = log V
    x[3] = -math.inf
    x[3, 7] = 2.0  # one token: H = 0 -> greedy
    t = references.edt_temperature(x, 1.5, 0.7, 0.8)
    assert t[2].item() == pytest.approx(1.5 * 0.8 ** (0.7 / math.log(500)))
    assert t[3].item() == 0.0 and t[1] < t[0] < 1.5
    got = logitkit.sample(backend.tensor(x), temperature=1.5, edt_theta=0.7, seed=1, return_logprobs=True)
    plain = logitkit.sample(backend.tensor(x), temperature=t.float(), seed=1, return_logprobs=True)
    assert torch.equal(got.tokens.cpu(), plain.tokens.cpu())
    torch.testing.assert_close(got.logprobs.cpu(), plain.logprobs.cpu())
    assert got.tokens[3].item() == 7


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_mirostat_step_matches_definition(backend, temperature):
    x = rows(6, 1000, scale=2.0)
    x[5] *= 10  # peaked: p_max > 2^-mu for small mu
    mu = torch.tensor([1.0, 3.0, 6.0, 10.0, 0.0, 4.0])
    out = logitkit.mirostat_sample(
        backend.tensor(x),
        backend.tensor(mu),
        tau=3.0,
        eta=0.1,
        temperature=temperature,
        seed=5,
        return_logprobs=True,
        return_kept=True,
    )
    keep = references.mirostat_keep(x, mu, temperature)
    tok = out.tokens.cpu()
    assert torch.equal(out.kept.cpu(), keep.sum(-1))
    assert keep.gather(-1, tok[:, None]).all()
    q = torch.softmax((x.double() / temperature).masked_fill(~keep, -math.inf), -1)
    log_q = q.gather(-1, tok[:, None]).squeeze(-1).log()
    torch.testing.assert_close(out.logprobs.cpu().double(), log_q, atol=1e-4, rtol=1e-4)
    expected_mu = references.mirostat_update(mu.double(), log_q, 3.0, 0.1)
    torch.testing.assert_close(out.mu.cpu().double(), expected_mu, atol=1e-4, rtol=1e-4)
    tokens, new_mu = logitkit.mirostat_sample(
        backend.tensor(x), backend.tensor(mu), tau=3.0, seed=5, temperature=temperature
    )
    assert torch.equal(tokens.cpu(), tok) and new_mu.device == backend.tensor(mu).device
    for r in (0, 5):  # a row's step does not depend on the batch
        alone = logitkit.mirostat_sample(
            backend.tensor(x[r : r + 1]), backend.tensor(mu[r : r + 1]), tau=3.0, seed=5, temperature=temperature
        )
        assert alone[0].item() == tok[r].item()


def test_mirostat_controls_the_surprise():
    """The point of Mirostat: over many steps the average observed surprise approaches tau."""
    g = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 2001, dtype=torch.float64)
    x = (-1.1 * ranks.log()).float().expand(64, -1)  # Zipf-like rows
    mu = torch.full((64,), 2 * 5.0)
    surprises = []
    for step in range(150):
        out = logitkit.mirostat_sample(x, mu, tau=5.0, eta=0.1, generator=g, return_logprobs=True)
        mu = out.mu
        if step >= 50:
            surprises.append(-out.logprobs / math.log(2.0))
    assert abs(torch.stack(surprises).mean().item() - 5.0) < 0.25


def test_mirostat_special_rows_and_bad_input(backend):
    x = rows(3, 50)
    x[0, 3] = math.nan
    x[1] = -math.inf
    mu = torch.full((3,), 6.0)
    tokens, new_mu = logitkit.mirostat_sample(backend.tensor(x), backend.tensor(mu), tau=3.0, seed=0)
    assert tokens.cpu().tolist()[:2] == [-1, 0]
    assert new_mu[0].item() == 6.0  # no distribution: mu unchanged
    assert new_mu[1].item() == pytest.approx(6.0 + 0.1 * 3.0)  # one token: surprise 0
    logits = torch.randn(2, 10)
    cases = [
        (dict(mu=torch.zeros(3), tau=3.0), ValueError, "mu must have shape"),
        (dict(mu=torch.zeros(2, dtype=torch.int64), tau=3.0), TypeError, "mu must be a floating-point tensor"),
        (dict(mu=torch.zeros(2, device="meta"), tau=3.0), ValueError, "mu is on meta"),
        (dict(mu=torch.zeros(2), tau=0.0), ValueError, "tau must be a finite number > 0"),
        (dict(mu=torch.zeros(2), tau=3.0, eta=-0.1), ValueError, "eta must be a finite number >= 0"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            logitkit.mirostat_sample(logits, kwargs.pop("mu"), **kwargs)


def test_top_k_and_edt_processors(backend):
    tlp = pytest.importorskip("transformers.generation.logits_process")
    from logitkit.integrations import transformers as lk_tf

    x = rows(4, 500, scale=2.0)
    kwargs = dict(filter_value=-100.0, min_tokens_to_keep=3)
    theirs = tlp.TopKLogitsWarper(2, **kwargs)(None, x.clone())
    ours = lk_tf.TopKLogitsWarper(2, **kwargs)(None, backend.tensor(x)).cpu()
    assert torch.equal(ours, theirs)
    t = references.edt_temperature(x, 0.9, 0.5).float().unsqueeze(-1)
    edt = lk_tf.EDTLogitsWarper(0.5, temperature=0.9)(None, backend.tensor(x)).cpu()
    torch.testing.assert_close(edt, x / t)
    fused = lk_tf.FusedSamplingLogitsWarper(0.9, edt_theta=0.5, top_k=40, min_p=0.05)(None, backend.tensor(x))
    keep = references.truncation_mask(x, temperature=0.9, edt_theta=0.5, top_k=40, min_p=0.05)
    assert torch.equal(fused.cpu().isfinite(), keep)


def test_mirostat_processor_tracks_mu(backend):
    pytest.importorskip("transformers")
    from logitkit.integrations import transformers as lk_tf

    warper = lk_tf.MirostatLogitsWarper(tau=3.0, eta=0.2)
    x = rows(3, 200, scale=2.0)
    ids = torch.zeros(3, 4, dtype=torch.int64)
    out = warper(ids, backend.tensor(x)).cpu()
    mu = torch.full((3,), 6.0)
    assert torch.equal(out.isfinite(), references.mirostat_keep(x, mu))
    token = out.argmax(-1)  # what generate() might draw
    x2 = rows(3, 200, scale=2.0, seed=1)
    out2 = warper(torch.cat([ids, token[:, None]], 1), backend.tensor(x2)).cpu()
    log_q = torch.log_softmax(out.double(), -1).gather(-1, token[:, None]).squeeze(-1)
    mu = references.mirostat_update(mu.double(), log_q, 3.0, 0.2)
    torch.testing.assert_close(warper.mu.cpu().double(), mu, atol=1e-5, rtol=1e-5)
    assert torch.equal(out2.isfinite(), references.mirostat_keep(x2, mu))
    dropped = out2.isinf().float().argmax(-1)  # generate's padding of a finished row: mu unchanged
    before = warper.mu.clone()
    warper(torch.cat([ids, token[:, None], dropped[:, None]], 1), backend.tensor(x))
    assert torch.equal(warper.mu, before)
    warper(ids, backend.tensor(x))  # a new sequence (shorter input): mu restarts at 2 tau
    assert torch.equal(warper.mu.cpu(), torch.full((3,), 6.0))


# ---------------------------------------------------------------------------
# top-p (transformers' TopPLogitsWarper; docs/sampling.md)
# ---------------------------------------------------------------------------


def top_p_between_steps(x: torch.Tensor, temperature: float, targets: list[float]) -> torch.Tensor:
    """A top_p per row near each target, moved to the middle of the step of the row's sorted
    cumulative mass (float64) that crosses it: the kept set is then the same whatever the
    rounding of the sums (tie-free rows)."""
    out = []
    for row, target in zip(x.double(), targets):
        z = row / temperature if temperature > 0 else row
        cum = torch.softmax(z, -1).sort(descending=True).values.cumsum(-1)
        j = min(int((cum < target).sum()), row.numel() - 1)  # the crossing token
        before = cum[j - 1].item() if j > 0 else 0.0
        out.append(min((before + cum[j].item()) / 2, 1.0))
    return torch.tensor(out)


def non_contiguous(backend, x: torch.Tensor) -> torch.Tensor:
    """x on the backend as a view with a column stride of 2."""
    wide = torch.stack([x, torch.full_like(x, math.nan)], -1).flatten(-2)
    view = backend.tensor(wide)[..., ::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("vocab", [1, 31, 1000, 50257])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_top_p_equals_reference_and_transformers(backend, vocab, temperature):
    n = 2 if vocab > 1000 else 4
    x = rows(n, vocab, scale=3.0, seed=vocab)
    top_p = top_p_between_steps(x, temperature, [0.3, 0.9, 0.6, 0.99][:n])
    got = logitkit.truncation_mask(non_contiguous(backend, x), temperature=temperature, top_p=backend.tensor(top_p))
    expected = references.truncation_mask(x, temperature=temperature, top_p=top_p)
    assert torch.equal(got.cpu(), expected)
    tlp = pytest.importorskip("transformers.generation.logits_process")
    for r in range(n):
        scores = x[r : r + 1].double()
        if temperature > 0:
            scores = tlp.TemperatureLogitsWarper(temperature)(None, scores)
            theirs = tlp.TopPLogitsWarper(top_p[r].item())(None, scores) != -math.inf
            assert torch.equal(got[r].cpu(), theirs[0]), r
        one = logitkit.truncation_mask(backend.tensor(x[r]), temperature=temperature, top_p=top_p[r].item()).cpu()
        assert torch.equal(one, got[r].cpu()), r


def test_top_p_per_row_and_off(backend):
    """Mixed per-row top_p (1 = off for that row) equals row-by-row calls and the reference;
    sampling draws the same tokens batched and row by row, from the kept set."""
    x = rows(6, 400, seed=2)
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.2, 0.75])
    min_p = torch.tensor([0.0, 0.0, 0.01, 0.05, 0.0, 0.02])
    batched = logitkit.truncation_mask(backend.tensor(x), top_p=backend.tensor(top_p), min_p=backend.tensor(min_p))
    batched = batched.cpu()
    assert torch.equal(batched, references.truncation_mask(x, top_p=top_p, min_p=min_p))
    tokens = logitkit.sample(
        backend.tensor(x),
        top_p=backend.tensor(top_p),
        min_p=backend.tensor(min_p),
        seed=backend.tensor(torch.arange(6)),
    ).cpu()
    for r in range(x.shape[0]):
        one = dict(top_p=top_p[r].item(), min_p=min_p[r].item())
        assert torch.equal(batched[r], logitkit.truncation_mask(backend.tensor(x[r]), **one).cpu()), r
        assert logitkit.sample(backend.tensor(x[r : r + 1]), seed=r, **one).item() == tokens[r].item()
        assert batched[r, tokens[r]]
    off = logitkit.truncation_mask(backend.tensor(x[[0, 3]]), min_p=backend.tensor(min_p[[0, 3]])).cpu()
    assert torch.equal(batched[[0, 3]], off)


def test_top_p_processors(backend):
    tlp = pytest.importorskip("transformers.generation.logits_process")
    from logitkit.integrations import transformers as lk_tf

    x = rows(4, 500, scale=2.0, seed=9)
    for top_p, keep in ((0.0, 1), (0.0, 4), (1.0, 1), (0.6, 20)):
        theirs = tlp.TopPLogitsWarper(top_p, filter_value=-5.0, min_tokens_to_keep=keep)(None, x.clone())
        ours = lk_tf.TopPLogitsWarper(top_p, filter_value=-5.0, min_tokens_to_keep=keep)(None, backend.tensor(x))
        assert torch.equal(ours.cpu(), theirs), (top_p, keep)
    with pytest.raises(ValueError, match="top_p"):
        lk_tf.TopPLogitsWarper(1.5)
    theirs = tlp.TopKLogitsWarper(50)(None, tlp.TemperatureLogitsWarper(0.7)(None, x.clone()))
    theirs = tlp.MinPLogitsWarper(0.02)(None, tlp.TopPLogitsWarper(0.85)(None, theirs))
    ours = lk_tf.FusedSamplingLogitsWarper(0.7, top_k=50, top_p=0.85, min_p=0.02)(None, backend.tensor(x)).cpu()
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    torch.testing.assert_close(ours[ours.isfinite()], theirs[theirs.isfinite()])
