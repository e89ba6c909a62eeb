"""DTensor inputs: Shard(-1) logits and Shard(0) weights on a CPU gloo device
mesh, compared with torch's own loss parallelism
(``torch.distributed.tensor.parallel.loss_parallel()`` + ``F.cross_entropy``
on the same DTensor logits) and with the single-device ops. One spawn of 3
gloo processes; V = 1000 makes DTensor's shards uneven (334 + 333 + 333).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import logitkit
import logitkit.distributed as ldist
from logitkit.distributed._harness import run_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    HAVE_DTENSOR = True
except ImportError:  # pragma: no cover
    HAVE_DTENSOR = False

V, D, N = 1000, 24, 10

CE_CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "ignore_index": {"ignore_index": 5, "n_ignored": 3},
    "class_weight": {"class_weight": True},
}


def _close(a, b, what: str, tol: float = 1e-5) -> str | None:
    a = a.full_tensor() if isinstance(a, DTensor) else a
    b = b.full_tensor() if isinstance(b, DTensor) else b
    try:
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, equal_nan=True)
    except AssertionError as exc:
        return f"{what}: {exc}"
    return None


def _ce_case(mesh, opts: dict) -> str | None:
    opts = dict(opts)
    n_ignored = opts.pop("n_ignored", 0)
    gen = torch.Generator().manual_seed(8)
    logits = 3 * torch.randn(N, V, generator=gen)
    target = torch.randint(0, V, (N,), generator=gen)
    if n_ignored:
        target[:n_ignored] = opts["ignore_index"]
    if opts.pop("class_weight", False):
        opts["weight"] = torch.rand(V, generator=gen) + 0.5
    ref = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    with loss_parallel():
        ref_loss = F.cross_entropy(ref, target, **opts)
        ref_loss.backward(torch.ones_like(ref_loss))
    ours = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    cw = opts.pop("weight", None)
    loss = ldist.cross_entropy(ours, target, class_weight=cw, **opts)
    if not isinstance(loss, DTensor):
        return f"loss is a {type(loss).__name__}, not a DTensor"
    loss.backward(torch.ones_like(loss))
    return _close(loss, ref_loss, "loss") or _close(ours.grad, ref.grad, "grad")


def _row_ops_case(mesh) -> str | None:
    gen = torch.Generator().manual_seed(9)
    logits = 2 * torch.randn(N, V, generator=gen)
    for name in ("logsumexp", "entropy", "log_softmax", "softmax"):
        x = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
        x_ref = logits.clone().requires_grad_()
        out = getattr(ldist, name)(x, 0.8)
        ref = getattr(logitkit, name)(x_ref, 0.8)
        up = torch.randn(ref.shape, generator=gen)
        ref.backward(up)
        placements = [Replicate()] if out.dim() == 1 else [Shard(-1)]
        out.backward(distribute_tensor(up, mesh, placements))
        msg = _close(out, ref, f"{name} forward") or _close(x.grad, x_ref.grad, f"{name} grad")
        if msg:
            return msg
    return None


def _top_h_case(mesh) -> str | None:
    gen = torch.Generator().manual_seed(10)
    logits = 2 * torch.randn(N, V, generator=gen)
    x = distribute_tensor(logits, mesh, [Shard(-1)])
    for rule in ("hf", "official", "exact"):
        mask = ldist.top_h_mask(x, 0.5, rule=rule)
        if not torch.equal(mask.full_tensor(), logitkit.top_h_mask(logits, 0.5, rule=rule)):
            return f"top_h_mask {rule} differs"
        tok = ldist.sample(x, top_h=0.5, rule=rule, generator=torch.Generator().manual_seed(1))
        ref = logitkit.sample(logits, top_h=0.5, rule=rule, generator=torch.Generator().manual_seed(1))
        if not torch.equal(tok.full_tensor(), ref):
            return f"sample {rule} differs"
    return None


def _linear_case(mesh, hidden_kind: str) -> str | None:
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / D**0.5
    target = torch.randint(0, V, (N,), generator=gen)
    # torch's way: colwise-parallel logits (Replicate x Shard(0) -> Shard(-1)) + loss_parallel.
    h_ref = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_()
    w_ref = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    with loss_parallel():
        ref_loss = F.cross_entropy(F.linear(h_ref, w_ref), target, label_smoothing=0.0)
        ref_loss.backward()
    # Ours: the DTensor weight as it is; hidden as a replicated DTensor or a plain tensor.
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    if hidden_kind == "plain":
        h = hidden.clone().requires_grad_()
    else:
        h = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_()
    # "dtensor_partial": the input gradient is left Partial for DTensor to reduce.
    loss = ldist.linear_cross_entropy(h, w, target, reduce_grad_hidden=hidden_kind != "dtensor_partial")
    loss.backward()
    return (
        _close(loss, ref_loss, "loss")
        or _close(w.grad, w_ref.grad, "grad_weight", 2e-5)
        or _close(h.grad, h_ref.grad, "grad_hidden", 2e-5)
    )


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, str | None] = {}
    for name, opts in CE_CASES.items():
        out[f"ce_{name}"] = _ce_case(mesh, opts)
    out["row_ops"] = _row_ops_case(mesh)
    out["top_h"] = _top_h_case(mesh)
    out["linear_plain_hidden"] = _linear_case(mesh, "plain")
    out["linear_dtensor_hidden"] = _linear_case(mesh, "dtensor")
    out["linear_dtensor_hidden_partial_grad"] = _linear_case(mesh, "dtensor_partial")
    return out


NAMES = [f"ce_{n}" for n in CE_CASES] + [
    "row_ops",
    "top_h",
    "linear_plain_hidden",
    "linear_dtensor_hidden",
    "linear_dtensor_hidden_partial_grad",
]


@pytest.fixture(scope="module")
def results() -> list[dict]:
    if not HAVE_DTENSOR:
        pytest.skip("DTensor is not available")
    return run_group(3, _worker, timeout=300)


@pytest.mark.parametrize("name", NAMES)
def test_dtensor(results, name):
    for r in range(3):
        assert results[r][name] is None, f"rank {r}: {results[r][name]}"
