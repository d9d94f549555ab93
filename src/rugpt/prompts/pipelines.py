"""transformers pipelines that apply a trained prompt: "text-generation-with-prompt" and
"text2text-generation-with-prompt" (ruPrompts' names). Importing this module registers them.

    from rugpt.prompts import pipeline
    joke = pipeline("text-generation-with-prompt", prompt="my-joke-prompt", model=model, tokenizer=tokenizer)
    joke("Заходит улитка в бар")
    qa = pipeline("text2text-generation-with-prompt", prompt="my-qa-prompt")   # model from the prompt's config
    qa(context="Трава зелёная.", question="Какая трава?")
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoModelForCausalLM, TextGenerationPipeline
from transformers import pipeline as transformers_pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from rugpt.errors import UsageError
from rugpt.prompts.prompt import Prompt

TEXT_GENERATION = "text-generation-with-prompt"
TEXT2TEXT_GENERATION = "text2text-generation-with-prompt"


class _PromptPipeline(TextGenerationPipeline):
    """Loads the prompt (a Prompt, a folder or a hub id) and patches the pipeline's model and tokenizer."""

    default_generation_parameters: dict[str, Any] = {}

    def __init__(self, *args, prompt: Prompt | str | os.PathLike, **kwargs):
        for key, value in self.default_generation_parameters.items():
            kwargs.setdefault(key, value)
        super().__init__(*args, **kwargs)
        if self.tokenizer.pad_token_id is None:  # batches are padded; GPT-2 tokenizers have no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompt = prompt if isinstance(prompt, Prompt) else Prompt.from_pretrained(prompt)
        self.prompt.patch(self.model, self.tokenizer)

    def _encode(self, model_text: str, shown_text: Any, kwargs: dict[str, Any]):
        inputs = super().preprocess(model_text, **kwargs)
        inputs["prompt_text"] = shown_text  # what return_full_text puts before the generated text
        return inputs


class TextGenerationWithPromptPipeline(_PromptPipeline):
    """Continues a text after the trained prompt (or inside its only field); returns the text and its
    continuation, as text-generation does."""

    default_generation_parameters = {"max_new_tokens": 100, "return_full_text": True, "do_sample": True}

    def preprocess(self, prompt_text, **kwargs):
        if not isinstance(prompt_text, str):
            raise UsageError(f"{TEXT_GENERATION} takes a text, got {type(prompt_text).__name__}; for rows of fields "
                             f"use {TEXT2TEXT_GENERATION}")
        return self._encode(self.prompt.render(prompt_text), prompt_text, kwargs)


class Text2TextGenerationWithPromptPipeline(_PromptPipeline):
    """Fills the prompt's format with the given fields (keywords, a dict, a list of dicts, or a text for the
    only field) and returns only the generated answer."""

    default_generation_parameters = {"max_new_tokens": 100, "return_full_text": False, "do_sample": True}

    def __call__(self, inputs: Any = None, **kwargs):
        fields = {name: kwargs.pop(name) for name in self.prompt.format.fields if name in kwargs}
        if fields and inputs is not None:
            raise UsageError("give the fields either as keywords or as the first argument, not both")
        if inputs is None and not fields:
            raise UsageError(f"no input: give the fields {', '.join(self.prompt.format.fields)} as keywords")
        return super().__call__(inputs if inputs is not None else fields, **kwargs)

    def preprocess(self, inputs, **kwargs):
        text = self.prompt.render(inputs) if isinstance(inputs, str) else self.prompt(inputs)
        return self._encode(text, text, kwargs)


def register() -> None:
    """Make the two tasks known to `transformers.pipeline` (done once, on import)."""
    for task, cls in ((TEXT_GENERATION, TextGenerationWithPromptPipeline),
                      (TEXT2TEXT_GENERATION, Text2TextGenerationWithPromptPipeline)):
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is not cls:
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=cls, pt_model=AutoModelForCausalLM, type="text")


def pipeline(task: str, prompt: Prompt | str | os.PathLike, model=None, tokenizer=None, **kwargs):
    """`transformers.pipeline` for the prompt tasks; without a model, loads the one named in the prompt's
    config (registry aliases and old sberbank-ai/ ids work) with rugpt's safe loader."""
    if task not in (TEXT_GENERATION, TEXT2TEXT_GENERATION):
        raise UsageError(f"task {task!r} is not a prompt pipeline; use {TEXT_GENERATION!r} or {TEXT2TEXT_GENERATION!r}")
    prompt = prompt if isinstance(prompt, Prompt) else Prompt.from_pretrained(prompt)
    if model is None:
        from rugpt.models import load

        loaded = load(prompt.config.pretrained_model_name)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    return transformers_pipeline(task, model=model, tokenizer=tokenizer, prompt=prompt, **kwargs)


register()
