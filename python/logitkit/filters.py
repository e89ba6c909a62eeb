"""The row-statistics truncation rules of the sampler family (docs/sampling.md):
temperature (0 = greedy, or entropy-adaptive: EDT), top-k, top-p, min-p,
top-n-sigma, p-less, epsilon and eta, each a threshold on the scaled logit found
from one pass of row statistics (top-p: from a radix / bucket walk), and typical
(an interval around the expected scaled logit, from a walk keyed on the distance).

* :func:`truncation_mask`: the boolean kept set of the chain;
* :func:`filter_logits`: the logits where kept, ``filter_value`` elsewhere;
* :func:`philox_uniform`: the counter-based uniform of each (seed, offset);
* the fake kernels of the ops ``filter_mask``, ``filter_sample`` and
  ``philox_uniform``; :func:`logitkit.sample` draws from the same chain.

Every rule parameter is a Python number or a tensor of shape
``logits.shape[:-1]`` (one value per row); a row whose value is the rule's
"off" value skips that rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from . import _backend, _loader
from ._registration import check_logits, check_temperature, cpp_float, register_fake

__all__ = ["filter_logits", "philox_uniform", "truncation_mask"]

#: A per-row parameter: one value for every row, or a tensor of shape logits.shape[:-1].
RowParam = float | int | bool | torch.Tensor | None

# Columns of the per-row parameter table (csrc/core/row_filters.h, FilterParam).
PARAM_COLUMNS = (
    "temperature",
    "min_p",
    "top_n_sigma",
    "p_less",
    "epsilon",
    "eta",
    "top_k",
    "top_p",
    "typical_p",
    "keep_count",
    "top_h_alpha",
    "top_h_count",
)
#: The columns filled from a rule's value (the others are the counts top_k and keep_count).
_VALUE_COLUMNS = ("temperature", "min_p", "top_n_sigma", "p_less", "epsilon", "eta", "top_p", "typical_p")
#: The value of each rule that turns it off for a row.
OFF_VALUES = {
    "min_p": 0.0,
    "top_n_sigma": math.inf,
    "p_less": 0.0,
    "epsilon": 0.0,
    "eta": 0.0,
    "top_p": 1.0,
    "typical_p": 1.0,
}
#: The EDT base N of Zhang et al. (2024), their recommended value.
EDT_DEFAULT_BASE = 0.8
#: Columns of filter_sample's statistics (SampleStat in csrc/frontend/row_filters.h).
STAT_LOG_PROB, STAT_RAW_LOG_PROB, STAT_ENTROPY, STAT_KEPT = STAT_COLUMNS = (0, 1, 2, 3)

# The valid range of each parameter: (lowest, highest, lowest inclusive, highest inclusive, text).
_RANGES = {
    "temperature": (0.0, math.inf, True, False, "a finite number >= 0 (0: greedy)"),
    "min_p": (0.0, 1.0, True, True, "in [0, 1]"),
    "top_p": (0.0, 1.0, False, True, "in (0, 1] (1 or None: off)"),
    "typical_p": (0.0, 1.0, False, True, "in (0, 1] (1 or None: off)"),
    "top_n_sigma": (0.0, math.inf, True, True, "a number >= 0 (None or inf: off)"),
    "epsilon": (0.0, 1.0, True, False, "in [0, 1)"),
    "eta": (0.0, 1.0, True, False, "in [0, 1)"),
    "top_k": (0.0, math.inf, True, False, "an int >= 0 (0 or None: off)"),
    "min_tokens_to_keep": (1.0, math.inf, True, False, "an int >= 1"),
    "edt_theta": (0.0, math.inf, True, False, "a finite number >= 0"),
    "edt_base": (0.0, 1.0, False, False, "in (0, 1)"),
}


def _in_range(values, name: str):
    """Element-wise range test of a tensor, or the test of one Python number."""
    low, high, low_closed, high_closed, _ = _RANGES[name]
    above = values >= low if low_closed else values > low
    below = values <= high if high_closed else values < high
    return above & below


def _check_value(value: float | torch.Tensor, name: str, op: str) -> None:
    """Range check of a parameter; tensors are checked only on the CPU and outside
    ``torch.compile`` (a CUDA check would be a host synchronisation: docs/sampling.md
    says what out-of-range values do there)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or torch.compiler.is_compiling() or value.numel() == 0:
            return
        ok = bool(_in_range(value.double(), name).all())
    else:
        ok = bool(_in_range(value, name))  # NaN fails every comparison
    if not ok:
        raise ValueError(f"logitkit.{op}: {name} must be {_RANGES[name][4]}, got {value}")


def _check_row_tensor(value: torch.Tensor, name: str, logits: torch.Tensor, op: str) -> None:
    """A per-row parameter given as a tensor is on logits' device, with one value per row."""
    batch = logits.shape[:-1]
    if value.device != logits.device:
        raise ValueError(f"logitkit.{op}: {name} is on {value.device} but logits is on {logits.device}")
    if value.shape != batch:
        raise ValueError(
            f"logitkit.{op}: {name} must be a number or a tensor of shape {list(batch)} (one value per row), "
            f"got shape {list(value.shape)}"
        )


