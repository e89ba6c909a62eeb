"""Property tests (hypothesis): random shapes, dtypes, temperatures and
magnitudes up to the dtype's max, -inf masks and NaN/+-inf injections, for
the row ops, Top-H masks, sampling and linear cross-entropy. Each example is
checked against the float64 reference of logitkit.testing and, for the
kernels with a CUDA version, the CPU and emulated-CUDA backends against each
other.

The example budget is small in CI (a fixed derandomised set, so a failure is
reproducible); set LOGITKIT_HYPOTHESIS_EXAMPLES=N for a longer random search,
e.g. ``LOGITKIT_HYPOTHESIS_EXAMPLES=2000 python -m pytest tests/test_properties.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitkit
from logitkit.testing import assert_close, available, backends, references, tolerances, use_backend

hypothesis_examples = int(os.environ.get("LOGITKIT_HYPOTHESIS_EXAMPLES", "0"))
settings.register_profile(
    "logitkit",
    max_examples=hypothesis_examples or 25,
    derandomize=not hypothesis_examples,  # CI: the same examples every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
settings.load_profile("logitkit")

BACKENDS = available()  # cpu, emulated-cuda where built, cuda where present
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF, POS_INF, NAN = -math.inf, math.inf, math.nan


@st.composite
def logit_rows(draw, max_vocab=2000, specials=True):
    """(x, temperature): a [rows, V] tensor in a random dtype whose entries are
    N(0, 1) times a scale from 1e-3 up to the dtype's max, some rows partly or
    wholly -inf, and single NaN / +inf / -inf entries injected. The temperature
    is log-uniform in [1e-2, 1e2], raised where needed so that x / T stays
    finite in float32 (past that, z overflows exactly as torch's x / T does;
    tests/test_row_ops.py covers it)."""
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 4))
    vocab = draw(st.one_of(st.integers(1, 40), st.integers(41, max_vocab)))
    seed = draw(st.integers(0, 2**31 - 1))
    max_log10 = math.log10(torch.finfo(dtype).max) - 0.5
    scale = 10.0 ** draw(st.floats(-3.0, max_log10))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    if specials:
        for r in range(rows):
            kind = draw(st.sampled_from(["plain", "plain", "masked", "all_masked", "nan", "pos_inf", "neg_inf"]))
            if kind == "masked":
                x[r, torch.rand(vocab, generator=g) < draw(st.floats(0.0, 0.99))] = NEG_INF
            elif kind == "all_masked":
                x[r] = NEG_INF
            else:
                value = {"nan": NAN, "pos_inf": POS_INF, "neg_inf": NEG_INF}.get(kind)
                if value is not None:
                    x[r, draw(st.integers(0, vocab - 1))] = value
    temperature = 10.0 ** draw(st.floats(-2.0, 2.0))
    temperature = max(temperature, scale * 8 / torch.finfo(torch.float32).max)
    return x, temperature


def run_on(backend: str, fn, *args, **kwargs):
    """fn on the arguments (tensors copied to the backend's device) with its kernels; the result on the CPU."""
    with use_backend(backend):
        device = backends.device(backend)
        return fn(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in args), **kwargs).cpu()


# ---------------------------------------------------------------------------
# Row ops
# ---------------------------------------------------------------------------

ROW_OPS = ["softmax", "log_softmax", "logsumexp", "entropy"]


@pytest.mark.parametrize("op", ROW_OPS)
@given(case=logit_rows())
def test_row_ops_match_reference_and_backends_agree(op, case):
    """Every row equals the float64 reference of the same (rounded) inputs, NaN
    and infinities included (NaN wins; +inf makes the distribution NaN; an
    all-masked row has logsumexp -inf), and the backends agree."""
    x, temperature = case
    ref = references.ROW_OPS[op](x, temperature)
    atol, rtol = tolerances.ROW_OPS[op][x.dtype]
    outs = {b: run_on(b, getattr(logitkit, op), x, temperature=temperature) for b in BACKENDS}
    for b, out in outs.items():
        # The output is in the input's dtype: compare with the reference rounded to it (a
        # log-prob below the dtype's range is -inf on both sides, as torch's own is).
        assert_close(out.double(), ref.to(out.dtype).double(), atol, rtol, f"{op} on {b}, T={temperature:.3g}")
        # NaN exactly where the reference has NaN (assert_close lets NaN match NaN only).
        assert torch.equal(out.isnan(), ref.isnan()), f"{op} on {b}: NaN pattern differs from the reference"


# ---------------------------------------------------------------------------
# Top-H masks and sampling: the backends agree bit for bit on the kept set and
# the drawn token; the kept set matches the reference (tests/test_top_h.py's
# criterion, with its rounding allowance at the cut).
# ---------------------------------------------------------------------------

RULES = ["hf", "official", "exact"]


@given(case=logit_rows(max_vocab=1500), alpha=st.floats(0.01, 1.0), rule=st.sampled_from(RULES))
def test_top_h_mask_matches_reference_and_backends_agree(case, alpha, rule):
    from test_top_h import assert_matches_reference  # the shared criterion of the Top-H tests

    x, temperature = case
    masks = {b: run_on(b, logitkit.top_h_mask, x, alpha, temperature=temperature, rule=rule) for b in BACKENDS}
    for mask in masks.values():
        assert mask.dtype == torch.bool and mask.shape == x.shape
        if x.dtype == torch.float32:  # the reference reads float32 logits (lower dtypes: agreement only)
            for r in range(x.shape[0]):
                assert_matches_reference(mask[r], x[r], alpha, temperature, rule)
    for b in BACKENDS[1:]:
        assert torch.equal(masks[b], masks["cpu"]), f"{rule}: kept sets differ between cpu and {b}"


