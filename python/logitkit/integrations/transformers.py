"""transformers LogitsProcessors backed by logitkit's Top-H kernels.

transformers is an optional dependency (``pip install logitkit[transformers]``);
it is imported only when a processor class is first accessed.

* ``TopHLogitsWarper(top_h)``: drop-in replacement of transformers' own
  ``TopHLogitsWarper(top_h=alpha)`` (rule "hf"). Like theirs it runs after the
  temperature warper in the chain, so it sees ``logits / T`` and uses
  temperature 1 itself.
* ``OfficialTopHLogitsWarper(top_h, temperature)``: the authors' reference
  processor (rule "official"), which runs before temperature and takes it as
  an argument.
* ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``, ``TypicalLogitsWarper``,
  ``EpsilonLogitsWarper``, ``EtaLogitsWarper``:
  drop-ins for transformers' warpers of the same names and arguments (``min_tokens_to_keep``,
  ``filter_value``), backed by :func:`logitkit.filter_logits`; ``TopNSigmaLogitsWarper(n)``,
  ``PLessLogitsWarper()`` and ``EDTLogitsWarper(theta)`` (entropy-adaptive temperature) for
  the rules transformers lacks (docs/sampling.md).
* ``MirostatLogitsWarper(tau, eta)``: Mirostat v2 inside ``generate()``, keeping each
  sequence's ``mu`` across steps (docs/sampling.md).
* ``FusedSamplingLogitsWarper(temperature=..., top_k=..., min_p=..., ...)``: the whole chain of
  :func:`logitkit.filter_logits` (temperature included) in one processor call; put it in
  place of transformers' temperature and truncation warpers.
"""

from __future__ import annotations

import functools
from typing import Any

from ..filters import filter_logits as _filter_logits
from ..filters import rules_given as _rules_given
from ..sampling import mirostat_epsilon as _mirostat_epsilon
from ..sampling import mirostat_update as _mirostat_update
from ..sampling import top_h as _top_h

# The number of largest logits rules "hf" and "official" consider when no cap is given
# (transformers' ``TopHLogitsWarper.top_n``; the C++ default of ``cap=-1``).
_DEFAULT_CAP = 100

# The classes are created on first access (module __getattr__), so that importing this module
# does not import transformers; linters cannot see them.
__all__ = [  # noqa: F822
    "EDTLogitsWarper",
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
    "FusedSamplingLogitsWarper",
    "MinPLogitsWarper",
    "MirostatLogitsWarper",
    "OfficialTopHLogitsWarper",
    "PLessLogitsWarper",
    "TopHLogitsWarper",
    "TopKLogitsWarper",
    "TopNSigmaLogitsWarper",
    "TopPLogitsWarper",
    "TypicalLogitsWarper",
]