def _column(value: RowParam, name: str, logits: torch.Tensor, op: str) -> torch.Tensor | float:
    """One column of the table: a float (the same for every row) or a float32 tensor of the rows' shape."""
    if isinstance(value, torch.Tensor):
        _check_row_tensor(value, name, logits, op)
        if value.dtype == torch.bool:
            return value.to(torch.float32)
        if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(
                f"logitkit.{op}: {name} must be a floating-point, integer or bool tensor, got {value.dtype}"
            )
        if name in _RANGES:
            _check_value(value, name, op)
        return value.to(torch.float32)
    number = float(value)  # type: ignore[arg-type]
    if name in _RANGES:
        _check_value(number, name, op)
    return number


def _integer_tensor_column(value: torch.Tensor, name: str, logits: torch.Tensor, op: str) -> torch.Tensor:
    """A per-row count parameter (top_k, min_tokens_to_keep) given as a tensor: an integer dtype,
    then the device, shape and range checks of :func:`_column`; as int64."""
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"logitkit.{op}: {name} must be an int or an integer tensor, got {value.dtype}")
    _column(value, name, logits, op)
    return value.to(torch.int64)


def _top_k_column(top_k: RowParam, logits: torch.Tensor, op: str) -> int | torch.Tensor:
    """top_k as an int (0: off) or an int64 tensor of the rows' shape (0: off for that row)."""
    if top_k is None:
        return 0
    if isinstance(top_k, torch.Tensor):
        return _integer_tensor_column(top_k, "top_k", logits, op)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"logitkit.{op}: top_k must be an int or an integer tensor, got {type(top_k).__name__}")
    _check_value(top_k, "top_k", op)
    return top_k


def _keep_count_column(min_tokens_to_keep: int | torch.Tensor, logits: torch.Tensor, op: str) -> int | torch.Tensor:
    """min_tokens_to_keep as an int >= 1 or an int64 tensor of the rows' shape (values >= 1)."""
    if isinstance(min_tokens_to_keep, torch.Tensor):
        return _integer_tensor_column(min_tokens_to_keep, "min_tokens_to_keep", logits, op)
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"logitkit.{op}: min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")
    return min_tokens_to_keep


def _top_k_count_column(
    logits: torch.Tensor, top_k: int | torch.Tensor, min_tokens_to_keep: int | torch.Tensor
) -> torch.Tensor | float:
    """top-k's k per row, max(top_k, min_tokens_to_keep) as transformers' TopKLogitsWarper, 0
    where top-k is off (top_k 0, or >= V: every token). The kernels find the k-th largest logit
    themselves (and the min_tokens_to_keep-th for the keep floor): no torch.topk, no host read
    (docs/sampling.md). As float32, exact for k < 2^24."""
    vocab = logits.shape[-1]
    if isinstance(top_k, int) and isinstance(min_tokens_to_keep, int):
        return float(min(max(top_k, min_tokens_to_keep), vocab)) if 0 < top_k < vocab else 0.0
    batch = logits.shape[:-1]
    keep = torch.as_tensor(min_tokens_to_keep, dtype=torch.int64, device=logits.device).expand(batch)
    top_k_rows = torch.as_tensor(top_k, dtype=torch.int64, device=logits.device).expand(batch)
    top_k_on = (top_k_rows > 0) & (top_k_rows < vocab)
    return torch.where(top_k_on, torch.maximum(top_k_rows, keep).clamp(max=vocab), 0).to(torch.float32)


def _edt_temperature(logits: torch.Tensor, temperature, theta, base, op: str) -> torch.Tensor:
    """Entropy-based dynamic temperature (Zhang et al., 2024, "EDT: Improving Large Language
    Models' Generation by Entropy-based Dynamic Temperature Sampling"): T = T0 * N^(theta / H),
    H the entropy (nats) of softmax(logits) at temperature 1, per row; theta = 0 gives T0."""
    t0 = _column(temperature, "temperature", logits, op)
    theta_c = _column(theta, "edt_theta", logits, op)
    base_c = _column(EDT_DEFAULT_BASE if base is None else base, "edt_base", logits, op)
    # H >= 0 (a rounding below 0 would give N^-inf); a row holding NaN / +inf (NaN entropy) has
    # nothing kept whatever its temperature: 0 there, so that no NaN reaches the checks.
    h = _backend.ops().entropy(logits.detach(), 1.0)
    h = torch.where(h > 0, h, 0.0)  # also -0.0 -> +0.0, so that theta / H = +inf, not -inf
    # theta / H with theta = 0 -> 0 (also for H = 0); H = 0 and theta > 0 -> inf -> T = 0: greedy
    exponent = torch.where(torch.as_tensor(theta_c, device=h.device) == 0, 0.0, theta_c / h)
    t = t0 * torch.pow(torch.as_tensor(base_c, dtype=torch.float32, device=h.device), exponent)
    return torch.nan_to_num(t, nan=0.0)


TOP_H_RULES = ("hf", "official", "exact")


