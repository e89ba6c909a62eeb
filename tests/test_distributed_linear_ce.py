"""logitkit.distributed.linear_cross_entropy / linear_log_probs_and_entropy
against the single-device functions on the full weight.

One spawn of 3 gloo processes for the whole module: the 3-rank cases run on
the world group, the 2-rank cases on a subgroup of ranks {0, 1} (which also
exercises ``group=``). Every case is computed inside the workers and reports
None (pass) or a message; the test functions below only look the results up.
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

V, D, N = 1000, 32, 40

# name -> (ranks, shard sizes, options)
CASES: dict[str, tuple[int, tuple[int, ...], dict]] = {
    "mean_333_333_334": (3, (333, 333, 334), {}),
    "mean_1_999": (2, (1, 999), {}),
    "sum_500_500": (2, (500, 500), {"reduction": "sum"}),
    "none_3": (3, (333, 333, 334), {"reduction": "none"}),
    "label_smoothing": (3, (333, 333, 334), {"label_smoothing": 0.1}),
    "class_weight_shard": (3, (333, 333, 334), {"class_weight": "shard"}),
    "class_weight_full_vector": (2, (1, 999), {"class_weight": "full"}),
    "class_weight_and_smoothing_none": (
        3,
        (333, 333, 334),
        {"class_weight": "shard", "label_smoothing": 0.2, "reduction": "none"},
    ),
    "softcap": (2, (1, 999), {"softcap": 3.0}),
    "z_loss": (3, (333, 333, 334), {"z_loss": 1e-3}),
    "temperature": (3, (333, 333, 334), {"temperature": 0.7}),
    "everything": (
        3,
        (333, 333, 334),
        {
            "label_smoothing": 0.05,
            "class_weight": "shard",
            "softcap": 4.0,
            "z_loss": 1e-4,
            "temperature": 1.3,
            "bias": True,
            "reduction": "sum",
        },
    ),
    "ignore_index_in_vocab": (3, (333, 333, 334), {"ignore_index": 7, "n_ignored": 6}),
    "all_ignored_mean": (2, (500, 500), {"n_ignored": N}),
    "all_ignored_sum": (3, (333, 333, 334), {"n_ignored": N, "reduction": "sum"}),
    "bias": (2, (1, 999), {"bias": True}),
    "return_lse": (3, (333, 333, 334), {"return_lse": True}),
    "small_chunk_budget": (3, (333, 333, 334), {"chunk_budget": 4096, "label_smoothing": 0.1}),
    "bf16": (3, (333, 333, 334), {"dtype": torch.bfloat16}),
    "bf16_out_dtype_bf16": (2, (500, 500), {"dtype": torch.bfloat16, "out_dtype": torch.bfloat16}),
    "default_chunk_budget": (2, (1, 999), {"chunk_budget": None}),
    # grad_filter_eps reaches the shard's backward: below every gradient nothing is skipped, above
    # every gradient every tile is (zero gradients), on both sides.
    "grad_filter_eps_tiny": (2, (500, 500), {"grad_filter_eps": 1e-30}),
    "grad_filter_eps_huge": (2, (333, 667), {"grad_filter_eps": 1e30}),
    "bf16_everything": (
        2,
        (1, 999),
        {"dtype": torch.bfloat16, "label_smoothing": 0.1, "class_weight": "shard", "z_loss": 1e-3, "bias": True},
    ),
    "3d_hidden": (3, (333, 333, 334), {"shape": (4, 10)}),
    "merge_allreduce": (3, (333, 333, 334), {"merge": "allreduce", "label_smoothing": 0.1, "class_weight": "shard"}),
    "merge_allreduce_2": (2, (1, 999), {"merge": "allreduce"}),
    "vocab_start_permuted": (3, (333, 333, 334), {"vocab_start": (667, 0, 333)}),
    "no_grad_hidden_reduce": (3, (333, 333, 334), {"reduce_grad_hidden": False}),
    "weight_only_grad": (2, (500, 500), {"hidden_grad": False}),
    "logprobs_entropy": (3, (333, 333, 334), {"op": "logprobs"}),
    "logprobs_entropy_t_bias": (2, (1, 999), {"op": "logprobs", "temperature": 0.8, "bias": True}),
    "logprobs_entropy_bf16": (3, (333, 333, 334), {"op": "logprobs", "dtype": torch.bfloat16}),
    "logprobs_allreduce": (3, (333, 333, 334), {"op": "logprobs", "merge": "allreduce"}),
    "validate_false": (3, (333, 333, 334), {"validate": False, "label_smoothing": 0.1, "class_weight": "full"}),
    "logprobs_validate_false": (2, (1, 999), {"op": "logprobs", "validate": False}),
    "empty_shard": (2, (0, 1000), {"label_smoothing": 0.1, "class_weight": "shard", "bias": True}),
    "empty_shard_logprobs": (3, (500, 0, 500), {"op": "logprobs"}),
    # The CUDA kernels (run by the SIMT emulator) under the distributed layer, via testing.use_backend.
    "emulated_cuda": (
        3,
        (333, 333, 334),
        {"backend": "emulated-cuda", "shape": (8,), "label_smoothing": 0.1, "class_weight": "shard", "z_loss": 1e-3},
    ),
    "emulated_cuda_logprobs": (2, (1, 999), {"backend": "emulated-cuda", "shape": (8,), "op": "logprobs"}),
}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, grad: bool = False) -> None:
    """logitkit.testing.assert_close with the house tolerance of linear_cross_entropy for ``dtype``
    (for gradients the atol is scaled by max |grad|, as tests/test_linear_cross_entropy.py does)."""
    tol = testing.tolerances.LINEAR_CROSS_ENTROPY[dtype]
    atol = tol.atol * (max(1.0, expected.float().abs().max().item()) if grad and expected.numel() else 1.0)
    testing.assert_close(actual.float(), expected.float(), atol, tol.rtol, what)


def _run_case(rank: int, group, world: int, sizes, opts: dict) -> str | None:
    opts = dict(opts)
    backend = opts.pop("backend", "cpu")
    if testing.unavailable_reason(backend):
        return "SKIP: " + str(testing.unavailable_reason(backend))
    with testing.use_backend(backend):
        return _run_case_on_backend(rank, group, world, sizes, opts)


def _run_case_on_backend(rank: int, group, world: int, sizes, opts: dict) -> str | None:
    op = opts.pop("op", "ce")
    dtype = opts.pop("dtype", torch.float32)
    shape = opts.pop("shape", (N,))
    n_ignored = opts.pop("n_ignored", 0)
    use_bias = opts.pop("bias", False)
    cw_mode = opts.pop("class_weight", None)
    vocab_start = opts.pop("vocab_start", None)
    reduce_gh = opts.pop("reduce_grad_hidden", True)
    hidden_grad = opts.pop("hidden_grad", True)
    merge = opts.pop("merge", "allgather")
    validate = opts.pop("validate", True)
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(*shape, D, generator=gen).to(dtype)
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype) if use_bias else None
    target = torch.randint(0, V, shape, generator=gen)
    ignore_index = opts.get("ignore_index", -100)
    if n_ignored:
        flat = target.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = ignore_index
    class_weight = torch.rand(V, generator=gen) + 0.5 if cw_mode else None

    # Single-device reference on the full weight.
    h_ref = hidden.clone().requires_grad_(hidden_grad)
    w_ref = weight.clone().requires_grad_()
    b_ref = bias.clone().requires_grad_() if bias is not None else None
    if op == "ce":
        ref = logitkit.linear_cross_entropy(h_ref, w_ref, target, bias=b_ref, class_weight=class_weight, **opts)
    else:
        ref = logitkit.linear_log_probs_and_entropy(h_ref, w_ref, target, bias=b_ref, **opts)
    ref = ref if isinstance(ref, tuple) else (ref,)

    # This rank's shard.
    g_rank = dist.get_rank(group)
    if vocab_start is None:
        v0 = sum(sizes[:g_rank])
    else:
        v0 = vocab_start[g_rank]
    v1 = v0 + sizes[g_rank]
    h = hidden.clone().requires_grad_(hidden_grad)
    w = weight[v0:v1].clone().requires_grad_()
    b = bias[v0:v1].clone().requires_grad_() if bias is not None else None
    kwargs = dict(opts, group=group, bias=b, reduce_grad_hidden=reduce_gh, merge=merge)
    if vocab_start is not None:
        kwargs["vocab_start"] = v0
    if not validate:  # no metadata exchange: the caller gives the layout
        kwargs.update(vocab_start=v0, vocab_size=V, validate=False)
    if op == "ce":
        cw = None if class_weight is None else (class_weight if cw_mode == "full" else class_weight[v0:v1])
        out = ldist.linear_cross_entropy(h, w, target, class_weight=cw, **kwargs)
    else:
        out = ldist.linear_log_probs_and_entropy(h, w, target, **kwargs)
    out = out if isinstance(out, tuple) else (out,)

    try:
        for i, (a, r) in enumerate(zip(out, ref)):
            assert a.dtype == r.dtype, f"output {i}: dtype {a.dtype}, single-device {r.dtype}"
            _close(a, r, dtype, f"output {i}")
        # Backward with the same upstream gradients on every rank.
        gen_g = torch.Generator().manual_seed(99)
        ups = [torch.randn(r.shape, generator=gen_g).to(r.dtype) if r.requires_grad else None for r in ref]
        pairs = [(r, g) for r, g in zip(ref, ups) if g is not None]
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        pairs = [(o, g) for o, g in zip(out, ups) if g is not None]
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        _close(w.grad, w_ref.grad[v0:v1], dtype, "grad_weight", grad=True)
        if b is not None:
            _close(b.grad, b_ref.grad[v0:v1], dtype, "grad_bias", grad=True)
        if hidden_grad:
            gh = h.grad
            if not reduce_gh:
                gh = gh.float().contiguous()
                dist.all_reduce(gh, group=group)
            _close(gh, h_ref.grad, dtype, "grad_hidden", grad=True)
        else:
            assert h.grad is None
    except AssertionError as exc:
        return str(exc)
    return None


def _cases_worker(rank: int, world: int) -> dict[str, str | None]:
    sub = dist.new_group([0, 1])
    results: dict[str, str | None] = {}
    for name, (ranks, sizes, opts) in CASES.items():
        if ranks == 2 and rank >= 2:
            continue
        group = None if ranks == 3 else sub
        try:
            results[name] = _run_case(rank, group, ranks, sizes, opts)
        except Exception as exc:
            results[name] = f"raised {type(exc).__name__}: {exc}"
    # Counting: forward and backward of the default loss.
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(N, D, generator=gen, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=gen)
    w = torch.randn((333, 333, 334)[rank], D, generator=gen, requires_grad=True)
    with ldist.count_collectives() as fwd:
        loss = ldist.linear_cross_entropy(h, w, t, label_smoothing=0.1)
    with ldist.count_collectives() as bwd:
        loss.backward()
    with ldist.count_collectives() as quiet:
        ldist.linear_cross_entropy(h, w, t, vocab_start=sum((333, 333, 334)[:rank]), vocab_size=V, validate=False)
    counts = {
        "fwd": [(r.kind, r.purpose, r.payload_bytes) for r in fwd.records],
        "bwd": [(r.kind, r.purpose, r.payload_bytes) for r in bwd.records],
        "no_validate": [(r.kind, r.purpose, r.payload_bytes) for r in quiet.records],
    }
    return {"cases": results, "counts": counts}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_group(3, _cases_worker, timeout=600)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_device(results, name):
    ranks = CASES[name][0]
    outcome = results[0]["cases"][name]
    if isinstance(outcome, str) and outcome.startswith("SKIP: "):
        pytest.skip(outcome[6:])
    for r in range(ranks):
        assert results[r]["cases"][name] is None, f"rank {r}: {results[r]['cases'][name]}"


def test_collective_counts(results):
    for r in range(3):
        fwd, bwd = results[r]["counts"]["fwd"], results[r]["counts"]["bwd"]
        # One fixed-size metadata all-gather + one all-gather of (m, s, z_y, sum w z) per token.
        assert [(k, p) for k, p, _ in fwd] == [("all_gather", "metadata"), ("all_gather", "state")]
        assert fwd[0][2] == 32 * 8
        assert fwd[1][2] == N * 4 * 4
        # Backward: one all-reduce of grad_hidden (N x D fp32).
        assert bwd == [("all_reduce", "grad_hidden", N * D * 4)]
        # validate=False: no metadata exchange.
        assert results[r]["counts"]["no_validate"] == [("all_gather", "state", N * 3 * 4)]
