"""Prompt tuning with ruPrompts' API: code written for ruprompts 0.1.4 runs with its imports changed,
`ruprompts` → `rugpt.prompts` (module by module: prompt_format, prompt_provider, prompt, prompt_embedding,
preprocessing, pipelines, callbacks).

    from rugpt.prompts import Prompt, PromptFormat, TensorPromptProvider
    prompt = Prompt(PromptFormat("<P*4>{passage}<P*4>{question}<P*4>"), TensorPromptProvider())
    prompt.patch(model, tokenizer)

Importing the package registers the "text-generation-with-prompt" and "text2text-generation-with-prompt"
pipeline tasks, as `import ruprompts` did. rugpt's additions (training loop, PEFT export, MLP provider)
are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from rugpt.prompts.errors import MissingFieldError, PromptKeyError, PromptTypeError, PromptUsageError
from rugpt.prompts.pipelines import (
    Text2TextGenerationWithPromptPipeline,
    TextGenerationWithPromptPipeline,
    pipeline,
)
from rugpt.prompts.preprocessing import ClassificationPreprocessor, Text2TextPreprocessor
from rugpt.prompts.prompt import MultiPrompt, Prompt, PromptConfig
from rugpt.prompts.prompt_embedding import PromptEmbedding
from rugpt.prompts.prompt_format import PROMPT_TOKEN, PromptFormat
from rugpt.prompts.prompt_provider import (
    BasePromptProvider,
    LSTMPromptProvider,
    MLPPromptProvider,
    ProviderInit,
    TensorPromptProvider,
)
from rugpt.prompts.storage import SavedPrompt

_LAZY = {
    "PromptTuningResult": "training",
    "PromptTuningSettings": "training",
    "TaskKind": "training",
    "prompt_tune": "training",
}

__all__ = [
    # ruPrompts' top-level names
    "LSTMPromptProvider", "MultiPrompt", "Prompt", "PromptFormat", "TensorPromptProvider",
    "Text2TextGenerationWithPromptPipeline", "Text2TextPreprocessor", "TextGenerationWithPromptPipeline",
    # rugpt's additions
    "BasePromptProvider", "ClassificationPreprocessor", "MLPPromptProvider", "MissingFieldError", "PROMPT_TOKEN",
    "PromptConfig", "PromptEmbedding", "PromptKeyError", "PromptTypeError", "PromptUsageError", "ProviderInit",
    "SavedPrompt", "pipeline",
    "PromptTuningResult", "PromptTuningSettings", "TaskKind", "prompt_tune",  # imported on first use
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'rugpt.prompts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rugpt.prompts.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