def check_top_h_args(
    logits: torch.Tensor, alpha: float | None, temperature: float, rule: str, cap: int, op: str = "top_h_mask"
) -> None:
    """The argument checks of top_h_mask and sample (alpha None: no truncation), with the
    messages of csrc/common/top_h_frontend.h."""
    check_logits(logits, op, "logits")
    if alpha is not None and not (alpha > 0 and alpha <= 1):
        raise ValueError(f"logitkit.{op}: alpha must be in (0, 1], got {cpp_float(alpha)}")
    check_temperature(temperature, op)
    if rule not in TOP_H_RULES:
        raise ValueError(f"logitkit.{op}: rule must be 'hf', 'official' or 'exact', got '{rule}'")
    if cap != -1 and cap < 1:
        raise ValueError(f"logitkit.{op}: cap must be >= 1 (or -1 for the rule's default), got {cap}")


def rules_given(rules: Iterable[object]) -> bool:
    """Whether any of the chain's rule arguments is given (not None / False; a value that turns
    the rule off for some rows still counts)."""
    return any(v is not None and v is not False for v in rules)


def is_default_keep(min_tokens_to_keep: object) -> bool:
    """Whether ``min_tokens_to_keep`` is the default 1 (a Python int; a tensor is a rule argument)."""
    return type(min_tokens_to_keep) is int and min_tokens_to_keep == 1


def check_top_h_keep(min_tokens_to_keep: object, later_rules: Iterable[object], op: str) -> None:
    """Top-H has no ``min_tokens_to_keep`` of its own (nor has transformers' TopHLogitsWarper):
    a value other than 1 applies to the rules after it, so it needs one of them."""
    if not is_default_keep(min_tokens_to_keep) and not rules_given(later_rules):
        raise ValueError(
            f"logitkit.{op}: min_tokens_to_keep applies to the rules after top_h (top_k, top_p, min_p, ...), "
            "and none is given; Top-H alone has no min_tokens_to_keep (as transformers' TopHLogitsWarper)"
        )


def top_h_rows(
    logits: torch.Tensor,
    top_h: float | torch.Tensor,
    temperature: float | torch.Tensor,
    op: str,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-H's alpha and temperature as float32 tensors of one value per row (for the op
    ``top_h_mask_per_row``), a Python number repeated; a tensor is checked for device and shape
    (and, with ``check_values``, on the CPU, outside ``torch.compile``, for its values: alpha in
    [0, 1], 0 turning Top-H off for the row; temperature a finite number > 0). Callers that
    checked the values already pass ``check_values=False``: each check is two reductions and a
    read of the rows."""
    batch = logits.shape[:-1]
    rows = []
    for name, value in (("alpha", top_h), ("temperature", temperature)):
        if not isinstance(value, torch.Tensor):
            rows.append(torch.full(batch, float(value), dtype=torch.float32, device=logits.device))
            continue
        _check_row_tensor(value, name, logits, op)
        if not value.dtype.is_floating_point:
            raise TypeError(f"logitkit.{op}: {name} must be a floating-point tensor, got {value.dtype}")
        rows.append(value.to(torch.float32))
    alpha_rows, temperature_rows = rows
    check_values = check_values and logits.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_values and alpha_rows.numel() > 0:
        if not bool(((alpha_rows >= 0) & (alpha_rows <= 1)).all()):
            raise ValueError(f"logitkit.{op}: alpha must be in [0, 1] per row (0: Top-H off for that row), got {top_h}")
        inverse = temperature_rows.reciprocal()
        if not bool(((inverse > 0) & (inverse <= torch.finfo(torch.float32).max) & temperature_rows.isfinite()).all()):
            raise ValueError(f"logitkit.{op}: temperature must be a finite number > 0, got {temperature}")
    return alpha_rows, temperature_rows


def top_h_mask_rows(
    logits: torch.Tensor,
    top_h: float | torch.Tensor,
    temperature: float | torch.Tensor,
    rule: str,
    cap: int | None,
    op: str = "top_h_mask",
    check_values: bool = True,
) -> torch.Tensor:
    """Top-H's keep mask (the op ``top_h_mask``, or ``top_h_mask_per_row`` when alpha or the
    temperature is a per-row tensor), after the Python-side checks (``check_values=False``:
    the caller checked the per-row values already, as :func:`top_h_off_when_greedy` does; their
    device and shape are checked again, which costs no reduction)."""
    cap_arg = -1 if cap is None else int(cap)
    if not isinstance(top_h, torch.Tensor) and not isinstance(temperature, torch.Tensor):
        check_top_h_args(logits, float(top_h), float(temperature), str(rule), cap_arg, op)
        return _backend.ops().top_h_mask(logits, float(top_h), float(temperature), str(rule), cap_arg)
    check_top_h_args(logits, None, 1.0, str(rule), cap_arg, op)
    alpha_rows, temperature_rows = top_h_rows(logits, top_h, temperature, op, check_values=check_values)
    return _backend.ops().top_h_mask_per_row(logits, alpha_rows, temperature_rows, str(rule), cap_arg)


#: Top-H's cap (the K of rules "hf" and "official") when none is given (the kernels' constant).
TOP_H_DEFAULT_CAP: int = _loader._C.top_h_default_cap

#: The largest K = min(cap, V) of Top-H "hf" that the chain's kernels run themselves, as its
#: first rule (the CUDA kernels' gathered survivors: docs/sampling.md); above it, and for the
#: rules "official" and "exact", Top-H is a stage of its own (:func:`top_h_stage`).
FUSED_TOP_H_MAX_COUNT: int = _loader._C.fused_top_h_max_count


def fused_top_h_count(logits: torch.Tensor, rule: str, cap: int | None) -> int:
    """K = min(cap, V) when the chain's kernels run Top-H themselves (rule "hf", 1 <= K < V,
    K <= FUSED_TOP_H_MAX_COUNT), else 0."""
    vocab = logits.shape[-1]
    count = min(TOP_H_DEFAULT_CAP if cap is None or cap == -1 else int(cap), vocab)
    return count if rule == "hf" and 1 <= count < vocab and count <= FUSED_TOP_H_MAX_COUNT else 0


def top_h_stage(
    logits: torch.Tensor,
    top_h: float | torch.Tensor,
    temperature: RowParam,
    rule: str,
    cap: int | None,
    edt_theta: RowParam,
    edt_base: RowParam,
    op: str,
) -> tuple[torch.Tensor, RowParam, RowParam, RowParam]:
    """Top-H as the first stage of the chain, in transformers' order (temperature, Top-H, top-k,
    top-p, min-p, typical, epsilon, eta). Returns ``logits`` with the tokens Top-H drops
    (``top_h_mask``) set to -inf, so that the rules after it see its survivors renormalised, and
    the temperature, ``edt_theta`` and ``edt_base`` the chain then takes.

    * ``top_h`` and ``temperature`` may be per-row tensors (``top_h`` 0: Top-H off for that row).
    * EDT (``edt_theta``) is a temperature, so it comes first: T per row from the entropy of
      the untruncated row, used by Top-H and handed to the chain as a per-row temperature.
    * A greedy row (temperature 0, or 1 / T overflowing float32) skips Top-H, as it skips the
      chain's other rules: it keeps every token equal to its largest logit.
    * A row without a distribution (NaN or +inf, where Top-H keeps nothing) is left as it is,
      so that the chain reports it as such.

    The route of the rules "official" and "exact", and of K = min(cap, V) above
    ``FUSED_TOP_H_MAX_COUNT`` or V <= K: the Top-H mask op and one masked copy of the rows
    (docs/sampling.md); "hf" with a smaller K runs in the chain's kernels instead."""
    if edt_theta is not None:
        temperature = _edt_temperature(logits, temperature, edt_theta, edt_base, op)
        edt_theta = edt_base = None
    alpha, top_h_t, _ = top_h_off_when_greedy(logits, top_h, temperature, rule, cap, op)
    if alpha is None:  # one temperature, greedy: no row runs Top-H
        return logits, temperature, edt_theta, edt_base
    mask = top_h_mask_rows(logits.detach(), alpha, top_h_t, rule, cap, op, check_values=False)
    return _survivors(logits, mask), temperature, edt_theta, edt_base