@functools.cache
def _classes() -> dict:
    try:
        from transformers import LogitsProcessor
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "logitkit.integrations.transformers needs transformers: pip install 'logitkit[transformers]'"
        ) from exc

    class _TopHProcessor(LogitsProcessor):
        def __init__(self, alpha, *, rule, temperature, cap, filter_value):
            if not (0 < alpha <= 1):
                raise ValueError(f"top_h (alpha) must be in (0, 1], got {alpha}")
            self.alpha = float(alpha)
            self.rule = rule
            self.temperature = float(temperature)
            self.cap = cap
            self.filter_value = float(filter_value)

        # transformers' attribute names: ``top_h`` is alpha, ``top_n`` the number of largest
        # logits the rule looks at (our ``cap``; 100 unless set), both readable and settable.
        @property
        def top_h(self) -> float:
            return self.alpha

        @top_h.setter
        def top_h(self, value: float) -> None:
            if not (0 < value <= 1):
                raise ValueError(f"top_h (alpha) must be in (0, 1], got {value}")
            self.alpha = float(value)

        @property
        def top_n(self) -> int:
            return _DEFAULT_CAP if self.cap is None else int(self.cap)

        @top_n.setter
        def top_n(self, value: int) -> None:
            if int(value) < 1:
                raise ValueError(f"top_n (cap) must be >= 1, got {value}")
            self.cap = int(value)

        def __call__(self, input_ids, scores):
            return _top_h(
                scores,
                self.alpha,
                temperature=self.temperature,
                rule=self.rule,
                cap=self.cap,
                filter_value=self.filter_value,
            )

    class TopHLogitsWarper(_TopHProcessor):
        """Rule "hf": keeps the same tokens as ``transformers.TopHLogitsWarper(top_h)``
        on tie-free inputs (ties: lower index first)."""

        def __init__(self, top_h: float, filter_value: float = -float("inf"), cap: int | None = None):
            super().__init__(top_h, rule="hf", temperature=1.0, cap=cap, filter_value=filter_value)

    class OfficialTopHLogitsWarper(_TopHProcessor):
        """Rule "official": softmax(z / temperature) over the full vocabulary, top
        100, unnormalised entropy budget. Place it before the temperature warper."""

        def __init__(
            self, top_h: float, temperature: float = 1.0, filter_value: float = -float("inf"), cap: int | None = None
        ):
            super().__init__(top_h, rule="official", temperature=temperature, cap=cap, filter_value=filter_value)

    classes = {"TopHLogitsWarper": TopHLogitsWarper, "OfficialTopHLogitsWarper": OfficialTopHLogitsWarper}
    classes.update(_row_statistics_classes(LogitsProcessor))
    return classes


