"""Row ops and cross-entropy on vocabulary-sharded logits
(logitkit.distributed.{softmax_stats, logsumexp, entropy, log_softmax,
softmax, cross_entropy}) against the single-device ops on the concatenated
logits: forward and backward. One spawn of 3 gloo processes; 2-rank cases
on the subgroup {0, 1}.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import logitkit
import logitkit.distributed as ldist
from logitkit import testing
from logitkit.distributed._harness import run_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

V, ROWS = 1000, 12

OPS = ("softmax_stats", "logsumexp", "entropy", "log_softmax", "softmax", "cross_entropy")

# name -> (ranks, shard sizes, options)
CASES: dict[str, tuple[int, tuple[int, ...], dict]] = {}
for _op in OPS:
    CASES[f"{_op}_333_333_334"] = (3, (333, 333, 334), {"op": _op})
    CASES[f"{_op}_1_999"] = (2, (1, 999), {"op": _op, "temperature": 0.7})
    CASES[f"{_op}_bf16"] = (3, (333, 333, 334), {"op": _op, "dtype": torch.bfloat16})
    CASES[f"{_op}_masked"] = (3, (333, 333, 334), {"op": _op, "masked": True})
    CASES[f"{_op}_allreduce"] = (2, (500, 500), {"op": _op, "merge": "allreduce"})
    CASES[f"{_op}_3d"] = (3, (1, 998, 1), {"op": _op, "shape": (3, 4)})
    CASES[f"{_op}_empty_shard"] = (2, (0, 1000), {"op": _op})
CASES.update(
    {
        "ce_sum": (3, (333, 333, 334), {"op": "cross_entropy", "reduction": "sum"}),
        "ce_none": (2, (1, 999), {"op": "cross_entropy", "reduction": "none"}),
        "ce_smoothing": (3, (333, 333, 334), {"op": "cross_entropy", "label_smoothing": 0.1}),
        "ce_class_weight_shard": (3, (333, 333, 334), {"op": "cross_entropy", "class_weight": "shard"}),
        "ce_class_weight_full": (2, (1, 999), {"op": "cross_entropy", "class_weight": "full", "reduction": "sum"}),
        "ce_everything": (
            3,
            (333, 333, 334),
            {
                "op": "cross_entropy",
                "class_weight": "shard",
                "label_smoothing": 0.2,
                "z_loss": 1e-3,
                "temperature": 1.4,
                "ignore_index": 3,
                "n_ignored": 3,
            },
        ),
        "ce_bf16_out_dtype_bf16": (
            2,
            (500, 500),
            {"op": "cross_entropy", "dtype": torch.bfloat16, "out_dtype": torch.bfloat16},
        ),
        "ce_everything_bf16": (
            2,
            (1, 999),
            {
                "op": "cross_entropy",
                "dtype": torch.bfloat16,
                "class_weight": "shard",
                "label_smoothing": 0.1,
                "z_loss": 1e-3,
            },
        ),
        "ce_all_ignored": (3, (333, 333, 334), {"op": "cross_entropy", "n_ignored": ROWS}),
        "ce_vocab_start_permuted": (3, (333, 333, 334), {"op": "cross_entropy", "vocab_start": (667, 0, 333)}),
        "lse_vocab_start_permuted": (3, (333, 333, 334), {"op": "logsumexp", "vocab_start": (334, 667, 0)}),
        "ce_validate_false": (
            3,
            (333, 333, 334),
            {"op": "cross_entropy", "validate": False, "class_weight": "full", "label_smoothing": 0.1},
        ),
        "entropy_validate_false": (2, (1, 999), {"op": "entropy", "validate": False}),
        "softmax_validate_false": (3, (333, 333, 334), {"op": "softmax", "validate": False}),
        # The CUDA row kernels (run by the SIMT emulator) under the distributed layer.
        "ce_emulated_cuda": (
            3,
            (333, 333, 334),
            {"op": "cross_entropy", "backend": "emulated-cuda", "label_smoothing": 0.1, "class_weight": "shard"},
        ),
        "entropy_emulated_cuda": (2, (1, 999), {"op": "entropy", "backend": "emulated-cuda", "masked": True}),
        "log_softmax_emulated_cuda": (3, (333, 333, 334), {"op": "log_softmax", "backend": "emulated-cuda"}),
    }
)


def _run_case(group, sizes, opts: dict) -> str | None:
    opts = dict(opts)
    backend = opts.pop("backend", "cpu")
    if testing.unavailable_reason(backend):
        return "SKIP: " + str(testing.unavailable_reason(backend))
    with testing.use_backend(backend):
        return _run_case_on_backend(group, sizes, opts)


def _run_case_on_backend(group, sizes, opts: dict) -> str | None:
    op = opts.pop("op")
    dtype = opts.pop("dtype", torch.float32)
    shape = opts.pop("shape", (ROWS,))
    masked = opts.pop("masked", False)
    merge = opts.pop("merge", "allgather")
    vocab_start = opts.pop("vocab_start", None)
    n_ignored = opts.pop("n_ignored", 0)
    cw_mode = opts.pop("class_weight", None)
    temperature = opts.pop("temperature", 1.0)
    validate = opts.pop("validate", True)
    gen = torch.Generator().manual_seed(4321)
    logits = (3 * torch.randn(*shape, V, generator=gen)).to(dtype)
    if masked:
        # Masked tokens, and rows whose first shard is entirely masked.
        flat = logits.view(-1, V)
        flat[torch.rand(flat.shape, generator=gen) < 0.3] = float("-inf")
        flat[0, : sizes[0]] = float("-inf")
        flat[1, sizes[0] :] = float("-inf")
    g_rank = dist.get_rank(group)
    v0 = sum(sizes[:g_rank]) if vocab_start is None else vocab_start[g_rank]
    v1 = v0 + sizes[g_rank]
    x_ref = logits.clone().requires_grad_()
    x = logits[..., v0:v1].clone().requires_grad_()
    kw = dict(group=group, merge=merge)
    if vocab_start is not None:
        kw["vocab_start"] = v0
    if not validate:
        kw.update(vocab_start=v0, vocab_size=V, validate=False)
    if op == "cross_entropy":
        target = torch.randint(0, V, shape, generator=gen)
        ignore_index = opts.get("ignore_index", -100)
        if n_ignored:
            target.view(-1)[torch.randperm(target.numel(), generator=gen)[:n_ignored]] = ignore_index
        cw = torch.rand(V, generator=gen) + 0.5 if cw_mode else None
        ref = logitkit.cross_entropy(x_ref, target, class_weight=cw, temperature=temperature, **opts)
        cw_local = None if cw is None else (cw if cw_mode == "full" else cw[v0:v1])
        out = ldist.cross_entropy(x, target, class_weight=cw_local, temperature=temperature, **opts, **kw)
    else:
        ref = getattr(logitkit, op)(x_ref, temperature)
        out = getattr(ldist, op)(x, temperature, **kw)
    if op in ("log_softmax", "softmax"):
        ref = ref[..., v0:v1]
    # The house tolerances (logitkit.testing.tolerances) of the single-device op.
    tol = (
        testing.tolerances.CROSS_ENTROPY[dtype]
        if op == "cross_entropy"
        else testing.tolerances.ROW_OPS["logsumexp" if op == "softmax_stats" else op][dtype]
    )
    try:
        assert out.dtype == ref.dtype, f"forward: dtype {out.dtype}, single-device {ref.dtype}"
        testing.assert_close(out.float(), ref.float(), tol.atol, tol.rtol, "forward")
        if op == "softmax_stats":
            return None
        gen_g = torch.Generator().manual_seed(7)
        if op in ("log_softmax", "softmax"):
            up_full = torch.randn(logits.shape, generator=gen_g).to(ref.dtype)
            ref_full = getattr(logitkit, op)(x_ref, temperature)
            ref_full.backward(up_full)
            out.backward(up_full[..., v0:v1])
        else:
            up = torch.randn(ref.shape, generator=gen_g).to(ref.dtype)
            ref.backward(up)
            out.backward(up)
        expected = x_ref.grad[..., v0:v1].float()
        scale = max(1.0, expected.abs().nan_to_num(0.0, 0.0, 0.0).max().item()) if expected.numel() else 1.0
        # Both sides round their gradient to the logits' dtype: in bf16/fp16 allow one unit in the last place
        # of the gradient's largest entry (the entropy gradient -p (log p + H) cancels, so the error is absolute).
        ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
        testing.assert_close(x.grad.float(), expected, max(tol.atol, 1e-6, ulp) * scale, max(tol.rtol, ulp), "grad")
    except AssertionError as exc:
        return str(exc)
    return None


def _cases_worker(rank: int, world: int) -> dict:
    sub = dist.new_group([0, 1])
    results: dict[str, str | None] = {}
    for name, (ranks, sizes, opts) in CASES.items():
        if ranks == 2 and rank >= 2:
            continue
        try:
            results[name] = _run_case(None if ranks == 3 else sub, sizes, opts)
        except Exception as exc:
            results[name] = f"raised {type(exc).__name__}: {exc}"
    # Collectives of cross_entropy and log_softmax, forward and backward.
    gen = torch.Generator().manual_seed(11)
    t = torch.randint(0, V, (ROWS,), generator=gen)
    x = torch.randn(ROWS, (333, 333, 334)[rank], generator=gen, requires_grad=True)
    counts = {}
    for op in ("cross_entropy", "logsumexp", "log_softmax"):
        with ldist.count_collectives() as fwd:
            y = ldist.cross_entropy(x, t) if op == "cross_entropy" else getattr(ldist, op)(x)
        with ldist.count_collectives() as bwd:
            y.backward(torch.ones_like(y))
        counts[op] = (
            [(r.kind, r.purpose, r.payload_bytes) for r in fwd.records],
            [(r.kind, r.purpose, r.payload_bytes) for r in bwd.records],
        )
    return {"cases": results, "counts": counts}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_group(3, _cases_worker, timeout=600)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_device(results, name):
    outcome = results[0]["cases"][name]
    if isinstance(outcome, str) and outcome.startswith("SKIP: "):
        pytest.skip(outcome[6:])
    for r in range(CASES[name][0]):
        assert results[r]["cases"][name] is None, f"rank {r}: {results[r]['cases'][name]}"


def test_collective_counts(results):
    for r in range(3):
        fwd, bwd = results[r]["counts"]["cross_entropy"]
        assert [(k, p) for k, p, _ in fwd] == [("all_gather", "metadata"), ("all_gather", "state")]
        assert fwd[1][2] == ROWS * 3 * 4  # m, s, z_y
        assert bwd == []  # no collective in the backward of a replicated per-row output
        fwd, bwd = results[r]["counts"]["logsumexp"]
        assert fwd[1][2] == ROWS * 2 * 4 and bwd == []
        fwd, bwd = results[r]["counts"]["log_softmax"]
        assert bwd == [("all_reduce", "grad_row_sum", ROWS * 4)]
