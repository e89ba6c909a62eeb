"""Schemas, fake kernels, autograd registration and torch.compile for every op."""

from __future__ import annotations

import pytest
import torch

import logitkit
from logitkit import _layout
from logitkit.testing import assert_close, available, use_backend

FORWARD_OPS = ["softmax", "log_softmax", "logsumexp", "entropy", "softmax_stats"]


def sample_args(op: str, device: str, requires_grad: bool):
    x = torch.randn(3, 37, device=device, requires_grad=requires_grad and op != "softmax_stats")
    return (x, 1.3)


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_opcheck(backend, op):
    fn = getattr(backend.ops, op)
    for requires_grad in (False, True):
        torch.library.opcheck(fn, sample_args(op, backend.device, requires_grad))


@pytest.mark.parametrize(
    "op, grad_shape",
    [
        ("softmax_backward", "full"),
        ("log_softmax_backward", "full"),
        ("logsumexp_backward", "row"),
        ("entropy_backward", "row"),
    ],
)
def test_opcheck_backward_ops(backend, op, grad_shape):
    x = torch.randn(3, 37, device=backend.device)
    if op == "softmax_backward":
        x = torch.softmax(x, -1)
    elif op == "log_softmax_backward":
        x = torch.log_softmax(x, -1)
    grad = torch.randn(x.shape if grad_shape == "full" else x.shape[:-1], device=backend.device)
    torch.library.opcheck(getattr(backend.ops, op), (grad, x, 0.8))


def test_torch_compile_fullgraph(backend):
    def step(logits):
        return (
            logitkit.softmax(logits, 0.7),
            logitkit.log_softmax(logits),
            logitkit.logsumexp(logits),
            logitkit.entropy(logits, 1.5),
            logitkit.softmax_stats(logits),
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = backend.tensor(torch.randn(4, 300))
    for a, b in zip(compiled(x), step(x)):
        assert torch.equal(a, b)


def test_torch_compile_inductor_with_backward():
    def loss(logits):
        return (logitkit.entropy(logits, 1.2) + logitkit.logsumexp(logits)).sum() + logitkit.log_softmax(logits)[
            :, 0
        ].sum()

    compiled = torch.compile(loss, fullgraph=True)
    x1 = torch.randn(5, 129, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    compiled(x1).backward()
    loss(x2).backward()
    assert_close(x1.grad, x2.grad, 1e-5, 1.3e-6, "compiled grad")  # torch.testing.assert_close's fp32 defaults


def test_compile_reports_bad_input_at_trace_time():
    compiled = torch.compile(lambda x: logitkit.entropy(x, -1.0), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="temperature must be a finite number > 0"):
        compiled(torch.randn(2, 5))


def test_build_info():
    info = logitkit.build_info()
    for key in (
        "version",
        "torch_version",
        "cuda_compiled",
        "cuda_architectures",
        "emulation_available",
        "cpu_capability",
    ):
        assert key in info
    assert info["version"] == logitkit.__version__
    assert info["torch_version"] == torch.__version__
    if info["cuda_compiled"]:
        assert info["cuda_architectures"] == ["80-real", "90-real", "90-virtual"]


def test_torch_version_mismatch_is_a_clear_error(monkeypatch):
    from logitkit import _build_config, _loader

    monkeypatch.setattr(_build_config, "TORCH_VERSION", "0.0.1")
    with pytest.raises(ImportError, match=r"built against torch 0\.0\.1.*rebuild"):
        _loader._check_torch_version()


def ops_called(fn):
    """The logitkit op overloads fn() runs, as the profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("logitkit")}


@pytest.mark.skipif("emulated-cuda" not in available(), reason="emulated-CUDA module not built")
def test_use_backend_routes_the_public_functions():
    x = torch.randn(3, 50)
    assert ops_called(lambda: logitkit.entropy(x)) == {"logitkit::entropy"}
    with use_backend("emulated-cuda"):
        assert ops_called(lambda: logitkit.entropy(x)) == {"logitkit_emulated::entropy"}
        with use_backend("cpu"):
            assert ops_called(lambda: logitkit.softmax(x)) == {"logitkit::softmax"}
        called = ops_called(lambda: logitkit.cross_entropy(x.requires_grad_(), torch.tensor([1, 2, 3])).backward())
        assert called == {"logitkit_emulated::softmax_stats", "logitkit_emulated::logsumexp_backward"}
    assert ops_called(lambda: logitkit.top_h_mask(x, 0.5)) == {"logitkit::top_h_mask"}


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"), use_backend("gpu"):
        pass


def test_layout_builders_follow_the_enums():
    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    stats = _layout.stats_tensor(max=a, sum_exp=b, sum_shifted=c)
    for field, t in ((_layout.StatsField.MAX, a), (_layout.StatsField.SUM_EXP, b), (_layout.StatsField.SUM_SHIFTED, c)):
        assert torch.equal(_layout.column(stats, field), t)
    norm = _layout.normaliser_tensor(max=a, log_sum_exp=b)
    assert torch.equal(_layout.column(norm, _layout.NormaliserField.LOG_SUM_EXP), b)
    coef = _layout.coefficient_tensor(prob=a, entropy=b, target=c, smooth=d)
    for field, t in zip(_layout.LceCoefField, (a, b, c, d)):
        assert torch.equal(_layout.column(coef, field), t)
    assert (_layout.STATS_WIDTH, _layout.LCE_STATE_WIDTH, _layout.LCE_COEF_WIDTH) == (3, 5, 4)
