"""Decode engines behind one interface (`DecodeEngine`): the transformers reference, the fast path, llama.cpp."""

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
    # weights converted once at start; fp16 (fbgemm) reads fastest of the 16-bit formats on an x86 CPU
    fast_bf16 = "fast-bf16"
    fast_fp16 = "fast-fp16"
    fast_int8 = "fast-int8"
    # llama.cpp over the checkpoint converted to GGUF (optional extra `rugpt[llamacpp]`); no trained prompts
    llamacpp_f32 = "llamacpp-f32"
    llamacpp_f16 = "llamacpp-f16"
    llamacpp_q8 = "llamacpp-q8"


LLAMACPP_TYPES = {EngineChoice.llamacpp_f32: "f32", EngineChoice.llamacpp_f16: "f16", EngineChoice.llamacpp_q8: "q8_0"}


def embeddings_patched(model) -> bool:
    """Whether the input embeddings are replaced (a trained prompt): only engines with `accepts_embeds` fit."""
    import torch

    return type(model.get_input_embeddings()) is not torch.nn.Embedding


def parse_engine(choice: EngineChoice | str) -> EngineChoice:
    """The engine named by `choice`, or a UsageError listing the names allowed."""
    try:
        return EngineChoice(choice)
    except ValueError:
        allowed = ", ".join(c.value for c in EngineChoice)
        raise UsageError(f"engine={choice!r} is unknown; use one of {allowed}") from None


def create_engine(loaded, choice: EngineChoice | str = EngineChoice.auto, max_rows: int = 16) -> DecodeEngine:
    """Build the chosen engine over a loaded model; `auto` falls back to transformers with a log line."""
    from rugpt.engines.fast import FastEngine, unsupported_reason
    from rugpt.engines.reference import TransformersEngine

    choice = parse_engine(choice)
    model, context = loaded.model, loaded.context_length
    if choice == EngineChoice.transformers:
        return TransformersEngine(model, context, max_rows)
    if choice in LLAMACPP_TYPES:
        if embeddings_patched(model):
            log.info("using the transformers engine: %s cannot take a trained prompt's embeddings", choice.value)
            return TransformersEngine(model, context, max_rows)
        from rugpt.engines.llamacpp import create_llamacpp_engine

        return create_llamacpp_engine(loaded, LLAMACPP_TYPES[choice], max_rows, choice.value)
    if choice == EngineChoice.auto:
        reason = unsupported_reason(model)
        if reason:
            log.info("using the transformers engine: %s", reason)
            return TransformersEngine(model, context, max_rows)
        return FastEngine(model, context, max_rows, "fp32")
    weights = {EngineChoice.fast: "fp32", EngineChoice.fast_bf16: "bf16", EngineChoice.fast_fp16: "fp16",
               EngineChoice.fast_int8: "int8"}[choice]
    return FastEngine(model, context, max_rows, weights)


__all__ = ["DecodeEngine", "EngineChoice", "create_engine", "embeddings_patched", "parse_engine"]
