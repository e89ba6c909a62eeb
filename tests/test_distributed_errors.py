"""Ranks that disagree get a clear error on every rank, never a hang.

Each case makes the ranks of a 3-process gloo group pass inconsistent
arguments; every rank must raise ValueError naming the problem, and the
group must still be usable afterwards (a sanity all-reduce after every case
would hang or fail if some rank were left inside a collective).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import logitkit.distributed as ldist
from logitkit.distributed._harness import run_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

V, D, N = 1000, 16, 8
SIZES = (333, 333, 334)


def _inputs(rank: int):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, D, generator=gen)
    target = torch.randint(0, V, (N,), generator=gen)
    weight = torch.randn(V, D, generator=gen)
    v0 = sum(SIZES[:rank])
    return hidden, target, weight[v0 : v0 + SIZES[rank]].clone(), v0


def _case_different_n(rank):
    h, t, w, _ = _inputs(rank)
    if rank == 2:
        h, t = h[:-1], t[:-1]
    ldist.linear_cross_entropy(h, w, t)


def _case_option_differs(rank):
    h, t, w, _ = _inputs(rank)
    ldist.linear_cross_entropy(h, w, t, label_smoothing=0.1 if rank == 1 else 0.0)


def _case_target_outside(rank):
    h, t, w, _ = _inputs(rank)
    t[3] = V  # no rank's shard holds it
    ldist.linear_cross_entropy(h, w, t)


def _case_negative_target(rank):
    h, t, w, _ = _inputs(rank)
    t[1] = -5
    ldist.linear_log_probs_and_entropy(h, w, t)


def _case_targets_differ(rank):
    h, t, w, _ = _inputs(rank)
    t[0] = (t[0] + rank) % V
    ldist.linear_cross_entropy(h, w, t)


def _case_local_dtype_error(rank):
    h, t, w, _ = _inputs(rank)
    if rank == 1:
        w = w.double()
    ldist.linear_cross_entropy(h, w, t)


def _case_vocab_start_overlap(rank):
    h, t, w, v0 = _inputs(rank)
    ldist.linear_cross_entropy(h, w, t, vocab_start=0 if rank < 2 else v0)


def _case_vocab_start_some_ranks(rank):
    h, t, w, v0 = _inputs(rank)
    ldist.linear_cross_entropy(h, w, t, vocab_start=v0 if rank == 0 else None)


def _case_different_ops(rank):
    _, _, w, _ = _inputs(rank)
    x = w[:, :4].t().contiguous()  # (4, V_r) logits
    (ldist.logsumexp if rank == 0 else ldist.entropy)(x)


def _case_rows_differ(rank):
    x = torch.randn(5 if rank == 1 else 4, SIZES[rank])
    ldist.log_softmax(x)


def _case_temperature_differs(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.softmax(x, temperature=1.0 + 0.5 * (rank == 2))


def _case_alpha_differs(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.top_h_mask(x, 0.4 if rank else 0.5, rule="exact")


def _case_rule_differs(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.sample(x, top_h=0.4, rule="hf" if rank else "official")


def _case_bad_alpha_one_rank(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.top_h_mask(x, 1.5 if rank == 2 else 0.5)


def _case_alpha_rows_differ(rank):
    x = torch.randn(4, SIZES[rank])
    alpha = torch.tensor([0.2, 0.0, 0.5, 0.9])
    alpha[2] += 0.1 * (rank == 1)
    ldist.top_h_mask(x, alpha, rule="hf")


def _case_alpha_rows_on_some_ranks(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.sample(x, top_h=torch.full((4,), 0.5) if rank == 0 else 0.5, rule="exact")


def _case_alpha_rows_shape(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.top_h_mask(x, torch.full((3 if rank == 2 else 4,), 0.5))


def _case_alpha_rows_range(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.top_h_mask(x, torch.tensor([0.5, 0.5, -0.1 if rank == 1 else 0.5, 0.5]), rule="official")


def _case_temperature_rows_differ(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.sample(x, temperature=torch.tensor([0.5, 1.0, 1.0 + 0.25 * (rank == 2), 2.0]))


def _case_temperature_rows_greedy(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.top_h_mask(x, 0.5, temperature=torch.tensor([0.5, 0.0 if rank == 0 else 1.0, 1.0, 2.0]))


def _case_class_weight_length(rank):
    _, t, _, _ = _inputs(rank)
    x = torch.randn(N, SIZES[rank])
    cw = torch.ones(SIZES[rank] + (rank == 1))
    ldist.cross_entropy(x, t, class_weight=cw)


def _case_ce_target_outside(rank):
    _, t, _, _ = _inputs(rank)
    t[0] = V + 7
    ldist.cross_entropy(torch.randn(N, SIZES[rank]), t)


def _case_merge_differs(rank):
    x = torch.randn(4, SIZES[rank])
    ldist.logsumexp(x, merge="allreduce" if rank == 0 else "allgather")


def _case_grad_on_some_ranks(rank):
    h, t, w, _ = _inputs(rank)
    ldist.linear_cross_entropy(h.requires_grad_(rank != 1), w, t)


# name -> (function, substrings every rank's message must contain (any of the alternatives per entry))
CASES = {
    "different_n": (_case_different_n, ["number of tokens", "rank 2: 7"]),
    "option_differs": (_case_option_differs, ["label_smoothing", "rank 1: 0.1"]),
    "target_outside": (_case_target_outside, ["target[3] = 1000", "outside [0, 1000)"]),
    "negative_target": (_case_negative_target, ["target[1] = -5"]),
    "targets_differ": (_case_targets_differ, ["disagree on target"]),
    "local_dtype_error": (_case_local_dtype_error, [("weight_shard", "rank(s) [1]")]),
    "vocab_start_overlap": (_case_vocab_start_overlap, ["do not tile"]),
    "vocab_start_some_ranks": (_case_vocab_start_some_ranks, ["vocab_start is given on some ranks"]),
    "different_ops": (_case_different_ops, ["another logitkit.distributed call"]),
    "rows_differ": (_case_rows_differ, ["number of rows", "rank 1: 5"]),
    "temperature_differs": (_case_temperature_differs, ["temperature", "rank 2: 1.5"]),
    "alpha_differs": (_case_alpha_differs, ["alpha", "rank 0: 0.5"]),
    "rule_differs": (_case_rule_differs, ["disagree on rule"]),
    "bad_alpha_one_rank": (_case_bad_alpha_one_rank, [("alpha must be in (0, 1]", "rank(s) [2]")]),
    "alpha_rows_differ": (_case_alpha_rows_differ, ["alpha (top_h)"]),
    "alpha_rows_on_some_ranks": (_case_alpha_rows_on_some_ranks, ["alpha (top_h) given per row"]),
    "alpha_rows_shape": (_case_alpha_rows_shape, [("one value per row", "rank(s) [2]")]),
    "alpha_rows_range": (_case_alpha_rows_range, [("alpha must be in [0, 1] per row", "rank(s) [1]")]),
    "temperature_rows_differ": (_case_temperature_rows_differ, ["temperature"]),
    "temperature_rows_greedy": (_case_temperature_rows_greedy, [("finite number > 0 per row", "rank(s) [0]")]),
    "class_weight_length": (_case_class_weight_length, ["class_weight", "rank 1 passed length 334"]),
    "ce_target_outside": (_case_ce_target_outside, ["target[0] = 1007"]),
    "merge_differs": (_case_merge_differs, ["disagree on merge"]),
    "grad_on_some_ranks": (_case_grad_on_some_ranks, ["requires_grad"]),
}


def _errors_worker(rank: int, world: int) -> dict:
    out: dict[str, tuple[str, str]] = {}
    for name, (fn, _) in CASES.items():
        try:
            fn(rank)
            out[name] = ("no error", "")
        except Exception as exc:  # every rank must get here, with a ValueError
            out[name] = (type(exc).__name__, str(exc))
        check = torch.ones(1)
        dist.all_reduce(check)  # still in step with the other ranks
        assert int(check) == world
    # The group works for a correct call after all that.
    h, t, w, _ = _inputs(rank)
    out["after"] = ("ok", repr(float(ldist.linear_cross_entropy(h, w, t))))
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_group(3, _errors_worker, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_raises(results, name):
    wanted = CASES[name][1]
    for r in range(3):
        kind, msg = results[r][name]
        assert kind == "ValueError", f"rank {r}: {kind} {msg}"
        for w in wanted:
            alternatives = w if isinstance(w, tuple) else (w,)
            assert any(a in msg for a in alternatives), f"rank {r}: {msg!r} lacks {w!r}"


def test_group_usable_afterwards(results):
    losses = {results[r]["after"][1] for r in range(3)}
    assert len(losses) == 1  # bitwise the same loss on every rank