def scaled_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of a per-row temperature that scale the logits: 1 / T a finite number > 0. The
    others are greedy (0, or a T whose 1 / T overflows float32; on CUDA, where the values are not
    checked, also a negative or NaN T)."""
    inverse = t.reciprocal()
    return (inverse > 0) & (inverse <= torch.finfo(torch.float32).max)


def top_h_off_when_greedy(
    logits: torch.Tensor, top_h: float | torch.Tensor, temperature: RowParam, rule: str, cap: int | None, op: str
) -> tuple[float | torch.Tensor | None, float | torch.Tensor, torch.Tensor | None]:
    """Top-H's alpha and temperature with greedy rows taken out (checked as ``top_h_mask``'s),
    and for a per-row temperature its :func:`scaled_rows`: one greedy temperature gives (None,
    1.0, None), Top-H off; a per-row temperature gives per-row alpha 0 (Top-H off) and
    temperature 1 on its greedy rows. A per-row alpha is checked here once (also when no row
    uses it) and returned as float32 rows."""
    cap_arg = -1 if cap is None else int(cap)
    alpha = top_h if isinstance(top_h, torch.Tensor) else float(top_h)
    check_top_h_args(logits, None if isinstance(alpha, torch.Tensor) else alpha, 1.0, str(rule), cap_arg, op)
    if isinstance(alpha, torch.Tensor):  # (device, shape and, on the CPU, values: also when no row uses it)
        alpha, _ = top_h_rows(logits, alpha, 1.0, op)
    t = _column(temperature, "temperature", logits, op)  # [0, inf): 0 is greedy
    if not isinstance(t, torch.Tensor):
        if t > 0 and 1.0 / t <= torch.finfo(torch.float32).max:
            return alpha, t, None
        return None, 1.0, None
    scaled = scaled_rows(t)
    alpha_rows = alpha if isinstance(alpha, torch.Tensor) else torch.full_like(scaled, alpha, dtype=torch.float32)
    return torch.where(scaled, alpha_rows, 0.0), torch.where(scaled, t, 1.0), scaled


def _survivors(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logits`` with the tokens a stage of the chain drops set to -inf, so that the stages after
    it see its survivors renormalised (differentiable: a masked_fill). A row where the stage
    keeps nothing (NaN or +inf in it) is left as it is, so that the last stage reports it as
    such; an all -inf row stays all -inf."""
    return logits.masked_fill(~(mask | ~mask.any(-1, keepdim=True)), -math.inf)


