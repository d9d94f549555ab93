"""Decode engines behind one interface (`DecodeEngine`): the transformers reference and the fast path."""

from __future__ import annotations

import logging
from enum import Enum

from rugpt.engines.base import DecodeEngine
from rugpt.errors import UsageError

log = logging.getLogger(__name__)


class EngineChoice(str, Enum):
    """Which engine decodes: `auto` takes the fastest one that runs the model exactly."""

    auto = "auto"
    transformers = "transformers"
    fast = "fast"  # the loaded model's own weights, shared: the same answers as transformers
    fast_bf16 = "fast-bf16"
    fast_int8 = "fast-int8"


def create_engine(loaded, choice: EngineChoice | str = EngineChoice.auto, max_rows: int = 16) -> DecodeEngine:
    """Build the chosen engine over a loaded model; `auto` falls back to transformers with a log line."""
    from rugpt.engines.fast import FastEngine, unsupported_reason
    from rugpt.engines.reference import TransformersEngine

    try:
        choice = EngineChoice(choice)
    except ValueError:
        allowed = ", ".join(c.value for c in EngineChoice)
        raise UsageError(f"engine={choice!r} is unknown; use one of {allowed}") from None
    model, context = loaded.model, loaded.context_length
    if choice == EngineChoice.transformers:
        return TransformersEngine(model, context, max_rows)
    if choice == EngineChoice.auto:
        reason = unsupported_reason(model)
        if reason:
            log.info("using the transformers engine: %s", reason)
            return TransformersEngine(model, context, max_rows)
        return FastEngine(model, context, max_rows, "fp32")
    weights = {EngineChoice.fast: "fp32", EngineChoice.fast_bf16: "bf16", EngineChoice.fast_int8: "int8"}[choice]
    return FastEngine(model, context, max_rows, weights)


__all__ = ["DecodeEngine", "EngineChoice", "create_engine"]