@given(
    case=logit_rows(max_vocab=1500), alpha=st.floats(0.01, 1.0), rule=st.sampled_from(RULES), seed=st.integers(0, 99)
)
def test_sample_within_kept_set_and_backends_agree(case, alpha, rule, seed):
    """A drawn token lies in the Top-H kept set; rows whose kept set is empty
    (NaN or +inf) return -1; the same uniforms give the same tokens on every
    backend."""
    x, temperature = case
    uniform = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tokens, masks = {}, {}
    for b in BACKENDS:
        ops = getattr(torch.ops, backends.NAMESPACES[b])
        tokens[b] = run_on(b, ops.sample, x, uniform.float(), alpha=alpha, temperature=temperature, rule=rule)
        masks[b] = run_on(b, ops.top_h_mask, x, alpha=alpha, temperature=temperature, rule=rule)
    for b in BACKENDS:
        for r in range(x.shape[0]):
            token = int(tokens[b][r])
            if masks[b][r].any():
                assert 0 <= token < x.shape[1] and bool(masks[b][r, token]), f"{b} row {r}: token {token} not kept"
            else:
                assert token == -1, f"{b} row {r}: empty kept set but token {token}"
    for b in BACKENDS[1:]:
        assert torch.equal(tokens[b], tokens["cpu"]), f"{rule}: tokens differ between cpu and {b}"


# ---------------------------------------------------------------------------
# Linear cross-entropy with every option
# ---------------------------------------------------------------------------


@st.composite
def linear_ce_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n, d, v = draw(st.integers(1, 12)), draw(st.integers(1, 48)), draw(st.integers(1, 700))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.floats(-1.0, 1.0))
    hidden = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < draw(st.floats(0.0, 0.5))] = -100
    options: dict = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        # 1 KiB: tiles of 256 logits, several per row on the larger vocabularies (tinier tiles,
        # down to one logit, are tests/test_linear_cross_entropy.py's; each is an emulated launch).
        "chunk_budget": draw(st.sampled_from([None, 1024, 4096, 1 << 20])),
    }
    if draw(st.booleans()):
        bias = torch.randn(v, generator=g, dtype=torch.float64)
        if draw(st.booleans()) and v > 1:  # a vocabulary mask: -inf bias on some tokens (never a target)
            masked = torch.rand(v, generator=g) < 0.3
            masked[target[target >= 0]] = False
            bias[masked] = NEG_INF
        options["bias"] = bias.to(dtype)
    if draw(st.booleans()):
        options["class_weight"] = torch.rand(v, generator=g, dtype=torch.float64).float() + 0.5
    if draw(st.booleans()):
        options["label_smoothing"] = draw(st.floats(0.0, 0.5))
    if draw(st.booleans()):
        options["softcap"] = draw(st.floats(1.0, 30.0))
    if draw(st.booleans()):
        options["z_loss"] = draw(st.floats(0.0, 1e-2))
    if draw(st.booleans()):
        options["temperature"] = 10.0 ** draw(st.floats(-0.5, 0.5))
    return hidden, weight, target, options


@given(case=linear_ce_cases())
def test_linear_cross_entropy_matches_reference(case):
    """Loss and every gradient against the fp64 materialised reference, on each
    backend. bf16/fp16 use the tolerances of tests/test_linear_cross_entropy.py
    scaled by the largest gradient entry."""
    hidden, weight, target, options = case
    bias = options.pop("bias", None)
    if options.get("label_smoothing", 0.0) > 0 and bias is not None and bias.isinf().any():
        options.pop("label_smoothing")  # smoothing puts mass on -inf logits: the loss is +inf (as torch)
    ref_leaves = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_options = {k: val for k, val in options.items() if k != "chunk_budget"}
    ref = references.linear_cross_entropy(ref_leaves[0], ref_leaves[1], target, bias=ref_leaves[2], **ref_options)
    grad_out = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    ref.backward(grad_out)
    atol, rtol = tolerances.LINEAR_CROSS_ENTROPY[hidden.dtype]
    for b in BACKENDS:
        device = backends.device(b)
        leaves = [t.detach().to(device).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        on_device = {k: val.to(device) if isinstance(val, torch.Tensor) else val for k, val in options.items()}
        with use_backend(b):
            out = logitkit.linear_cross_entropy(leaves[0], leaves[1], target.to(device), bias=leaves[2], **on_device)
        loss_scale = max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
        assert_close(out.detach().cpu(), ref, atol * loss_scale, rtol, f"loss on {b}")
        out.backward(grad_out.float().to(device))
        for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
            if leaf is None:
                continue
            scale = max(ref_leaf.grad.abs().max().item() if ref_leaf.grad.numel() else 0.0, 1e-2)
            assert_close(leaf.grad.cpu(), ref_leaf.grad, atol * scale, rtol, f"grad {name} on {b} {options}")