#: transformers' order of the chain's warpers after temperature (``GenerationConfig``: top-k,
#: top-p, min-p, typical, epsilon, eta), each evaluated on the renormalised survivors of the
#: ones before it; top-n-sigma and p-less (not in transformers) act on top-k's survivors, with
#: min-p (docs/sampling.md, "Composition").
CHAIN_ORDER = ("top_k", "top_p", "min_p", "top_n_sigma", "p_less", "typical_p", "epsilon", "eta")


def _rule_on(name: str, value: object) -> bool:
    """Whether a rule argument may change some row's kept set: not None / False, and not a
    Python number equal to the rule's off value (a tensor always may; bad values count as on,
    so that the parameter table's checks see them)."""
    if value is None or value is False:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return value != (0 if name == "top_k" else OFF_VALUES[name])


def chain_calls(rules: dict[str, RowParam]) -> list[dict[str, RowParam]]:
    """The chain's rules that are on, split into calls of the fused kernels, in ``CHAIN_ORDER``.
    One call finds every threshold from one row-statistics pass: top-p on top-k's survivors,
    epsilon and eta on top-p's survivors renormalised (the kept mass K and D = sum (z - m) e of
    top-p's walk), min-p, top-n-sigma and p-less on top-k's survivors, and typical on the
    intersection of all of them renormalised. That is transformers' chain as long as epsilon and
    eta follow nothing but top-k and top-p in their call; after min-p, top-n-sigma, p-less,
    typical or each other, transformers evaluates them on survivors whose mass the call does not
    have (one more pass), so they start a call of their own, which runs on the logits of the
    earlier calls' survivors (the others -inf). The ``min_tokens_to_keep`` floor changes
    nothing here: top-k's and top-p's kept sets and the floor are all prefixes of the tokens by
    logit, so the one that holds the other decides, and where the floor holds top-p's set,
    epsilon and eta can only drop tokens top-p has already dropped."""
    fusable = {"top_k", "top_p"}
    calls: list[dict[str, RowParam]] = [{}]
    for name in CHAIN_ORDER:
        value = rules.get(name)
        if not _rule_on(name, value):
            continue
        if name in ("epsilon", "eta") and not set(calls[-1]) <= fusable:
            calls.append({})
        calls[-1][name] = value
    return calls


class ChainInput(NamedTuple):
    """What the chain's last kernel call runs on (:func:`chain_params`)."""

    #: ``logits``, or a copy with the tokens the earlier stages dropped at -inf
    source: torch.Tensor
    #: the last call's parameter table
    params: torch.Tensor
    #: None, or (when the copy was written by the ``filter_logits`` op, whose rows without a
    #: distribution come out all -inf) a bool per row: the row holds NaN or +inf, so the last
    #: call's result for it must be "nothing kept" (see :func:`mark_undefined_rows`)
    undefined: torch.Tensor | None


def chain_stages(
    logits: torch.Tensor,
    temperature: RowParam,
    rules: dict[str, RowParam],
    edt_theta: RowParam,
    edt_base: RowParam,
    min_tokens_to_keep: int | torch.Tensor,
    op: str,
    first_call: dict[str, RowParam] | None = None,
) -> tuple[torch.Tensor, RowParam, dict[str, RowParam], RowParam, RowParam, torch.Tensor | None]:
    """Runs every call of :func:`chain_calls` but the last; returns the logits the last call
    runs on, its temperature, its rules, EDT's arguments and ``ChainInput.undefined``. With one
    call (every chain of top-k, top-p, min-p, top-n-sigma, p-less and typical, and epsilon or
    eta after top-k / top-p only) this returns its inputs and costs nothing. EDT's temperature
    (from the entropy of the untruncated row) is computed once, before the first call, and
    every call takes it. Each earlier call writes the copy with the ``filter_logits`` op (one
    pass; -inf where dropped), and one max over the input rows finds the rows without a
    distribution; when the logits require a gradient, the ``filter_mask`` op and a masked_fill
    (:func:`_survivors`) instead, differentiable and keeping such rows as they are.
    ``first_call``: arguments of :func:`filter_params` for the first call only (fused Top-H)."""
    first_call = first_call or {}
    calls = chain_calls(rules)
    if len(calls) == 1:
        return logits, temperature, {**first_call, **calls[0]}, edt_theta, edt_base, None
    calls[0] = {**first_call, **calls[0]}
    if edt_theta is not None:
        temperature = _edt_temperature(logits, temperature, edt_theta, edt_base, op)
        edt_theta = edt_base = None
    differentiable = torch.is_grad_enabled() and logits.requires_grad
    source = logits
    for call in calls[:-1]:
        params = filter_params(
            source, temperature=temperature, edt_base=edt_base, min_tokens_to_keep=min_tokens_to_keep, op=op, **call
        )
        if differentiable:
            source = _survivors(source, _backend.ops().filter_mask(source.detach(), params))
        else:
            source = _backend.ops().filter_logits(source, params, -math.inf)
    # NaN or +inf in the row: the max is NaN or +inf (torch.amax propagates NaN); an empty
    # vocabulary has no such row
    undefined = None
    if not differentiable and logits.shape[-1] > 0:
        undefined = ~(logits.detach().amax(-1) < math.inf)
    return source, temperature, calls[-1], edt_theta, edt_base, undefined


