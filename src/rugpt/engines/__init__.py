"""Decode engines behind one interface (`DecodeEngine`): the transformers reference, the fast path, llama.cpp.

`EngineChoice` is the one list of engine names, each with its description: `rugpt generate --engine`,
`rugpt serve --engine`, `ServerSettings.engine` and `Generator(engine=...)` all take their names and help
from it. Importing this module imports no torch (the engines themselves load on use).
"""

from __future__ import annotations

import importlib
import logging
from enum import Enum
from typing import TYPE_CHECKING

from rugpt.errors import UsageError

if TYPE_CHECKING:
    from rugpt.engines.base import DecodeEngine

log = logging.getLogger(__name__)


class EngineChoice(str, Enum):
    """Which engine decodes: `auto` takes the fastest one that runs the model exactly.

    A member is `name = "value", "description"`; the description is the engine's help text everywhere.
    """

    description: str

    def __new__(cls, value: str, description: str = ""):
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    auto = "auto", "fast where it runs the model, else transformers; a GGUF file runs on llama.cpp"
    transformers = "transformers", "transformers' own forward pass (the reference)"
    fast = "fast", "rugpt's compiled decode step over the loaded fp32 weights, shared: transformers' answers"
    # weights converted once at start; fp16 (fbgemm) reads fastest of the 16-bit formats on an x86 CPU
    fast_bf16 = "fast-bf16", "the fast step with weights converted to bf16 once at start"
    fast_fp16 = "fast-fp16", "the fast step with weights converted to fp16 once at start"
    fast_int8 = "fast-int8", "the fast step with weights quantized to int8 once at start"
    fast_q4 = "fast-q4", "the fast step with weights quantized to 4 bits (blocks of 64, scale and minimum) at start"
    # llama.cpp over the checkpoint converted to GGUF (optional extra `rugpt[llamacpp]`); no trained prompts
    llamacpp_f32 = "llamacpp-f32", "llama.cpp over the model converted to GGUF f32 (extra rugpt[llamacpp])"
    llamacpp_f16 = "llamacpp-f16", "llama.cpp over GGUF f16"
    llamacpp_q8 = "llamacpp-q8", "llama.cpp over GGUF q8_0"


def describe_engines() -> str:
    """Every engine name with its description, for help texts."""
    return "; ".join(f"{c.value}: {c.description}" if c.description else c.value for c in EngineChoice)


def __getattr__(name: str):
    if name == "DecodeEngine":  # imported on first use: it needs torch, the list of names above does not
        return importlib.import_module("rugpt.engines.base").DecodeEngine
    raise AttributeError(f"module 'rugpt.engines' has no attribute {name!r}")


LLAMACPP_TYPES = {EngineChoice.llamacpp_f32: "f32", EngineChoice.llamacpp_f16: "f16", EngineChoice.llamacpp_q8: "q8_0"}


def embeddings_patched(model) -> bool:
    """Whether the input embeddings are replaced (a trained prompt): only engines with `accepts_embeds` fit."""
    import torch

    return type(model.get_input_embeddings()) is not torch.nn.Embedding


def prompt_patched(loaded) -> bool:
    """Whether `loaded` carries a trained prompt; a GGUF model whose torch module was never built has none.

    Asking never builds that module: a GGUF model generating on llama.cpp must not dequantize its file.
    """
    if not getattr(loaded, "model_built", True):
        return False
    return embeddings_patched(loaded.model)


def parse_engine(choice: EngineChoice | str) -> EngineChoice:
    """The engine named by `choice`, or a UsageError listing the names allowed."""
    try:
        return EngineChoice(choice)
    except ValueError:
        allowed = ", ".join(c.value for c in EngineChoice)
        raise UsageError(f"engine={choice!r} is unknown; use one of {allowed}") from None


def create_engine(loaded, choice: EngineChoice | str = EngineChoice.auto, max_rows: int = 16) -> DecodeEngine:
    """Build the chosen engine over a loaded model; `auto` falls back to transformers with a log line."""
    engine = _build_engine(loaded, parse_engine(choice), max_rows)
    # Padded embedding rows past the tokenizer's vocabulary are never sampled (rugpt.special_tokens).
    engine.sampleable_vocab = min(engine.vocab_size, getattr(loaded, "sampleable_vocab", None) or engine.vocab_size)
    return engine


def _build_engine(loaded, choice: EngineChoice, max_rows: int) -> DecodeEngine:
    from rugpt.engines.fast import FastEngine, unsupported_reason
    from rugpt.engines.reference import TransformersEngine

    if getattr(loaded, "gguf_path", None) is not None:
        engine = _gguf_engine(loaded, choice, max_rows)
        if engine is not None:
            return engine
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
               EngineChoice.fast_int8: "int8", EngineChoice.fast_q4: "q4"}[choice]
    return FastEngine(model, context, max_rows, weights)


def _gguf_engine(loaded, choice: EngineChoice, max_rows: int) -> DecodeEngine | None:
    """llama.cpp over a GGUF model's own file, for `auto` and the llama.cpp engines; None for the torch engines.

    The torch engines (transformers, fast*) run the model dequantized from the file, as asked; so does
    any engine once a trained prompt is patched in, as llama.cpp cannot take its embeddings.
    """
    if choice != EngineChoice.auto and choice not in LLAMACPP_TYPES:
        log.info("engine %s runs a torch model dequantized from %s (llama.cpp would run the file as it is)",
                 choice.value, loaded.gguf_path)
        return None
    if prompt_patched(loaded):
        log.info("running the torch model dequantized from %s: llama.cpp cannot take a trained prompt's "
                 "embeddings", loaded.gguf_path)
        return None
    from rugpt.engines.llamacpp import create_gguf_engine

    return create_gguf_engine(loaded, LLAMACPP_TYPES.get(choice), max_rows)


__all__ = ["DecodeEngine", "EngineChoice", "create_engine", "describe_engines", "embeddings_patched", "parse_engine",
           "prompt_patched"]
