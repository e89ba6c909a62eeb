"""Reference implementations of everything logitkit computes: the definitions
written the plain way (materialised logits, sorted rows), evaluated in
float64 by default on the (already rounded) inputs logitkit got, so that a
difference is the error of logitkit itself.

``dtype`` evaluates a definition in another floating dtype instead: the
plain-PyTorch computation in the inputs' own precision, whose error is the
yardstick of :func:`logitkit.testing.assert_no_worse_than_torch`.

The Top-H rules follow docs/top_h.md literally: sort (stable: among equal
logits the lower index first) and scan.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._layout import stats_tensor

F64 = torch.float64

# ---------------------------------------------------------------------------
# Row ops over the last dimension, z = x / temperature
# ---------------------------------------------------------------------------


def softmax(x: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.softmax(x.to(dtype) / temperature, dim=-1)


def log_softmax(x: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.log_softmax(x.to(dtype) / temperature, dim=-1)


def logsumexp(x: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.logsumexp(x.to(dtype) / temperature, dim=-1)


def entropy(x: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Entropy in nats of softmax(z): -sum p log p."""
    logp = log_softmax(x, temperature, dtype)
    p = logp.exp()
    # p log p -> 0 as p -> 0; masking log p first keeps the gradient NaN-free.
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def softmax_stats(x: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    """The softmax state [m, s, b] = [max z, sum exp(z - m), sum (z - m) exp(z - m)] per row."""
    z = x.to(dtype) / temperature
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    d = torch.where(e > 0, (z - m) * e, torch.zeros_like(e))
    return stats_tensor(max=m.squeeze(-1), sum_exp=e.sum(-1), sum_shifted=d.sum(-1))


#: The row ops by name: ``ROW_OPS[name](x, temperature)``.
ROW_OPS = {"softmax": softmax, "log_softmax": log_softmax, "logsumexp": logsumexp, "entropy": entropy}

# ---------------------------------------------------------------------------
# Top-H truncation (docs/top_h.md)
# ---------------------------------------------------------------------------

#: The capped rules' default cap (``cap=-1``).
TOP_H_DEFAULT_CAP = 100


def entropy_terms(p: torch.Tensor) -> torch.Tensor:
    """-p log p element-wise, with 0 at p = 0."""
    return torch.where(p > 0, -p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))


class TopHKeepSet(NamedTuple):
    """A Top-H rule applied to rows (..., V): the kept tokens are a prefix of ``order``.

    ``order`` (..., K): vocabulary indices by rank (K = min(cap, V) for the capped rules, V for
    "exact"); ``criterion`` c_k and ``tau`` (..., 1): token k of the order passes when
    c_k <= tau, it has a nonzero probability in float32 (``positive``), and so do all tokens
    before it (token 0 always passes); ``kept`` (...): the prefix length; ``mask`` (..., V): the
    kept set, all False on rows holding NaN or +inf (no defined distribution).
    """

    order: torch.Tensor
    criterion: torch.Tensor
    tau: torch.Tensor
    positive: torch.Tensor
    kept: torch.Tensor
    mask: torch.Tensor