def mark_undefined_rows(kept_first: torch.Tensor, undefined: torch.Tensor | None, value: object) -> None:
    """Where the chain's copy lost a row without a distribution (``ChainInput.undefined``), the
    last call saw an all -inf row and kept its token 0 (the rule for all -inf rows); writes
    ``value`` (False in a mask, the filter value in filtered logits) into that token of those
    rows, in place, so that they keep nothing, as one call would."""
    if undefined is not None:
        kept_first.copy_(torch.where(undefined, torch.as_tensor(value, dtype=kept_first.dtype), kept_first))


def chain_params(
    logits: torch.Tensor,
    rules: dict[str, RowParam],
    temperature: RowParam,
    edt_theta: RowParam,
    edt_base: RowParam,
    min_tokens_to_keep: int | torch.Tensor,
    top_h: float | torch.Tensor | None,
    rule: str,
    cap: int | None,
    op: str,
) -> ChainInput:
    """The whole chain in transformers' order up to its last kernel call: Top-H when ``top_h``
    is given (rule "hf" with K = min(cap, V) <= FUSED_TOP_H_MAX_COUNT: in the first kernel
    call's table; else :func:`top_h_stage`), the calls of :func:`chain_stages` but the last,
    then the last call's parameter table."""
    first_call: dict[str, RowParam] = {}
    if top_h is not None:
        check_top_h_keep(min_tokens_to_keep, rules.values(), op)
        count = fused_top_h_count(logits, rule, cap)
        if count > 0:
            cap_arg = -1 if cap is None else int(cap)
            alpha = top_h if isinstance(top_h, torch.Tensor) else float(top_h)
            check_top_h_args(logits, None if isinstance(alpha, torch.Tensor) else alpha, 1.0, rule, cap_arg, op)
            if isinstance(alpha, torch.Tensor):  # (device, shape and, on the CPU, values)
                alpha, _ = top_h_rows(logits, alpha, 1.0, op)
            first_call = dict(top_h_alpha=alpha, top_h_count=count)
        else:
            logits, temperature, edt_theta, edt_base = top_h_stage(
                logits, top_h, temperature, rule, cap, edt_theta, edt_base, op
            )
    source, temperature, last, edt_theta, edt_base, undefined = chain_stages(
        logits, temperature, rules, edt_theta, edt_base, min_tokens_to_keep, op, first_call
    )
    params = filter_params(
        source,
        temperature=temperature,
        edt_theta=edt_theta,
        edt_base=edt_base,
        min_tokens_to_keep=min_tokens_to_keep,
        op=op,
        **last,
    )
    return ChainInput(source, params, undefined)


def filter_params(
    logits: torch.Tensor,
    *,
    temperature: RowParam = 1.0,
    top_k: RowParam = None,
    top_p: RowParam = None,
    typical_p: RowParam = None,
    min_p: RowParam = None,
    top_n_sigma: RowParam = None,
    p_less: RowParam = False,
    epsilon: RowParam = None,
    eta: RowParam = None,
    edt_theta: RowParam = None,
    edt_base: RowParam = None,
    min_tokens_to_keep: int | torch.Tensor = 1,
    top_h_alpha: RowParam = 0.0,
    top_h_count: RowParam = 0,
    op: str = "truncation_mask",
) -> torch.Tensor:
    """The per-row parameter table (..., 12) float32 of the ops (columns: PARAM_COLUMNS), from the
    Python arguments (checked, with messages naming the argument). ``top_h_alpha`` (checked by
    the caller) and ``top_h_count`` (K) put Top-H "hf" first in the call (0: off)."""
    check_logits(logits, op, "logits")
    keep_count = _keep_count_column(min_tokens_to_keep, logits, op)
    if edt_theta is not None:
        temperature = _edt_temperature(logits, temperature, edt_theta, edt_base, op)
    elif edt_base is not None:
        raise ValueError(f"logitkit.{op}: edt_base needs edt_theta")
    given = {"temperature": temperature, "min_p": min_p, "top_n_sigma": top_n_sigma, "p_less": p_less}
    given.update({"epsilon": epsilon, "eta": eta, "top_p": top_p, "typical_p": typical_p})
    columns: dict[str, torch.Tensor | float] = {}
    for name in _VALUE_COLUMNS:
        value = given[name]
        columns[name] = _column(OFF_VALUES[name] if value is None else value, name, logits, op)
    columns["top_k"] = _top_k_count_column(logits, _top_k_column(top_k, logits, op), keep_count)
    columns["keep_count"] = keep_count.to(torch.float32) if isinstance(keep_count, torch.Tensor) else float(keep_count)
    columns["top_h_alpha"] = top_h_alpha if isinstance(top_h_alpha, torch.Tensor) else float(top_h_alpha or 0.0)
    columns["top_h_count"] = float(top_h_count or 0)
    table = torch.empty((*logits.shape[:-1], len(PARAM_COLUMNS)), dtype=torch.float32, device=logits.device)
    for j, name in enumerate(PARAM_COLUMNS):
        table[..., j] = columns[name]
    return table


