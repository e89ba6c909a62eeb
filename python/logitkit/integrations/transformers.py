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
* ``MinPLogitsWarper``, ``EpsilonLogitsWarper``, ``EtaLogitsWarper``: drop-ins for
  transformers' warpers of the same names and arguments (``min_tokens_to_keep``,
  ``filter_value``), backed by :func:`logitkit.filter_logits`; ``TopNSigmaLogitsWarper(n)``
  and ``PLessLogitsWarper()`` for the rules transformers lacks (docs/sampling.md).
* ``FusedSamplingLogitsWarper(temperature=..., min_p=..., ...)``: the whole chain of
  :func:`logitkit.filter_logits` (temperature included) in one processor call; put it in
  place of transformers' temperature and truncation warpers.
"""

from __future__ import annotations

import functools

from ..filters import filter_logits as _filter_logits
from ..sampling import top_h as _top_h

# The number of largest logits rules "hf" and "official" consider when no cap is given
# (transformers' ``TopHLogitsWarper.top_n``; the C++ default of ``cap=-1``).
_DEFAULT_CAP = 100

# The classes are created on first access (module __getattr__), so that importing this module
# does not import transformers; linters cannot see them.
__all__ = [  # noqa: F822
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
    "FusedSamplingLogitsWarper",
    "MinPLogitsWarper",
    "OfficialTopHLogitsWarper",
    "PLessLogitsWarper",
    "TopHLogitsWarper",
    "TopNSigmaLogitsWarper",
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

    class MinPLogitsWarper(_ChainProcessor):
        """transformers' ``MinPLogitsWarper``: keeps p >= min_p * p_max."""

        def __init__(self, min_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, min_p=min_p)
            self.min_p = min_p

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
        """The whole chain in one call: temperature (0: greedy), min_p, top_n_sigma, p_less,
        epsilon, eta, each a number or a per-row tensor (docs/sampling.md). Replaces
        transformers' temperature warper too: the returned scores are the kept logits
        divided by the temperature (greedy rows: 0 for the kept tokens)."""

        def __init__(
            self,
            temperature=1.0,
            *,
            min_p=None,
            top_n_sigma=None,
            p_less=False,
            epsilon=None,
            eta=None,
            filter_value: float = -float("inf"),
            min_tokens_to_keep: int = 1,
        ):
            rules = dict(min_p=min_p, top_n_sigma=top_n_sigma, p_less=p_less, epsilon=epsilon, eta=eta)
            super().__init__(filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep, **rules)
            self.temperature = temperature

        def __call__(self, input_ids, scores):
            import torch

            kept = _filter_logits(
                scores,
                temperature=self.temperature,
                min_tokens_to_keep=self.min_tokens_to_keep,
                filter_value=self.filter_value,
                **self.rules,
            )
            t = self.temperature
            t = t.to(scores.dtype).unsqueeze(-1) if isinstance(t, torch.Tensor) else torch.tensor(float(t))
            greedy = t == 0
            scaled = torch.where(greedy, torch.zeros_like(kept), kept / torch.where(greedy, 1.0, t))
            return scaled.masked_fill(kept == self.filter_value, self.filter_value)

    return {
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
