"""Loss options users bring from other projects (issue 13 part 6) and the loss conventions of
issue 14, on ``cross_entropy`` (logits) and ``linear_cross_entropy`` alike, on every backend,
against the fp64 references of logitkit.testing: softcap, a differentiable lse, shift=True,
return_z_loss, token accuracy, probability targets, the z-loss's "mean" divisor, float64 and
gradcheck, complex gradients, ignored targets in linear_log_probs_and_entropy, D = 0 / V = 0."""

from __future__ import annotations

import pytest
import torch

import logitkit
from logitkit.testing import assert_close, references

F64 = torch.float64


def _data(n=23, v=301, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5 * 3
    target = torch.randint(0, v, (n,), generator=g)
    target[::4] = -100
    return hidden, weight, target, g


def _loss_fn(kind, backend, hidden, weight, **kw):
    """The loss under test on the backend's tensors: on logits (the materialised logits given to
    cross_entropy) or linear (hidden, weight). Returns (inputs needing grad, output)."""
    h = backend.tensor(hidden).requires_grad_(True)
    w = backend.tensor(weight).requires_grad_(True)
    if kind == "logits":
        x = (h.detach() @ w.detach().T).requires_grad_(True)
        return (x,), lambda target, **more: logitkit.cross_entropy(x, backend.tensor(target), **kw, **more)
    return (h, w), lambda target, **more: logitkit.linear_cross_entropy(h, w, backend.tensor(target), **kw, **more)


def _ref_inputs(kind, hidden, weight):
    h, w = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    if kind == "logits":
        x = (h.detach() @ w.detach().T).requires_grad_(True)
        return (x,), lambda target, **kw: references.cross_entropy(x, target, **kw)
    return (h, w), lambda target, **kw: references.linear_cross_entropy(h, w, target, **kw)


KINDS = ["logits", "linear"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap(backend, kind, reduction):
    hidden, weight, target, g = _data()
    ours_in, ours = _loss_fn(kind, backend, hidden * 4, weight, softcap=5.0, temperature=0.8, reduction=reduction)
    ref_in, ref = _ref_inputs(kind, hidden * 4, weight)
    loss, expected = ours(target), ref(target, softcap=5.0, temperature=0.8, reduction=reduction)
    assert_close(loss, expected, 2e-5, 2e-5, "softcap loss")
    gout = torch.rand(expected.shape, generator=g, dtype=F64)
    loss.backward(backend.tensor(gout.float()))
    expected.backward(gout)
    for a, b in zip(ours_in, ref_in):
        assert_close(a.grad, b.grad, 2e-5 * b.grad.abs().max().item() + 1e-7, 2e-4, "softcap grad")


def test_softcap_log_probs_and_entropy(backend):
    hidden, weight, target, _ = _data()
    target[::4] = -100
    h, w = backend.tensor(hidden * 4).requires_grad_(True), backend.tensor(weight).requires_grad_(True)
    log_prob, entropy = logitkit.linear_log_probs_and_entropy(h, w, backend.tensor(target), softcap=3.0)
    hr, wr = (hidden * 4).double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_lp, ref_h = references.linear_log_probs_and_entropy(hr, wr, target, softcap=3.0, ignore_index=-100)
    assert_close(log_prob, ref_lp, 2e-5, 2e-5, "log_prob")
    assert_close(entropy, ref_h, 2e-5, 2e-5, "entropy")
    assert bool((log_prob[::4] == 0).all())  # ignored tokens: 0, not NaN
    (log_prob.sum() + 0.3 * entropy.sum()).backward()
    (ref_lp.sum() + 0.3 * ref_h.sum()).backward()
    assert_close(h.grad, hr.grad, 1e-5 * hr.grad.abs().max().item() + 1e-7, 2e-4, "grad hidden")
    assert_close(w.grad, wr.grad, 1e-5 * wr.grad.abs().max().item() + 1e-7, 2e-4, "grad weight")


@pytest.mark.parametrize("kind", KINDS)
def test_differentiable_lse(backend, kind):
    """A user's own z-loss on the returned lse trains: grad = grad(loss) + g_lse * p."""
    hidden, weight, target, _ = _data()
    ours_in, ours = _loss_fn(kind, backend, hidden, weight, return_lse=True)
    loss, lse = ours(target)
    (loss + 1e-2 * (lse.double() ** 2).mean()).backward()
    ref_in, ref = _ref_inputs(kind, hidden, weight)
    z = ref_in[0] if kind == "logits" else ref_in[0] @ ref_in[1].T
    ref_lse = torch.logsumexp(z, -1)
    assert_close(lse, ref_lse, 2e-6, 2e-6, "lse")
    (ref(target) + 1e-2 * (ref_lse**2).mean()).backward()
    for a, b in zip(ours_in, ref_in):
        assert_close(a.grad, b.grad, 1e-5 * b.grad.abs().max().item() + 1e-7, 2e-4, "grad with lse term")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift(backend, kind, reduction):
    """shift=True on (B, T, ...) equals the loss of position t against target t + 1."""
    g = torch.Generator().manual_seed(5)
    b, t, d, v = 3, 9, 8, 50
    hidden, weight = torch.randn(b, t, d, generator=g), torch.randn(v, d, generator=g)
    target = torch.randint(0, v, (b, t), generator=g)
    target[0, 4] = -100
    h, w = backend.tensor(hidden).requires_grad_(True), backend.tensor(weight).requires_grad_(True)
    if kind == "logits":
        x = (h.detach() @ w.detach().T).requires_grad_(True)
        out = logitkit.cross_entropy(
            x, backend.tensor(target), shift=True, reduction=reduction, return_lse=True, z_loss=1e-3
        )
        ours_in = (x,)
    else:
        out = logitkit.linear_cross_entropy(
            h, w, backend.tensor(target), shift=True, reduction=reduction, return_lse=True, z_loss=1e-3
        )
        ours_in = (h, w)
    loss, lse = out
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    xr = (hr.detach() @ wr.detach().T).requires_grad_(True)
    logits_r = xr if kind == "logits" else hr @ wr.T
    expected = references.cross_entropy(logits_r[:, :-1], target[:, 1:], reduction=reduction, z_loss=1e-3)
    assert lse.shape == (b, t - 1) and (reduction != "none" or loss.shape == (b, t - 1))
    assert_close(loss, expected, 2e-6, 2e-6, "shifted loss")
    assert_close(lse, torch.logsumexp(logits_r[:, :-1], -1), 2e-6, 2e-6, "shifted lse")
    gout = torch.rand(expected.shape, generator=g, dtype=F64)
    loss.backward(backend.tensor(gout.float()))
    expected.backward(gout)
    ref_in = (xr,) if kind == "logits" else (hr, wr)
    for a, r in zip(ours_in, ref_in):
        assert_close(a.grad, r.grad, 1e-5 * r.grad.abs().max().item() + 1e-7, 2e-4, "shifted grad")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_and_token_accuracy(backend, kind, reduction):
    """return_z_loss / return_token_accuracy (Liger's names): a CrossEntropyOutput; loss includes
    the z-loss; with class weights "mean" divides the z-loss by the number of non-ignored tokens."""
    hidden, weight, target, g = _data()
    target[1] = (hidden[1] @ weight.T).argmax()  # at least one hit
    cw = torch.rand(weight.shape[0], generator=g) + 0.5
    kw = dict(reduction=reduction, z_loss=1e-2)
    _, ours = _loss_fn(kind, backend, hidden, weight, class_weight=backend.tensor(cw), **kw)
    out = ours(target, return_z_loss=True, return_token_accuracy=True)
    assert isinstance(out, logitkit.CrossEntropyOutput) and out.lse is None
    logits = hidden.double() @ weight.double().T
    expected = references.cross_entropy(logits, target, class_weight=cw, **kw)
    assert_close(out.loss, expected, 2e-6, 2e-6, "loss with z-loss")
    valid = target != -100
    z = torch.where(valid, 1e-2 * torch.logsumexp(logits, -1) ** 2, 0.0)
    expected_z = {"none": z, "sum": z.sum(), "mean": z.sum() / valid.sum()}[reduction]
    assert_close(out.z_loss, expected_z, 2e-6, 2e-6, "z_loss")
    hit = ((logits.argmax(-1) == target) & valid).float()
    expected_acc = {"none": hit, "sum": hit.sum(), "mean": hit.sum() / valid.sum()}[reduction]
    assert torch.equal(out.token_accuracy.cpu().double(), expected_acc)
    assert not out.z_loss.requires_grad and not out.token_accuracy.requires_grad


def test_token_accuracy_ties(backend):
    """Ties at the maximum: cross_entropy takes torch.argmax's lowest index; linear_cross_entropy
    counts the target as correct when it attains the maximum (documented)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 3.0, 0.0, 0.0]])
    target = torch.tensor([2, 0])
    acc = logitkit.cross_entropy(
        backend.tensor(logits), backend.tensor(target), reduction="none", return_token_accuracy=True
    )
    assert acc.token_accuracy.tolist() == [0.0, 1.0]
    eye = torch.eye(4)
    linear = logitkit.linear_cross_entropy(
        backend.tensor(logits),
        backend.tensor(eye),
        backend.tensor(target),
        reduction="none",
        return_token_accuracy=True,
    )
    assert linear.token_accuracy.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "cfg",
    [dict(), dict(reduction="sum", label_smoothing=0.1), dict(class_weight=True, reduction="none", z_loss=1e-2)],
    ids=str,
)
def test_probability_targets(backend, dtype, cfg):
    """Soft targets as F.cross_entropy takes them, gradients into the logits and the targets."""
    g = torch.Generator().manual_seed(2)
    n, v = 17, 203
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    q = torch.softmax(torch.randn(n, v, generator=g) * 2, -1)
    q[3] = 0.0
    q[3, 7] = 1.0
    cw = torch.rand(v, generator=g) + 0.5 if cfg.get("class_weight") else None
    kw = {k: val for k, val in cfg.items() if k != "class_weight"}
    x, qt = backend.tensor(logits).requires_grad_(True), backend.tensor(q).requires_grad_(True)
    loss = logitkit.cross_entropy(x, qt, class_weight=None if cw is None else backend.tensor(cw), **kw)
    xr, qr = logits.double().requires_grad_(True), q.double().requires_grad_(True)
    expected = references.cross_entropy(xr, qr, class_weight=cw, **kw)
    tol = 2e-6 if dtype == torch.float32 else 1e-5
    assert_close(loss, expected, tol, tol, "soft-target loss")
    gout = torch.rand(expected.shape, generator=g, dtype=F64)
    loss.backward(backend.tensor(gout.float()))
    expected.backward(gout)
    grad_tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert_close(x.grad, xr.grad, grad_tol * xr.grad.abs().max().item(), grad_tol, "grad logits")
    assert_close(qt.grad, qr.grad, 1e-5 * qr.grad.abs().max().item(), 1e-5, "grad target")


def test_bf16_backward_correctly_rounded(backend):
    """p_y - 1 formed in fp32 and the per-row scale applied in fp32, rounded once (issue 14)."""
    x = torch.zeros(1, 4096)
    x[0, 0] = 13
    xb = backend.tensor(x.bfloat16()).requires_grad_(True)
    logitkit.cross_entropy(xb, backend.tensor(torch.tensor([0]))).backward()
    exact = torch.softmax(x.double(), -1)[0, 0] - 1  # -0.00915...
    assert xb.grad[0, 0].item() == exact.to(torch.bfloat16).item() == pytest.approx(-0.0091553, abs=1e-7)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(16, 1000, generator=g) * 4).bfloat16()
    target = torch.randint(0, 1000, (16,), generator=g)
    xb = backend.tensor(logits).requires_grad_(True)
    logitkit.cross_entropy(xb, backend.tensor(target), reduction="sum", label_smoothing=0.1).backward()
    xr = logits.double().requires_grad_(True)
    references.cross_entropy(xr, target, reduction="sum", label_smoothing=0.1).backward()
    correctly_rounded = (xb.grad.cpu() == xr.grad.bfloat16()).double().mean().item()
    assert correctly_rounded > 0.99, correctly_rounded


def test_gradcheck_float64():
    """float64 on CPU: torch.autograd.gradcheck on every loss (gradgradcheck does not apply: the
    backwards are kernels, not differentiable graphs)."""
    g = torch.Generator().manual_seed(6)
    n, d, v = 5, 4, 7
    hidden = torch.randn(n, d, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=F64, requires_grad=True)
    logits = torch.randn(n, v, generator=g, dtype=F64, requires_grad=True)
    target = torch.tensor([1, -100, 6, 0, 3])
    cw = torch.rand(v, generator=g, dtype=F64) + 0.5
    opts = dict(label_smoothing=0.1, z_loss=1e-2, temperature=0.9, class_weight=cw)
    assert logitkit.cross_entropy(logits, target).dtype == F64
    torch.autograd.gradcheck(lambda x: logitkit.cross_entropy(x, target, softcap=2.0, **opts), (logits,))
    torch.autograd.gradcheck(lambda x: logitkit.cross_entropy(x, target, return_lse=True), (logits,))
    q = torch.softmax(torch.randn(n, v, generator=g, dtype=F64), -1).requires_grad_(True)
    torch.autograd.gradcheck(lambda x, p: logitkit.cross_entropy(x, p, reduction="none", **opts), (logits, q))
    torch.autograd.gradcheck(
        lambda h, w, b: logitkit.linear_cross_entropy(h, w, target, bias=b, softcap=3.0, **opts), (hidden, weight, bias)
    )
    torch.autograd.gradcheck(
        lambda h, w: logitkit.linear_log_probs_and_entropy(h, w, target, temperature=0.7), (hidden, weight)
    )


def test_complex_grad_rejected(backend):
    hidden, weight, target, _ = _data()
    logits = backend.tensor(hidden @ weight.T).requires_grad_(True)
    h, w = backend.tensor(hidden).requires_grad_(True), backend.tensor(weight).requires_grad_(True)
    t = backend.tensor(target)
    for loss in (
        logitkit.cross_entropy(logits, t, reduction="none"),
        logitkit.linear_cross_entropy(h, w, t, reduction="none"),
        logitkit.linear_log_probs_and_entropy(h, w, torch.where(t < 0, 0, t))[0],
    ):
        with pytest.raises((TypeError, RuntimeError), match=r"complex|real"):
            loss.backward(torch.ones(loss.shape, dtype=torch.complex64, device=loss.device))


def test_empty_dimensions_named(backend):
    t = backend.tensor(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="hidden must have a hidden size D >= 1"):
        logitkit.linear_cross_entropy(backend.tensor(torch.zeros(3, 0)), backend.tensor(torch.zeros(5, 0)), t)
    with pytest.raises(ValueError, match=r"weight must have at least one row \(V >= 1\)"):
        logitkit.linear_cross_entropy(backend.tensor(torch.zeros(3, 4)), backend.tensor(torch.zeros(0, 4)), t)
    with pytest.raises(ValueError, match="hidden must have a hidden size D >= 1"):
        logitkit.linear_log_probs_and_entropy(backend.tensor(torch.zeros(3, 0)), backend.tensor(torch.zeros(5, 0)), t)
    with pytest.raises(ValueError, match=r"logits must have at least one class \(V >= 1\)"):
        logitkit.cross_entropy(backend.tensor(torch.zeros(3, 0)), t)


def test_probability_target_errors(backend):
    x = backend.tensor(torch.randn(4, 10))
    with pytest.raises(ValueError, match="probability targets must have the logits' shape"):
        logitkit.cross_entropy(x, backend.tensor(torch.rand(4, 9)))
    with pytest.raises(ValueError, match="class-index targets"):
        logitkit.cross_entropy(x, backend.tensor(torch.rand(4, 10)), return_token_accuracy=True)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(reduction="sum", label_smoothing=0.1, class_weight=True),
        dict(z_loss=1e-2, softcap=4.0, temperature=0.9, bias=True),
    ],
    ids=str,
)
def test_grad_in_forward(backend, cfg):
    """grad_in_forward=True (gradient formed in the forward pass): the same loss and gradients as the
    fp64 reference, several token blocks (small chunk_budget), masked logits included."""
    hidden, weight, target, g = _data(n=37, v=203)
    cw = torch.rand(203, generator=g) + 0.5 if cfg.get("class_weight") else None
    bias = torch.randn(203, generator=g) if cfg.get("bias") else None
    if bias is not None:
        bias[5] = float("-inf")  # a masked vocabulary entry
    kw = {k: v for k, v in cfg.items() if k not in ("class_weight", "bias")}
    h, w = backend.tensor(hidden).requires_grad_(True), backend.tensor(weight).requires_grad_(True)
    b = None if bias is None else backend.tensor(bias).requires_grad_(True)
    loss = logitkit.linear_cross_entropy(
        h,
        w,
        backend.tensor(target),
        bias=b,
        class_weight=None if cw is None else backend.tensor(cw),
        grad_in_forward=True,
        chunk_budget=4 * 203 * 8,
        **kw,
    )
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    br = None if bias is None else bias.double().requires_grad_(True)
    expected = references.linear_cross_entropy(hr, wr, target, bias=br, class_weight=cw, **kw)
    assert_close(loss, expected, 2e-6, 2e-6, "loss")
    loss.backward(backend.tensor(torch.tensor(1.7)))
    expected.backward(torch.tensor(1.7, dtype=F64))
    for a, r in [(h, hr), (w, wr)] + ([] if b is None else [(b, br)]):
        finite = torch.isfinite(r.grad)
        assert_close(a.grad[finite], r.grad[finite], 1e-5 * r.grad[finite].abs().max().item(), 2e-4, "grad")


@pytest.mark.parametrize(
    "dtype,route",
    [(torch.float32, "auto"), (torch.bfloat16, "native"), (torch.bfloat16, "fp32")],
    ids=["fp32", "bf16-native", "bf16-fp32_upcast"],
)
def test_linear_ce_thread_count_invariant(monkeypatch, dtype, route):
    """Linear CE with 1 and 2 threads (CPU): the loss is bitwise the same on every route. So are
    the gradients where logitkit owns the GEMMs (bf16 on the native route: logitkit's bf16 GEMM
    splits only rows and columns over threads). Where the GEMMs are torch's (fp32, fp32 upcasts),
    its BLAS may split K over threads for some shapes (MKL on an Intel Xeon does here: grad_hidden
    differs by ~7e-7 relative): the gradients are then only checked to be close
    (docs/determinism.md)."""
    if route == "native" and not logitkit._loader._C.cpu_bf16_gemm_units():
        pytest.skip("no bf16 units: the native bf16 route is ATen's reference GEMM")
    monkeypatch.setenv("LOGITKIT_CPU_GEMM", route)
    hidden, weight, target, _ = _data(n=200, v=3001, d=64)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for fused in (False, True):
                h = hidden.to(dtype).clone().requires_grad_(True)
                w = weight.to(dtype).clone().requires_grad_(True)
                loss = logitkit.linear_cross_entropy(h, w, target, label_smoothing=0.1, grad_in_forward=fused)
                loss.backward()
                results.append((threads, fused, loss.detach(), h.grad, w.grad))
    finally:
        torch.set_num_threads(before)
    for threads, fused, loss, *grads in results[2:]:
        _, _, first_loss, *first_grads = results[int(fused)]
        assert torch.equal(loss, first_loss), (threads, fused)
        for grad, first in zip(grads, first_grads):
            if dtype == torch.bfloat16 and route == "native":
                assert torch.equal(grad, first), (threads, fused)
            else:  # fp32: a few ulps of the sum; bf16 results: one rounding step of the output
                tol = 1e-5 if dtype == torch.float32 else 2.0**-7
                torch.testing.assert_close(grad, first, rtol=tol, atol=tol * first.abs().max().item())


def test_no_silent_second_derivative():
    """The backwards are kernels (once differentiable): a second derivative raises instead of
    returning a partial, wrong one."""
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(logitkit.cross_entropy(x, torch.tensor([1, 2, 3])), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        g.sum().backward()