def truncation_mask(
    logits: torch.Tensor,
    *,
    temperature: RowParam = 1.0,
    top_k: RowParam = None,
    top_p: RowParam = None,
    typical_p: RowParam = None,
    min_p: RowParam = None,
    top_n_sigma: RowParam = None,
    p_less: RowParam = False,
    epsilon: RowParam = None,
    eta: RowParam = None,
    edt_theta: RowParam = None,
    edt_base: RowParam = None,
    min_tokens_to_keep: int | torch.Tensor = 1,
    top_h: float | torch.Tensor | None = None,
    rule: str = "hf",
    cap: int | None = None,
) -> torch.Tensor:
    """The boolean kept set (same shape as ``logits``) of the chain temperature -> top-k ->
    top-p -> {min-p, top-n-sigma, p-less} -> typical -> epsilon -> eta, transformers' order, each
    stage on the renormalised survivors of the ones before it (definitions and composition in
    docs/sampling.md), each parameter a number or a per-row tensor; ``None`` /
    ``False`` / 0 (inf for ``top_n_sigma``, 1 for ``top_p`` and ``typical_p``) turns a rule off.

    ``top_p`` in (0, 1] (transformers' ``TopPLogitsWarper``) keeps the tokens for which the
    probability mass of the more probable tokens is below ``top_p`` (ties of the last one
    kept); the rules after it see its survivors renormalised, as in transformers.

    ``typical_p`` in (0, 1] (transformers' ``TypicalLogitsWarper``, Meister et al.): over the
    kept set of the rules before it renormalised (q), it keeps the tokens nearest the
    entropy, |-log q - H(q)|, until their mass reaches ``typical_p`` (the token that reaches it
    and its ties kept), at least ``min_tokens_to_keep`` of the most typical ones. It can drop
    the most probable token, as transformers' does. ``epsilon`` and ``eta`` then act on
    typical's survivors renormalised, eta on epsilon's (a kernel call of their own when they
    follow min-p, top-n-sigma, p-less, typical or each other: docs/sampling.md).

    ``edt_theta`` (with ``edt_base`` N, default 0.8) makes the temperature entropy-adaptive
    (EDT, Zhang et al. 2024): T = temperature * N^(edt_theta / H), H the entropy of the row's
    softmax at temperature 1 (one more pass); a one-hot row (H = 0) becomes greedy.

    ``top_k`` (transformers' ``TopKLogitsWarper``) keeps the tokens whose logit reaches the
    k-th largest (ties kept; k = max(top_k, min_tokens_to_keep)); the other rules are then
    evaluated on the temperature-scaled distribution of its survivors (transformers' order:
    top-k before them), and the kept set is their intersection; the most probable token is
    always kept (unless typical drops it), and at least ``min_tokens_to_keep`` tokens (the largest logits,
    ties at the k-th kept too, as transformers' epsilon/eta warpers; an int, or an integer
    tensor of one value >= 1 per row, where transformers takes one int). Temperature
    0 keeps the largest logits only. NaN or +inf in a row: nothing kept; a row
    of only -inf keeps token 0. A token of probability 0 in float32 is never kept.

    ``top_h`` (alpha, with ``rule`` and ``cap``: :func:`logitkit.top_h_mask`) adds Top-H as the
    chain's first rule, as transformers orders it: the other rules then see Top-H's survivors
    renormalised (rule "hf" with K = min(cap, V) <= 256 runs in the chain's kernels, the others
    as a stage of their own: docs/sampling.md). ``top_h`` may be a per-row tensor (0: Top-H off
    for that row), with a per-row or entropy-adaptive temperature too.
    """
    rules = dict(top_k=top_k, top_p=top_p, min_p=min_p, top_n_sigma=top_n_sigma, p_less=p_less)
    rules.update(typical_p=typical_p, epsilon=epsilon, eta=eta)
    chain = chain_params(
        logits, rules, temperature, edt_theta, edt_base, min_tokens_to_keep, top_h, rule, cap, "truncation_mask"
    )
    mask = _backend.ops().filter_mask(chain.source, chain.params)
    if mask.shape[-1] > 0:
        mark_undefined_rows(mask[..., 0], chain.undefined, False)
    return mask


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: RowParam = 1.0,
    top_k: RowParam = None,
    top_p: RowParam = None,
    typical_p: RowParam = None,
    min_p: RowParam = None,
    top_n_sigma: RowParam = None,
    p_less: RowParam = False,
    epsilon: RowParam = None,
    eta: RowParam = None,
    edt_theta: RowParam = None,
    edt_base: RowParam = None,
    min_tokens_to_keep: int | torch.Tensor = 1,
    filter_value: float = -math.inf,
    top_h: float | torch.Tensor | None = None,
    rule: str = "hf",
    cap: int | None = None,
) -> torch.Tensor:
    """``logits`` (not divided by the temperature) where :func:`truncation_mask` keeps the
    token, ``filter_value`` elsewhere (``top_h``, ``rule``, ``cap``: as there)."""
    rules = dict(top_k=top_k, top_p=top_p, min_p=min_p, top_n_sigma=top_n_sigma, p_less=p_less)
    rules.update(typical_p=typical_p, epsilon=epsilon, eta=eta)
    source, params, undefined = chain_params(  # (differentiable: the earlier stages are masked_fill)
        logits, rules, temperature, edt_theta, edt_base, min_tokens_to_keep, top_h, rule, cap, "filter_logits"
    )
    if torch.is_grad_enabled() and logits.requires_grad:  # differentiable: the gradient flows to the kept logits
        mask = _backend.ops().filter_mask(source.detach(), params)
        return torch.where(mask, logits, torch.tensor(filter_value, dtype=logits.dtype, device=logits.device))
    # written by the kernel's second pass: no bool mask and no torch.where pass over the rows
    # (earlier stages' survivors hold the original logits wherever the last call can keep a token)
    filtered = _backend.ops().filter_logits(source, params, float(filter_value))
    if filtered.shape[-1] > 0:
        mark_undefined_rows(filtered[..., 0], undefined, float(filter_value))
    return filtered


