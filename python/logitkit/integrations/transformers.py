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
"""

from __future__ import annotations

import functools

from ..sampling import top_h as _top_h

# The number of largest logits rules "hf" and "official" consider when no cap is given
# (transformers' ``TopHLogitsWarper.top_n``; the C++ default of ``cap=-1``).
_DEFAULT_CAP = 100

# The classes are created on first access (module __getattr__), so that importing this module
# does not import transformers; linters cannot see them.
__all__ = ["OfficialTopHLogitsWarper", "TopHLogitsWarper"]  # noqa: F822


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

    return {"TopHLogitsWarper": TopHLogitsWarper, "OfficialTopHLogitsWarper": OfficialTopHLogitsWarper}


def __getattr__(name: str):
    if name in __all__:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