def _row_statistics_classes(base: type) -> dict:
    """The processors of the row-statistics rules (docs/sampling.md), subclasses of ``base``."""

    class _ChainProcessor(base):
        def __init__(self, *, filter_value: float, min_tokens_to_keep: int, **rules):
            if (
                isinstance(min_tokens_to_keep, bool)
                or not isinstance(min_tokens_to_keep, int)
                or min_tokens_to_keep < 1
            ):
                raise ValueError(f"`min_tokens_to_keep` has to be a positive integer, but is {min_tokens_to_keep}")
            self.rules = rules
            self.filter_value = float(filter_value)
            self.min_tokens_to_keep = min_tokens_to_keep

        def __call__(self, input_ids, scores):
            return _filter_logits(
                scores, min_tokens_to_keep=self.min_tokens_to_keep, filter_value=self.filter_value, **self.rules
            )

    class TopKLogitsWarper(_ChainProcessor):
        """transformers' ``TopKLogitsWarper``: keeps the tokens whose score reaches the k-th
        largest, k = max(top_k, min_tokens_to_keep) (ties at the k-th kept)."""

        def __init__(self, top_k: int, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
                raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k}")
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, top_k=top_k)
            self.top_k = max(top_k, min_tokens_to_keep)

    class TopPLogitsWarper(_ChainProcessor):
        """transformers' ``TopPLogitsWarper``: keeps the most probable tokens until their mass
        reaches top_p (the token that reaches it included; ties of it kept), at least
        ``min_tokens_to_keep``. Accepts top_p in [0, 1] like transformers; 0 keeps the most
        probable token (and its ties), as transformers keeps its top ``min_tokens_to_keep``."""

        def __init__(self, top_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            top_p = float(top_p)
            if not (0.0 <= top_p <= 1.0):
                raise ValueError(f"`top_p` has to be a float > 0 and < 1, but is {top_p}")
            # logitkit's range is (0, 1]: the smallest positive float32 keeps the same set as 0
            # (the first token's mass already reaches top_p * s).
            kernel_top_p = max(top_p, 2.0**-149)
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, top_p=kernel_top_p)
            self.top_p = top_p

    class MinPLogitsWarper(_ChainProcessor):
        """transformers' ``MinPLogitsWarper``: keeps p >= min_p * p_max."""

        def __init__(self, min_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, min_p=min_p)
            self.min_p = min_p

    class TypicalLogitsWarper(_ChainProcessor):
        """transformers' ``TypicalLogitsWarper`` (locally typical sampling, Meister et al.):
        keeps the tokens closest to the entropy, |-log p - H(p)|, until their mass reaches
        ``mass`` (the token that reaches it included; ties of it kept), at least
        ``min_tokens_to_keep`` of the closest. Same range as transformers: 0 < mass < 1."""

        def __init__(self, mass: float = 0.9, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            mass = float(mass)
            if not (0.0 < mass < 1.0):
                raise ValueError(f"`typical_p` has to be a float > 0 and < 1, but is {mass}")
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, typical_p=mass)
            self.mass = mass

    class EpsilonLogitsWarper(_ChainProcessor):
        """transformers' ``EpsilonLogitsWarper``: keeps p >= epsilon."""

        def __init__(self, epsilon: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, epsilon=epsilon)
            self.epsilon = epsilon

    class EtaLogitsWarper(_ChainProcessor):
        """transformers' ``EtaLogitsWarper``: keeps p >= min(epsilon, sqrt(epsilon) exp(-H(p)))
        (transformers calls eta ``epsilon``). The ``device`` argument is accepted and unused."""

        def __init__(
            self, epsilon: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1, device: str = "cpu"
        ):
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, eta=epsilon)
            self.epsilon = epsilon

    class TopNSigmaLogitsWarper(_ChainProcessor):
        """Top-nσ: keeps z >= max z - n * std(z) (population std of the finite scores)."""

        def __init__(self, n: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, top_n_sigma=n)
            self.n = n

    class PLessLogitsWarper(_ChainProcessor):
        """p-less: keeps p >= sum p^2."""

        def __init__(self, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, p_less=True)

    class FusedSamplingLogitsWarper(_ChainProcessor):
        """The whole chain in one call: temperature (0: greedy; entropy-adaptive with
        ``edt_theta``), top_h (transformers' TopHLogitsWarper, first; a number, with one
        temperature for all rows), top_k, top_p, min_p, top_n_sigma, p_less, typical_p, epsilon, eta, each a number or
        a per-row tensor, in transformers' order (docs/sampling.md: one kernel call, and one more
        for each epsilon / eta after min-p, top-n-sigma, p-less, typical or each other). Replaces
        transformers' temperature warper too: the
        returned scores are the kept logits divided by the row's temperature (greedy rows: 0 for
        the kept tokens)."""

        def __init__(
            self,
            temperature=1.0,
            *,
            top_k=None,
            top_p=None,
            min_p=None,
            top_n_sigma=None,
            p_less=False,
            epsilon=None,
            eta=None,
            typical_p=None,
            top_h=None,
            edt_theta=None,
            edt_base=None,
            filter_value: float = -float("inf"),
            min_tokens_to_keep: int = 1,
        ):
            rules = dict(top_k=top_k, top_p=top_p, min_p=min_p, top_n_sigma=top_n_sigma, p_less=p_less)
            rules.update(epsilon=epsilon, eta=eta, typical_p=typical_p)
            top_h_alone = top_h is not None and not _rules_given(rules.values())
            if top_h is not None:  # transformers' TopHLogitsWarper (rule "hf"), first in the chain
                rules.update(top_h=top_h)
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, **rules)
            if top_h_alone:  # Top-H has no min_tokens_to_keep: generate() ignores it there, as here
                self.min_tokens_to_keep = 1
            self.temperature = temperature
            self.edt_theta, self.edt_base = edt_theta, edt_base

        def __call__(self, input_ids, scores):
            import torch

            from ..filters import _edt_temperature

            t = self.temperature
            if self.edt_theta is not None:
                t = _edt_temperature(scores, t, self.edt_theta, self.edt_base, "FusedSamplingLogitsWarper")
            kept = _filter_logits(
                scores,
                temperature=t,
                min_tokens_to_keep=self.min_tokens_to_keep,
                filter_value=self.filter_value,
                **self.rules,
            )
            t = t.to(scores.dtype).unsqueeze(-1) if isinstance(t, torch.Tensor) else torch.tensor(float(t))
            greedy = t == 0
            scaled = torch.where(greedy, torch.zeros_like(kept), kept / torch.where(greedy, 1.0, t))
            return scaled.masked_fill(kept == self.filter_value, self.filter_value)

    class EDTLogitsWarper(FusedSamplingLogitsWarper):
        """Entropy-based dynamic temperature (Zhang et al. 2024) in place of transformers'
        temperature warper: scores / T with T = temperature * base^(theta / H), H the entropy of
        softmax(scores) per row."""

        def __init__(self, theta: float, base: float = 0.8, temperature: float = 1.0):
            super().__init__(temperature, edt_theta=theta, edt_base=base)

    class MirostatLogitsWarper(base):
        """Mirostat v2 (Basu et al. 2021) as the last warper of ``generate()``: keeps the tokens
        of surprise -log2 p <= mu (p = softmax of the incoming scores, i.e. after transformers'
        temperature warper), and updates each row's ``mu`` from the token ``generate`` drew, which
        it reads from ``input_ids`` at the next call: mu <- mu - eta (-log2 q(token) - tau), q the
        kept distribution it returned. ``mu`` starts at 2 tau and restarts when a new sequence
        begins (``input_ids`` not one token longer than at the last call, or another batch size)
        or after :meth:`reset`. Holds the returned scores until the next call (one batch x vocab
        tensor); it must be the last processor, so that the scores it returned are those sampled."""

        def __init__(self, tau: float = 5.0, eta: float = 0.1, filter_value: float = -float("inf")):
            if not (0 < tau < float("inf")):
                raise ValueError(f"`tau` has to be a finite number > 0, but is {tau}")
            if not (0 <= eta < float("inf")):
                raise ValueError(f"`eta` has to be a finite number >= 0, but is {eta}")
            self.tau, self.eta, self.filter_value = float(tau), float(eta), float(filter_value)
            self.reset()

        def reset(self) -> None:
            self.mu: Any = None  # float32 (batch,) on the scores' device once a sequence started
            self._returned: Any = None  # (scores returned, their log-normaliser, input length)

        def __call__(self, input_ids, scores):
            import torch

            batch, length = scores.shape[0], input_ids.shape[-1]
            if self._returned is not None:
                returned, log_norm, last_length = self._returned
                if last_length + 1 == length and returned.shape[0] == batch:
                    token = input_ids[:, -1:].to(returned.device)
                    log_q = returned.gather(-1, token).squeeze(-1).float() - log_norm
                    self.mu = _mirostat_update(self.mu, log_q, self.tau, self.eta)
                else:
                    self.mu = None
            if self.mu is None:
                self.mu = torch.full((batch,), 2.0 * self.tau, device=scores.device)
            kept = _filter_logits(scores, epsilon=_mirostat_epsilon(self.mu), filter_value=self.filter_value)
            finite = kept.masked_fill(kept == self.filter_value, -float("inf"))
            self._returned = (kept, torch.logsumexp(finite.float(), dim=-1), length)
            return kept

    return {
        "TopKLogitsWarper": TopKLogitsWarper,
        "TopPLogitsWarper": TopPLogitsWarper,
        "TypicalLogitsWarper": TypicalLogitsWarper,
        "EDTLogitsWarper": EDTLogitsWarper,
        "MirostatLogitsWarper": MirostatLogitsWarper,
        "MinPLogitsWarper": MinPLogitsWarper,
        "EpsilonLogitsWarper": EpsilonLogitsWarper,
        "EtaLogitsWarper": EtaLogitsWarper,
        "TopNSigmaLogitsWarper": TopNSigmaLogitsWarper,
        "PLessLogitsWarper": PLessLogitsWarper,
        "FusedSamplingLogitsWarper": FusedSamplingLogitsWarper,
    }


def __getattr__(name: str):
    if name in __all__:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
