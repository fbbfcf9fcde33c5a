"""Differences between the transformers 5.x releases hf_fastattn supports."""

from __future__ import annotations

import inspect


def cache_argument(model, cache) -> dict:
    """``{name: cache}`` for ``model``'s ``forward`` or ``generate``: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name is removed from ``forward`` in 5.40 and from ``generate`` in 6.0)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def output_cache(output):
    """The cache a model's output returns, under either name (see :func:`cache_argument`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
