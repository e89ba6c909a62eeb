"""Top-H masks, truncated logits and sampling on vocabulary-sharded logits
(logitkit.distributed.{top_h_mask, top_h, sample}) against the single-device
ops on the concatenated logits: the same kept sets (exactly) for every rule,
one alpha and temperature or one per row, and the same drawn tokens for the same generator seed. One spawn of 3 gloo
processes; 2-rank cases on the subgroup {0, 1}.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import logitkit
import logitkit.distributed as ldist
from logitkit.distributed._harness import run_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

V = 1000
RULES = ("hf", "official", "exact")
SPLITS = {3: (333, 333, 334), 2: (1, 999)}


def _logits(kind: str, rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = 2.5 * torch.randn(rows, V, generator=gen)
    elif kind == "peaked":  # one dominant token per row, a long tail
        x = torch.randn(rows, V, generator=gen)
        x[torch.arange(rows), torch.randint(0, V, (rows,), generator=gen)] += 25.0
    elif kind == "lm_like":  # a Zipf-like spread of scores
        x = -1.2 * torch.log(torch.arange(1, V + 1).float())[None].repeat(rows, 1)
        x = x + 0.3 * torch.randn(rows, V, generator=gen)
        x = x[:, torch.randperm(V, generator=gen)]
    elif kind == "ties":  # few distinct values: big tie groups straddling shards and cuts
        x = torch.randint(0, 6, (rows, V), generator=gen).float() * 0.75
    elif kind == "special":
        x = 2.0 * torch.randn(rows, V, generator=gen)
        x[0, 500] = float("nan")
        x[1, 17] = float("inf")
        x[2] = float("-inf")
        x[3, :900] = float("-inf")  # only the last shard has mass
        x[4, 100:] = float("-inf")
        x[5] = 1.0  # one tie group of V tokens
        x[6, 0] = 60.0  # every other token has probability that underflows
    else:
        raise ValueError(kind)
    return x.to(dtype)


# name -> (ranks, logits kind, dtype, rule, alpha, temperature, cap)
CASES: dict[str, tuple] = {}
for _rule in RULES:
    for _ranks in (3, 2):
        for _alpha in (0.1, 0.4, 0.9, 1.0):
            CASES[f"{_rule}_{_ranks}r_random_a{_alpha}"] = (_ranks, "random", torch.float32, _rule, _alpha, 1.0, None)
        CASES[f"{_rule}_{_ranks}r_lm_like_t0.7"] = (_ranks, "lm_like", torch.float32, _rule, 0.5, 0.7, None)
        CASES[f"{_rule}_{_ranks}r_peaked"] = (_ranks, "peaked", torch.float32, _rule, 0.3, 1.0, None)
        CASES[f"{_rule}_{_ranks}r_ties"] = (_ranks, "ties", torch.float32, _rule, 0.6, 1.0, None)
        CASES[f"{_rule}_{_ranks}r_bf16"] = (_ranks, "lm_like", torch.bfloat16, _rule, 0.4, 1.5, None)
        CASES[f"{_rule}_{_ranks}r_special"] = (_ranks, "special", torch.float32, _rule, 0.5, 1.0, None)
    CASES[f"{_rule}_3r_fp16"] = (3, "random", torch.float16, _rule, 0.7, 0.9, None)
# per-row alpha (0: Top-H off for that row), as single-device top_h_mask / sample with a tensor
ALPHA_ROWS = torch.tensor([0.1, 0.0, 0.5, 0.9, 1.0, 0.3, 0.0, 0.7])
for _rule in RULES:
    CASES[f"{_rule}_3r_per_row_alpha"] = (3, "lm_like", torch.float32, _rule, ALPHA_ROWS, 0.8, None)
    CASES[f"{_rule}_2r_per_row_alpha_special"] = (2, "special", torch.float32, _rule, ALPHA_ROWS.flip(0), 1.0, None)
# per-row temperature (with one alpha, with per-row alpha, and plain sampling)
T_ROWS = torch.tensor([0.7, 1.0, 1.5, 0.3, 2.0, 1.0, 0.9, 1.25])
for _rule in RULES:
    CASES[f"{_rule}_3r_per_row_temperature"] = (3, "lm_like", torch.float32, _rule, 0.5, T_ROWS, None)
    CASES[f"{_rule}_2r_per_row_both_special"] = (2, "special", torch.float32, _rule, ALPHA_ROWS, T_ROWS, None)
CASES["exact_per_row_temperature_bf16"] = (3, "random", torch.bfloat16, "exact", ALPHA_ROWS, T_ROWS.flip(0), None)
# greedy rows (temperature 0: the max, ties drawn uniformly; sample only, as single-device)
T_GREEDY = torch.tensor([0.7, 0.0, 1.5, 0.0, 2.0, 1.0, 0.0, 1.25])
for _rule in (*RULES, None):
    _a = None if _rule is None else 0.6
    CASES[f"{_rule or 'plain'}_3r_greedy_rows_ties"] = (3, "ties", torch.float32, _rule, _a, T_GREEDY, None)
    # (bf16: ties straddle the K-th place of the NaN row, whose local top must keep the NaN)
    CASES[f"{_rule or 'plain'}_2r_greedy_rows_special"] = (2, "special", torch.bfloat16, _rule, _a, T_GREEDY, None)
CASES["exact_greedy_rows_per_row_alpha"] = (3, "ties", torch.float32, "exact", ALPHA_ROWS, T_GREEDY.flip(0), None)
CASES["hf_all_greedy"] = (2, "ties", torch.float32, "hf", 0.5, 0.0, None)
CASES["plain_all_greedy"] = (3, "ties", torch.float32, None, None, 0.0, None)
CASES["plain_per_row_temperature"] = (3, "lm_like", torch.float32, None, None, T_ROWS, None)
CASES["plain_per_row_temperature_special"] = (2, "special", torch.float32, None, None, T_ROWS, None)
CASES["hf_per_row_alpha_ties_bf16"] = (3, "ties", torch.bfloat16, "hf", ALPHA_ROWS, 1.0, 40)
CASES["exact_per_row_alpha_no_validate"] = (2, "peaked", torch.float32, "exact", ALPHA_ROWS, 1.0, None, False)
CASES["hf_cap5"] = (3, "random", torch.float32, "hf", 0.8, 1.0, 5)
CASES["official_cap700"] = (3, "lm_like", torch.float32, "official", 0.8, 1.0, 700)
CASES["hf_cap_ties"] = (2, "ties", torch.bfloat16, "hf", 0.9, 1.0, 40)
CASES["exact_cap_ignored"] = (2, "lm_like", torch.float32, "exact", 0.5, 1.0, 3)
CASES["plain_3r"] = (3, "random", torch.float32, None, None, 1.0, None)
CASES["plain_2r_t0.5"] = (2, "lm_like", torch.float32, None, None, 0.5, None)
CASES["plain_special"] = (3, "special", torch.float32, None, None, 1.0, None)
CASES["plain_bf16"] = (2, "ties", torch.bfloat16, None, None, 1.0, None)
# validate=False (no metadata exchange; the layout from vocab_start/vocab_size)
CASES["exact_no_validate"] = (3, "lm_like", torch.float32, "exact", 0.5, 1.0, None, False)
CASES["hf_no_validate"] = (2, "ties", torch.bfloat16, "hf", 0.6, 1.0, None, False)
CASES["plain_no_validate"] = (3, "random", torch.float32, None, None, 1.0, None, False)
# a rank with an empty shard
for _rule in (*RULES, None):
    CASES[f"{_rule or 'plain'}_empty_shard"] = (
        3,
        "lm_like",
        torch.float32,
        _rule,
        None if _rule is None else 0.5,
        1.0,
        None,
        True,
        (500, 0, 500),
    )

ROWS = 8


def _run_case(group, ranks: int, case: tuple, seed: int) -> str | None:
    _, kind, dtype, rule, alpha, temperature, cap = case[:7]
    validate = case[7] if len(case) > 7 else True
    sizes = case[8] if len(case) > 8 else SPLITS[ranks]
    logits = _logits(kind, ROWS, dtype, seed)
    g_rank = dist.get_rank(group)
    v0 = sum(sizes[:g_rank])
    v1 = v0 + sizes[g_rank]
    shard = logits[:, v0:v1]
    kw = {} if validate else {"vocab_start": v0, "vocab_size": V, "validate": False}
    problems = []
    greedy = torch.as_tensor(temperature).eq(0).any().item()  # sample only: the mask ops take T > 0
    if rule is not None and not greedy:
        ref_mask = logitkit.top_h_mask(logits, alpha, temperature=temperature, rule=rule, cap=cap)
        mask = ldist.top_h_mask(shard, alpha, temperature=temperature, rule=rule, cap=cap, group=group, **kw)
        if not torch.equal(mask, ref_mask[:, v0:v1]):
            bad = (mask != ref_mask[:, v0:v1]).any(1).nonzero().squeeze(1).tolist()
            problems.append(f"mask differs in rows {bad}")
        trunc = ldist.top_h(shard, alpha, temperature=temperature, rule=rule, cap=cap, group=group, **kw)
        ref_trunc = logitkit.top_h(logits, alpha, temperature=temperature, rule=rule, cap=cap)[:, v0:v1]
        if not torch.equal(trunc.isinf(), ref_trunc.isinf()) or not torch.equal(
            trunc.nan_to_num(0.0, 0.0, 0.0), ref_trunc.nan_to_num(0.0, 0.0, 0.0)
        ):
            problems.append("top_h values differ")
    for draw_seed in (seed, seed + 1):
        ref_tok = logitkit.sample(
            logits,
            temperature=temperature,
            top_h=alpha,
            rule=rule or "hf",
            cap=cap,
            generator=torch.Generator().manual_seed(draw_seed),
        )
        tok = ldist.sample(
            shard,
            temperature=temperature,
            top_h=alpha,
            rule=rule or "hf",
            cap=cap,
            generator=torch.Generator().manual_seed(draw_seed),
            group=group,
            **kw,
        )
        if not torch.equal(tok, ref_tok):
            problems.append(f"sample (seed {draw_seed}): {tok.tolist()} != {ref_tok.tolist()}")
    return "; ".join(problems) or None


def _cases_worker(rank: int, world: int) -> dict:
    sub = dist.new_group([0, 1])
    results: dict[str, str | None] = {}
    for i, (name, case) in enumerate(CASES.items()):
        ranks = case[0]
        if ranks == 2 and rank >= 2:
            continue
        try:
            results[name] = _run_case(None if ranks == 3 else sub, ranks, case, seed=100 + i)
        except Exception as exc:
            import traceback

            results[name] = f"raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    # Ranks whose generators differ still agree (they use the group's first rank's numbers).
    logits = _logits("random", ROWS, torch.float32, 7)
    v0 = sum((333, 333, 334)[:rank])
    shard = logits[:, v0 : v0 + (333, 333, 334)[rank]]
    tok = ldist.sample(shard, top_h=0.5, rule="exact", generator=torch.Generator().manual_seed(rank))
    ref = logitkit.sample(logits, top_h=0.5, rule="exact", generator=torch.Generator().manual_seed(0))
    results["generators_differ"] = None if torch.equal(tok, ref) else f"{tok.tolist()} != {ref.tolist()}"
    # Collectives of the three rules.
    counts = {}
    for rule in RULES:
        with ldist.count_collectives() as log:
            ldist.top_h_mask(shard, 0.4, rule=rule)
        counts[rule] = [(r.kind, r.purpose, r.payload_bytes) for r in log.records]
    return {"cases": results, "counts": counts}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_group(3, _cases_worker, timeout=900)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_device(results, name):
    for r in range(CASES[name][0]):
        assert results[r]["cases"][name] is None, f"rank {r}: {results[r]['cases'][name]}"


def test_generators_differ(results):
    for r in range(3):
        assert results[r]["cases"]["generators_differ"] is None


def test_collectives(results):
    counts = results[0]["counts"]
    k = 100
    assert counts["hf"] == [("all_gather", "metadata", 256), ("all_gather", "top_k", ROWS * 2 * k * 8)]
    assert counts["official"][1] == ("all_gather", "top_k", ROWS * (2 * k + 2) * 8)
    exact = counts["exact"]
    assert exact[1] == ("all_reduce", "histogram", ROWS * 2048 * 3 * 8)  # fp64 sums, as the CPU kernel's
    assert exact[2] == ("all_gather", "state", ROWS * 7 * 8)
    assert len(exact) <= 6