def _as_counter(value: int | torch.Tensor, name: str, like: torch.Tensor, op: str) -> torch.Tensor:
    batch = like.shape[:-1]
    if isinstance(value, torch.Tensor):
        if value.device != like.device:
            raise ValueError(f"logitkit.{op}: {name} is on {value.device} but logits is on {like.device}")
        if value.dtype != torch.int64:
            raise TypeError(f"logitkit.{op}: {name} must be an int64 tensor, got {value.dtype}")
        if value.shape != batch:
            raise ValueError(
                f"logitkit.{op}: {name} must be an int or an int64 tensor of shape {list(batch)}, "
                f"got shape {list(value.shape)}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"logitkit.{op}: {name} must be an int or an int64 tensor, got {type(value).__name__}")
    return torch.full(batch, value, dtype=torch.int64, device=like.device)


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The Philox4x32-10 uniform number in [0, 1) of each (seed, offset) pair (int64 tensors of
    one shape; float32 result): key = seed, counter = (offset, 0), the first 32-bit output's high
    24 bits times 2^-24. The same numbers on every backend."""
    return _backend.ops().philox_uniform(seed, offset)


def row_uniform(
    logits: torch.Tensor, seed: int | torch.Tensor | None, offset: int | torch.Tensor | None, generator, op: str
) -> torch.Tensor:
    """One uniform number per row: counter-based from (seed, offset) when ``seed`` is given,
    else from ``generator`` (torch's default generator of the device when None)."""
    if seed is None:
        if offset is not None:
            raise ValueError(f"logitkit.{op}: offset needs seed")
        return torch.rand(logits.shape[:-1], generator=generator, device=logits.device, dtype=torch.float32)
    if generator is not None:
        raise ValueError(f"logitkit.{op}: give either generator or seed (with offset), not both")
    seeds = _as_counter(seed, "seed", logits, op)
    offsets = _as_counter(0 if offset is None else offset, "offset", logits, op)
    return philox_uniform(seeds, offsets)


# ---------------------------------------------------------------------------
# Fake kernels
# ---------------------------------------------------------------------------


def _check_params_table(logits: torch.Tensor, params: torch.Tensor, op: str) -> None:
    check_logits(logits, op, "logits")
    shape = [*logits.shape[:-1], len(PARAM_COLUMNS)]
    if params.dtype != torch.float32:
        raise TypeError(f"logitkit.{op}: params must be float32, got {params.dtype}")
    if list(params.shape) != shape:
        raise ValueError(f"logitkit.{op}: params must have shape {shape}, got {list(params.shape)}")


@register_fake("filter_mask")
def _filter_mask_fake(logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    _check_params_table(logits, params, "filter_mask")
    return logits.new_empty(logits.shape, dtype=torch.bool)


@register_fake("filter_logits")
def _filter_logits_fake(logits: torch.Tensor, params: torch.Tensor, filter_value: float) -> torch.Tensor:
    _check_params_table(logits, params, "filter_logits")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@register_fake("filter_sample")
def _filter_sample_fake(
    logits: torch.Tensor, params: torch.Tensor, uniform: torch.Tensor, raw_log_prob: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_params_table(logits, params, "filter_sample")
    batch = logits.shape[:-1]
    if uniform.dtype != torch.float32:
        raise TypeError(f"logitkit.filter_sample: uniform must be float32, got {uniform.dtype}")
    if uniform.shape != batch:
        raise ValueError(
            f"logitkit.filter_sample: uniform must have shape {list(batch)} (one number per row), "
            f"got {list(uniform.shape)}"
        )
    return logits.new_empty(batch, dtype=torch.int64), logits.new_empty((*batch, 4), dtype=torch.float32)


@register_fake("philox_uniform")
def _philox_uniform_fake(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    for name, t in (("seed", seed), ("offset", offset)):
        if t.dtype != torch.int64:
            raise TypeError(f"logitkit.philox_uniform: {name} must be int64, got {t.dtype}")
    if offset.shape != seed.shape:
        raise ValueError(
            f"logitkit.philox_uniform: offset must have the shape of seed {list(seed.shape)}, got {list(offset.shape)}"
        )
    return seed.new_empty(seed.shape, dtype=torch.float32)
