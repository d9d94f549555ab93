"""Prompt tuning with the ruPrompts API: trainable prompt formats, providers, training, pipelines, sharing.

    from rugpt.prompts import Prompt, PromptFormat, TensorPromptProvider
    prompt = Prompt(format=PromptFormat("<P*4>{passage}<P*4>{question}<P*4>"), provider=TensorPromptProvider())
    prompt.patch(model, tokenizer)

Names are imported on first use, so `import rugpt.prompts` stays light; `pipeline` (and the pipeline
classes) register the "text-generation-with-prompt" and "text2text-generation-with-prompt" tasks.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PROMPT_TOKEN": "format",
    "MissingFieldError": "format",
    "PromptFormat": "format",
    "BasePromptProvider": "providers",
    "LSTMPromptProvider": "providers",
    "MLPPromptProvider": "providers",
    "ProviderInit": "providers",
    "TensorPromptProvider": "providers",
    "PromptEmbedding": "embedding",
    "Prompt": "prompt",
    "PromptConfig": "prompt",
    "SavedPrompt": "storage",
    "MultiPrompt": "multi",
    "ClassificationPreprocessor": "preprocessing",
    "Text2TextPreprocessor": "preprocessing",
    "PromptTuningResult": "training",
    "PromptTuningSettings": "training",
    "TaskKind": "training",
    "prompt_tune": "training",
    "Text2TextGenerationWithPromptPipeline": "pipelines",
    "TextGenerationWithPromptPipeline": "pipelines",
    "pipeline": "pipelines",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rugpt.prompts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rugpt.prompts.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