def _top_h_criterion(
    x: torch.Tensor, z: torch.Tensor, alpha: float, temperature: float, rule: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, c, tau) of the sorted scaled logits ``z`` of rows ``x``."""
    if rule == "exact":
        p = torch.softmax(z, -1)
        h = entropy_terms(p)
        mass = torch.cumsum(p, -1)
        crit = torch.cumsum(h, -1) / mass + torch.log(mass)  # H of the renormalised prefix: sum h / M + log M
        tau = torch.full_like(mass[..., :1], math.inf) if alpha >= 1 else alpha * h.sum(-1, keepdim=True)
        return p, crit, tau
    if rule == "hf":
        p = torch.softmax(z, -1)  # renormalised over the K tokens
    else:  # "official": probabilities over the whole vocabulary
        p = torch.exp(z - torch.logsumexp(x / temperature, -1, keepdim=True))
    h = entropy_terms(p)
    return p, torch.cumsum(h, -1), alpha * h.sum(-1, keepdim=True)


def top_h(
    x: torch.Tensor, alpha: float, temperature: float = 1.0, rule: str = "hf", cap: int = -1, dtype: torch.dtype = F64
) -> TopHKeepSet:
    """Rule ``rule`` ("hf", "official" or "exact") of Top-H with ``alpha`` on rows ``x`` (..., V)."""
    x = x.to(dtype)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    z = torch.gather(x, -1, order) / temperature
    if rule != "exact":
        k = min(TOP_H_DEFAULT_CAP if cap == -1 else cap, x.shape[-1])
        order, z = order[..., :k], z[..., :k]
    p, crit, tau = _top_h_criterion(x, z, alpha, temperature, rule)
    positive = p.float() > 0
    ok = (crit <= tau) & positive
    ok[..., 0] = True
    prefix = torch.cumprod(ok.to(torch.int64), -1).bool()
    undefined = (x.isnan() | (x == math.inf)).any(-1, keepdim=True)
    prefix = prefix & ~undefined
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter(-1, order, prefix)
    return TopHKeepSet(order, crit, tau, positive, prefix.sum(-1), mask)


def top_h_mask(
    x: torch.Tensor, alpha: float, temperature: float = 1.0, rule: str = "hf", cap: int = -1, dtype: torch.dtype = F64
) -> torch.Tensor:
    """The keep mask (..., V) of :func:`top_h`."""
    return top_h(x, alpha, temperature, rule, cap, dtype).mask


# ---------------------------------------------------------------------------
# The row-statistics rules of the sampler family (docs/sampling.md)
# ---------------------------------------------------------------------------


def _per_row(value, batch: torch.Size, off: float) -> torch.Tensor:
    """A parameter (number, None or per-row tensor) as a float64 tensor of shape (*batch, 1)."""
    if value is None or value is False:
        value = off
    t = value.double().cpu() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=F64)
    return t.expand(batch).unsqueeze(-1)


def edt_temperature(x: torch.Tensor, temperature=1.0, theta=0.0, base=0.8) -> torch.Tensor:
    """EDT (Zhang et al. 2024): T = T0 * N^(theta / H), H the entropy of softmax(x) (float64)."""
    batch = x.shape[:-1]
    h = entropy(x.detach().cpu())
    h = torch.where(h > 0, h, 0.0)  # also -0.0 -> +0.0: theta / H = +inf
    theta_v, base_v = _per_row(theta, batch, 0.0).squeeze(-1), _per_row(base, batch, 0.8).squeeze(-1)
    exponent = torch.where(theta_v == 0, 0.0, theta_v / h)
    return _per_row(temperature, batch, 1.0).squeeze(-1) * base_v**exponent


def _typical_keep(
    candidates: torch.Tensor, z: torch.Tensor, typical_p: torch.Tensor, keep_count: int, greedy: torch.Tensor
) -> torch.Tensor:
    """Locally typical sampling over the candidates (bool, float64 z of the same shape) renormalised:
    the distance |-log q - H(q)| equals |z - E_q[z]|; keep by increasing distance up to the first
    token where the running mass reaches typical_p and the count keep_count (ties kept)."""
    usable = candidates & (z > -math.inf)
    q = torch.softmax(z.masked_fill(~usable, -math.inf), dim=-1)
    center = torch.where(usable, q * z, 0.0).sum(-1, keepdim=True)
    distance = torch.where(usable & (q > 0), (z - center).abs(), math.inf)
    ranked = torch.sort(distance, dim=-1, stable=True)
    mass = torch.cumsum(q.gather(-1, ranked.indices), dim=-1)
    last = (usable & (q > 0)).sum(-1, keepdim=True).clamp(min=1) - 1
    crossing = (mass < typical_p).sum(-1, keepdim=True).clamp(max=last)
    kth = torch.full_like(crossing, keep_count - 1).clamp(max=last)
    radius = torch.maximum(ranked.values.gather(-1, crossing), ranked.values.gather(-1, kth))
    on = (typical_p < 1) & ~greedy
    return torch.where(on, candidates & (distance <= radius), candidates)


def truncation_mask(
    x: torch.Tensor,
    temperature=1.0,
    min_p=None,
    top_n_sigma=None,
    p_less=False,
    epsilon=None,
    eta=None,
    min_tokens_to_keep: int = 1,
    top_k=None,
    edt_theta=None,
    edt_base=None,
    top_p=None,
    typical_p=None,
    top_h=None,
    top_h_rule: str = "hf",
    top_h_cap: int = -1,
) -> torch.Tensor:
    """The kept set of the chain in transformers' order (temperature, Top-H, top-k, top-p,
    min-p, typical, epsilon, eta), each stage evaluated on the renormalised survivors of the
    ones before it, in float64 by sorting each row (stable, largest first) and scanning the
    published definitions on p = softmax(x / T) (T = 0: the largest logits), T from EDT when
    ``edt_theta`` is given (the entropy of the row before the chain's rules):

    * Top-H (:func:`top_h_mask`, rule ``top_h_rule``) first when ``top_h`` is given (not at
      T = 0: a greedy row keeps all its largest logits);
    * top-k: the tokens whose logit reaches the k-th largest, k = max(top_k, min_tokens_to_keep);
    * top-p (transformers' TopPLogitsWarper) on top-k's survivors: keep a token iff the mass of
      the tokens ranked before it is < top_p, and the ties of the last one kept;
    * min-p (Nguyen et al. 2024): p >= min_p * p_max (the same before and after renormalising);
    * top-n-sigma (Tang et al. 2024): z >= max z - n * std(z), std the population std of the
      finite z, and p-less: p >= sum p^2, both on top-k's survivors (transformers has neither;
      docs/sampling.md); the intersection of these, at least the most probable token and the
      tokens whose logit reaches the ``min_tokens_to_keep``-th largest one (not for T = 0);
    * typical (Meister et al., transformers' TypicalLogitsWarper), on that set renormalised (q):
      rank its tokens by |-log q - H(q)|, keep them up to the first one at which the running
      mass of q reaches ``typical_p`` and at least ``min_tokens_to_keep`` of them, with the ties
      of the last one kept (not for T = 0);
    * epsilon (Hewitt et al. 2022): p >= eps, then eta: p >= min(eta, sqrt(eta) exp(-H(p))),
      each on the survivors of everything before it renormalised, with the same floor.
    Rows holding NaN / +inf keep nothing, all -inf rows keep token 0.
    """
    if top_h is not None and float(temperature) != 0:  # (greedy: Top-H off, the largest logits kept)
        kept_by_top_h = top_h_mask(x.detach().cpu(), top_h, float(temperature), top_h_rule, top_h_cap)
        x = _survivors(x.detach().cpu(), kept_by_top_h)
    if edt_theta is not None:
        temperature = edt_temperature(x, temperature, edt_theta, 0.8 if edt_base is None else edt_base)
    rules = dict(min_p=min_p, top_n_sigma=top_n_sigma, p_less=p_less, top_p=top_p, typical_p=typical_p)
    keep = _one_stage(x, temperature, min_tokens_to_keep, top_k=top_k, **rules)
    for name, value in (("epsilon", epsilon), ("eta", eta)):
        if value is not None:
            x = _survivors(x.detach().cpu(), keep)
            keep = _one_stage(x, temperature, min_tokens_to_keep, **{name: value})
    return keep


def _survivors(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with the dropped tokens at -inf (rows where nothing is kept, NaN / +inf, left as they are)."""
    return x.masked_fill(~(keep | ~keep.any(-1, keepdim=True)), -math.inf)


def _one_stage(
    x: torch.Tensor,
    temperature,
    min_tokens_to_keep: int,
    top_k=None,
    top_p=None,
    min_p=None,
    top_n_sigma=None,
    p_less=False,
    typical_p=None,
    epsilon=None,
    eta=None,
) -> torch.Tensor:
    """The kept set of the rules given, as above, on x's finite tokens (the earlier stages'
    dropped tokens are -inf there); epsilon and eta are evaluated on top-p's survivors
    renormalised (the chain gives them a stage of their own)."""
    batch = x.shape[:-1]
    xd = x.detach().double().cpu()
    t = _per_row(temperature, batch, 1.0)
    greedy = t == 0
    z = torch.where(greedy, torch.where(xd == xd.amax(-1, keepdim=True), 0.0, -math.inf), xd / t.clamp_min(1e-300))
    order = torch.sort(z, dim=-1, descending=True, stable=True)
    xs = xd.gather(-1, order.indices)
    vocab = xs.shape[-1]
    k_top = _per_row(0 if top_k is None else top_k, batch, 0.0).long()
    k_top = torch.where(k_top > 0, k_top.clamp(min=min_tokens_to_keep, max=max(vocab, 1)), 0)
    kth = xs.gather(-1, (k_top - 1).clamp(min=0)) if vocab > 0 else xs
    survivor = (k_top == 0) | (xs >= kth) | greedy
    zs = order.values.masked_fill(~survivor, -math.inf)
    p = torch.softmax(zs, dim=-1)
    mass_before = torch.cumsum(p, dim=-1) - p
    top_p_v = _per_row(top_p, batch, 1.0)
    # the last kept token's z: ties with it are kept too (the rows are sorted, largest first)
    crossing = torch.where(mass_before < top_p_v, zs, math.inf).amin(-1, keepdim=True)
    top_p_keep = (top_p_v >= 1) | (zs >= crossing)
    renormalised = torch.where(top_p_keep, p, 0.0)
    renormalised = renormalised / renormalised.sum(-1, keepdim=True)
    keep = top_p_keep.clone()
    keep &= p >= _per_row(min_p, batch, 0.0) * p[..., :1]
    finite = zs.isfinite()
    count = finite.sum(-1, keepdim=True)
    mean = torch.where(finite, zs, 0.0).sum(-1, keepdim=True) / count
    std = (torch.where(finite, zs - mean, 0.0) ** 2).sum(-1, keepdim=True).div(count).sqrt()
    n_sigma = _per_row(top_n_sigma, batch, math.inf)
    keep &= (n_sigma == math.inf) | (zs >= zs[..., :1] - n_sigma * std)
    keep &= (_per_row(p_less, batch, 0.0) == 0) | (p >= (p * p).sum(-1, keepdim=True))
    keep &= renormalised >= _per_row(epsilon, batch, 0.0)
    eta_v = _per_row(eta, batch, 0.0)
    h = entropy_terms(renormalised).sum(-1, keepdim=True)
    keep &= (eta_v == 0) | (renormalised >= torch.minimum(eta_v, eta_v.sqrt() * torch.exp(-h)))
    keep &= p > 0
    keep &= survivor
    k = min(max(min_tokens_to_keep, 1), zs.shape[-1])
    keep |= (xs >= xs[..., k - 1 : k]) & (p > 0) & ~greedy  # greedy rows: the largest logits only
    keep[..., 0] = True
    keep = _typical_keep(keep, zs, _per_row(typical_p, batch, 1.0), k, greedy)
    bad = ~(xd.isnan().any(-1) | (xd == math.inf).any(-1))
    keep &= bad.unsqueeze(-1)
    return torch.zeros_like(keep).scatter(-1, order.indices, keep)


# ---------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    dtype: torch.dtype = F64,
) -> torch.Tensor:
    """``F.cross_entropy(z, target, weight=class_weight, ...)`` plus ``z_loss * logsumexp(z)**2``
    per non-ignored token, with z = softcap * tanh((logits / T) / softcap) (no softcap: logits / T).
    ``target``: class indices, or probabilities of the logits' shape (every token counts).
    "mean" divides the cross-entropy by the sum of the target class weights of the non-ignored
    tokens (torch; N for probability targets) and the z-loss by the number of non-ignored
    tokens (Liger, PaLM)."""
    z = logits.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2 = z.reshape(-1, z.shape[-1])
    soft = target.dtype.is_floating_point
    t1 = target.reshape(-1, z.shape[-1]).to(dtype) if soft else target.reshape(-1)
    w = None if class_weight is None else class_weight.to(dtype)
    loss = F.cross_entropy(
        z2, t1, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if z_loss:
        valid = torch.ones(z2.shape[0], dtype=torch.bool) if soft else t1 != ignore_index
        # (the z-loss's logsumexp in float32 at least, as a user writes it)
        lse = torch.logsumexp(z2 if z2.dtype == F64 else z2.float(), -1)
        zl = torch.where(valid, z_loss * lse**2, torch.zeros((), dtype=lse.dtype))
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            loss = loss + zl.sum() / valid.sum()
    return loss.reshape(z.shape[:-1]) if reduction == "none" else loss


def linear_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = F64
) -> torch.Tensor:
    """The materialised logits ``hidden @ weight.T + bias`` (..., V)."""
    x = hidden.to(dtype) @ weight.to(dtype).T
    return x if bias is None else x + bias.to(dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = F64,
    **options,
) -> torch.Tensor:
    """:func:`cross_entropy` of the materialised logits ``hidden @ weight.T + bias``; ``options``
    as for :func:`cross_entropy` (class_weight, ignore_index, reduction, label_smoothing, z_loss,
    temperature, softcap)."""
    return cross_entropy(linear_logits(hidden, weight, bias, dtype), target, dtype=dtype, **options)


def linear_log_probs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int | None = None,
    dtype: torch.dtype = F64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(z)[target]`` and the entropy of softmax(z), z = (hidden @ weight.T + bias) / T
    (then softcap * tanh(z / softcap) with ``softcap``); log-prob 0 where target == ``ignore_index``."""
    z = linear_logits(hidden, weight, bias, dtype) / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    log_prob = logp.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    p_log_p = torch.where(logp == -math.inf, 0.0, logp.exp() * logp)  # masked logits: 0 log 0 = 0
    return torch.where(valid, log_prob, 0.0), -p_log_p.sum(-1)


# ---------------------------------------------------------------------------
# Mirostat v2
# ---------------------------------------------------------------------------


def mirostat_keep(x: torch.Tensor, mu, temperature=1.0) -> torch.Tensor:
    """Mirostat v2's kept set (Basu et al. 2021, Algorithm 2) in float64 by sorting: the tokens
    whose surprise -log2 p is at most mu (p = softmax(x / T)), at least the most probable one."""
    xd = x.detach().double().cpu()
    p = torch.softmax(xd / _per_row(temperature, x.shape[:-1], 1.0), dim=-1)
    order = torch.sort(p, dim=-1, descending=True, stable=True)
    keep = -torch.log2(order.values) <= _per_row(mu, x.shape[:-1], 0.0)
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order.indices, keep)


def mirostat_update(mu, log_q: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    """mu <- mu - eta * (-log2 q(token) - tau), q the renormalised kept distribution."""
    return mu - eta * (-log_q / math.log(2.0) - tau)
