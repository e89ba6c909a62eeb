"""Compatibility module: the row ops now live in :mod:`logitkit.row_ops`, Top-H
truncation and sampling in :mod:`logitkit.sampling`; import them from
``logitkit`` itself. ``logitkit.ops.<name>`` still resolves to the same
functions."""

from __future__ import annotations

from typing import Any

from . import row_ops, sampling


def __getattr__(name: str) -> Any:
    for module in (row_ops, sampling):
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
