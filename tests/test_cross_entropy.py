"""logitkit.cross_entropy on given logits, on every backend, against the fp64
reference of logitkit.testing (F.cross_entropy plus the z-loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import logitkit
from logitkit.testing import assert_close, assert_no_worse_than_torch, references, tolerances

DTYPE_TOL = tolerances.CROSS_ENTROPY

CONFIGS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(class_weight=True),
    dict(class_weight=True, label_smoothing=0.2, reduction="mean"),
    dict(z_loss=1e-2, temperature=0.7),
    dict(label_smoothing=0.05, z_loss=1e-3, reduction="none", temperature=1.3, class_weight=True),
]


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_reference(backend, cfg, dtype):
    g = torch.Generator().manual_seed(0)
    n, v = 37, 1001
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[::5] = -100
    cw = torch.rand(v, generator=g) + 0.5 if cfg.get("class_weight") else None
    kw = dict(
        reduction=cfg.get("reduction", "mean"),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        z_loss=cfg.get("z_loss", 0.0),
        temperature=cfg.get("temperature", 1.0),
    )
    x = backend.tensor(logits).requires_grad_(True)
    loss = logitkit.cross_entropy(
        x, backend.tensor(target), class_weight=None if cw is None else backend.tensor(cw), **kw
    )
    xr = logits.double().requires_grad_(True)
    ref = references.cross_entropy(xr, target, class_weight=cw, **kw)
    atol, rtol = DTYPE_TOL[dtype]
    assert loss.dtype == torch.float32  # out_dtype=None: float32 whatever the logits' dtype
    assert_close(loss, ref, atol, rtol, f"loss {cfg}")
    gout = (
        torch.randn(loss.shape, generator=g, dtype=torch.float64)
        if loss.dim()
        else torch.tensor(1.7, dtype=torch.float64)
    )
    loss.backward(backend.tensor(gout.to(loss.dtype)))
    ref.backward(gout)
    scale = xr.grad.abs().max().item()
    assert_close(x.grad, xr.grad, atol * scale + 1e-7, rtol, f"grad {cfg}")
    if dtype != torch.float32:  # no less accurate than F.cross_entropy in the same dtype
        xp = logits.clone().requires_grad_(True)
        plain = references.cross_entropy(xp, target, class_weight=cw, dtype=dtype, **kw)
        plain.backward(gout.to(plain.dtype))
        assert_no_worse_than_torch(loss, plain, ref, what=f"loss {cfg}")
        assert_no_worse_than_torch(x.grad, xp.grad, xr.grad, what=f"grad {cfg}")


def test_leading_shape_and_all_ignored(backend):
    logits = backend.tensor(torch.randn(2, 3, 50)).requires_grad_(True)
    target = backend.tensor(torch.full((2, 3), -100))
    loss = logitkit.cross_entropy(logits, target, reduction="sum")
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().sum().item() == 0.0
    mean = logitkit.cross_entropy(logits, target)
    assert torch.isnan(mean)  # 0 / 0, as F.cross_entropy
    assert logitkit.cross_entropy(logits, target, reduction="none").shape == (2, 3)


def test_bad_input(backend):
    logits = backend.tensor(torch.randn(4, 10))
    if backend.device == "cpu":  # on CUDA targets are not checked on the host (no synchronisation)
        with pytest.raises(ValueError, match=r"target\[2\] = 10 is outside \[0, 10\)"):
            logitkit.cross_entropy(logits, backend.tensor(torch.tensor([1, 2, 10, 3])))
    with pytest.raises(TypeError, match=r"target must be torch\.int64"):
        logitkit.cross_entropy(logits, backend.tensor(torch.tensor([1, 2, 3, 3], dtype=torch.int32)))
    with pytest.raises(ValueError, match="reduction"):
        logitkit.cross_entropy(logits, backend.tensor(torch.tensor([1, 2, 3, 3])), reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        logitkit.cross_entropy(logits, backend.tensor(torch.tensor([1, 2, 3, 3])), temperature=0.0)


def test_compile_with_ignored_rows(backend):
    logits = torch.randn(6, 40)
    target = torch.tensor([1, -100, 3, -100, 5, 6])
    compiled = torch.compile(lambda x, t: logitkit.cross_entropy(x, t), fullgraph=True, backend="aot_eager")
    # (torch.testing.assert_close's float32 defaults: atol 1e-5, rtol 1.3e-6)
    assert_close(
        compiled(backend.tensor(logits), backend.tensor(target)),
        F.cross_entropy(logits, target),
        1e-5,
        1.3e-6,
        "compiled",
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_out_dtype(backend, dtype):
    """float32 loss by default; out_dtype rounds the float32 loss once; a non-float dtype is rejected."""
    g = torch.Generator().manual_seed(3)
    logits = backend.tensor((torch.randn(9, 50, generator=g) * 4).to(dtype))
    target = backend.tensor(torch.randint(0, 50, (9,), generator=g))
    for reduction in ("none", "mean", "sum"):
        loss = logitkit.cross_entropy(logits, target, reduction=reduction)
        assert loss.dtype == torch.float32
        rounded = logitkit.cross_entropy(logits, target, reduction=reduction, out_dtype=dtype)
        assert rounded.dtype == dtype and torch.equal(rounded, loss.to(dtype))
    with pytest.raises(TypeError, match="out_dtype"):
        logitkit.cross_entropy(logits, target, out_dtype=torch.int64)


def test_large_magnitudes_and_inf(backend):
    """lse - z_y as (m - z_y) + log s: all logits 1e8 give log V (not 8.0), logits ~6e4 keep fp32
    accuracy; a +inf logit gives NaN, as F.cross_entropy."""
    v = 300
    flat = backend.tensor(torch.full((2, v), 1e8))
    target = backend.tensor(torch.tensor([0, 7]))
    got = logitkit.cross_entropy(flat, target, reduction="none")
    assert_close(got, torch.full((2,), torch.tensor(float(v)).log().item(), dtype=torch.float64), 1e-6, 1e-6, "1e8")
    g = torch.Generator().manual_seed(1)
    big = 6e4 + torch.randn(3, v, generator=g)
    t = torch.randint(0, v, (3,), generator=g)
    ref = references.cross_entropy(big.double(), t, reduction="none")
    assert_close(
        logitkit.cross_entropy(backend.tensor(big), backend.tensor(t), reduction="none"), ref, 1e-5, 1e-5, "6e4"
    )
    with_inf = torch.randn(2, v, generator=g)
    with_inf[0, 3] = float("inf")
    out = logitkit.cross_entropy(backend.tensor(with_inf), backend.tensor(torch.tensor([1, 2])), reduction="none")
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
