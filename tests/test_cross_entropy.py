"""logitkit.cross_entropy on given logits against F.cross_entropy in fp64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import logitkit

DTYPE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def reference(logits, target, class_weight, ignore_index, reduction, eps, z_loss, t):
    z = logits.double() / t
    w = class_weight.double() if class_weight is not None else None
    loss = F.cross_entropy(z, target, weight=w, ignore_index=ignore_index, reduction="none", label_smoothing=eps)
    valid = target != ignore_index
    loss = loss + z_loss * torch.logsumexp(z, -1) ** 2 * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    wy = (w[torch.where(valid, target, 0)] if w is not None else torch.ones_like(loss)) * valid
    return loss.sum() / wy.sum()


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
def test_matches_reference(cfg, dtype):
    g = torch.Generator().manual_seed(0)
    n, v = 37, 1001
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[::5] = -100
    cw = torch.rand(v, generator=g) + 0.5 if cfg.get("class_weight") else None
    kw = dict(reduction=cfg.get("reduction", "mean"), label_smoothing=cfg.get("label_smoothing", 0.0),
              z_loss=cfg.get("z_loss", 0.0), temperature=cfg.get("temperature", 1.0))
    x = logits.clone().requires_grad_(True)
    loss = logitkit.cross_entropy(x, target, class_weight=cw, **kw)
    xr = logits.double().requires_grad_(True)
    ref = reference(xr, target, cw, -100, kw["reduction"], kw["label_smoothing"], kw["z_loss"], kw["temperature"])
    atol, rtol = DTYPE_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), atol=atol, rtol=rtol)
    gout = torch.randn(loss.shape, generator=g, dtype=torch.float64) if loss.dim() else torch.tensor(1.7, dtype=torch.float64)
    loss.backward(gout.to(loss.dtype))
    ref.backward(gout)
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=atol * scale + 1e-7, rtol=rtol)


def test_leading_shape_and_all_ignored():
    logits = torch.randn(2, 3, 50, requires_grad=True)
    target = torch.full((2, 3), -100)
    loss = logitkit.cross_entropy(logits, target, reduction="sum")
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().sum().item() == 0.0
    mean = logitkit.cross_entropy(logits, target)
    assert torch.isnan(mean)  # 0 / 0, as F.cross_entropy
    assert logitkit.cross_entropy(logits, target, reduction="none").shape == (2, 3)


def test_bad_input():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"target\[2\] = 10 is outside \[0, 10\)"):
        logitkit.cross_entropy(logits, torch.tensor([1, 2, 10, 3]))
    with pytest.raises(TypeError, match="target must be torch.int64"):
        logitkit.cross_entropy(logits, torch.tensor([1, 2, 3, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="reduction"):
        logitkit.cross_entropy(logits, torch.tensor([1, 2, 3, 3]), reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        logitkit.cross_entropy(logits, torch.tensor([1, 2, 3, 3]), temperature=0.0)


def test_compile_with_ignored_rows():
    logits = torch.randn(6, 40)
    target = torch.tensor([1, -100, 3, -100, 5, 6])
    compiled = torch.compile(lambda x, t: logitkit.cross_entropy(x, t), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, target), F.cross_entropy(logits, target))
