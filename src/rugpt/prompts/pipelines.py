"""transformers pipelines that apply a trained prompt (ruprompts.pipelines): "text-generation-with-prompt" and
"text2text-generation-with-prompt". Importing rugpt.prompts registers them, as `import ruprompts` did.

    import rugpt.prompts
    from transformers import pipeline
    joke = pipeline("text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_joke")
    joke("Заходит улитка в бар")
    qa = pipeline("text2text-generation-with-prompt", prompt="my-qa-prompt", model=model, tokenizer=tokenizer)
    qa(context="Трава зелёная.", question="Какая трава?")

Defaults as ruPrompts: 100 new tokens, sampling, and generation ends at token id 0 — the ruGPT-3
`<pad>` that ruPrompts' prompts learned to end with (and the bundled model's end of text); rugpt also
ends at the tokenizer's own end of text, and uses only that one where id 0 is an ordinary token.
Without a model, transformers loads ruGPT-3 Large; `rugpt.prompts.pipeline` loads the prompt's own model.
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
DEFAULT_MODEL = ("ai-forever/rugpt3large_based_on_gpt2", "main")  # the model of ruPrompts' published prompts


class PromptPipeline:
    """Loads the prompt (a Prompt, a folder or a hub id) and patches the pipeline's model and tokenizer."""

    default_generation_parameters: dict[str, Any] = {}

    def __init__(self, prompt: Prompt | str | os.PathLike, *args: Any, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        if kwargs.get("tokenizer") is None and model is not None and not isinstance(model, str):
            kwargs["tokenizer"] = _tokenizer_of(model)  # a pipeline built directly, as ruPrompts' examples do
        self.add_default_kwargs(kwargs)
        super().__init__(*args, **kwargs)
        if self.tokenizer.pad_token_id is None:  # batches are padded; GPT-2 tokenizers have no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.load_prompt_patch_model(prompt)
        if self.device.type == "cuda":
            self.model = self.model.to(self.device)

    def load_prompt_patch_model(self, prompt: Prompt | str | os.PathLike) -> None:
        self.prompt = prompt if isinstance(prompt, Prompt) else Prompt.from_pretrained(prompt)
        self.prompt.patch(self.model, self.tokenizer)

    def add_default_kwargs(self, kwargs: dict[str, Any]) -> None:
        for key, value in self.default_generation_parameters.items():
            kwargs.setdefault(key, value)
        if "eos_token_id" not in kwargs:
            kwargs["eos_token_id"] = default_eos_token_id(kwargs.get("tokenizer"))

    def _encode(self, model_text: str, shown_text: Any, kwargs: dict[str, Any]):
        inputs = super().preprocess(model_text, **kwargs)
        inputs["prompt_text"] = shown_text  # what return_full_text puts before the generated text
        return inputs


class TextGenerationWithPromptPipeline(PromptPipeline, TextGenerationPipeline):
    """Continues a text after the trained prompt (or inside its only field); returns the text and its
    continuation, as text-generation does. Alias: `transformers.pipeline('text-generation-with-prompt', ...)`."""

    default_generation_parameters = {"max_new_tokens": 100, "return_full_text": True, "do_sample": True}

    def __call__(self, text_inputs: Any = None, **kwargs: Any):
        if text_inputs is None and "text" in kwargs:  # ppln(text="...") as in ruPrompts' docs
            text_inputs = kwargs.pop("text")
        return super().__call__(text_inputs, **kwargs)

    def preprocess(self, input_text, **kwargs):
        if not isinstance(input_text, str):
            raise UsageError(f"{TEXT_GENERATION} takes a text, got {type(input_text).__name__}; for rows of fields "
                             f"use {TEXT2TEXT_GENERATION}")
        return self._encode(self.prompt.render(input_text), input_text, kwargs)


class Text2TextGenerationWithPromptPipeline(PromptPipeline, TextGenerationPipeline):
    """Fills the prompt's format with the given fields (keywords, a dict, a list of dicts, or a text for the
    only field) and returns only the generated answer.
    Alias: `transformers.pipeline('text2text-generation-with-prompt', ...)`."""

    default_generation_parameters = {"max_new_tokens": 100, "return_full_text": False, "do_sample": True}

    def __call__(self, inputs: Any = None, **kwargs: Any):
        fields = {name: kwargs.pop(name) for name in self.prompt.format.fields if name in kwargs}
        if inputs is None and not fields and isinstance(kwargs.get("text"), str):
            inputs = kwargs.pop("text")  # ppln(text="...") for a format whose one field has another name
        if fields and inputs is not None:
            raise UsageError("give the fields either as keywords or as the first argument, not both")
        if inputs is None and not fields:
            raise UsageError(f"no input: give the fields {', '.join(self.prompt.format.fields)} as keywords")
        return super().__call__(inputs if inputs is not None else fields, **kwargs)

    def preprocess(self, inputs, **kwargs):
        text = self.prompt.render(inputs) if isinstance(inputs, str) else self.prompt(inputs)
        return self._encode(text, text, kwargs)


def default_eos_token_id(tokenizer) -> int | list[int]:
    """ruPrompts' end of generation, id 0, where id 0 is a special token; plus the tokenizer's own end of text."""
    if tokenizer is None:
        return 0
    ids = [0] if 0 in tokenizer.all_special_ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids[0] if len(ids) == 1 else ids or 0


def _tokenizer_of(model):
    from transformers import AutoTokenizer

    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"no tokenizer given and none found for the model ({name!r}): pass tokenizer=... "
                         f"({str(exc).splitlines()[0]})") from None


def register() -> None:
    """Make the two tasks known to `transformers.pipeline` (done once, on import)."""
    for task, cls in ((TEXT_GENERATION, TextGenerationWithPromptPipeline),
                      (TEXT2TEXT_GENERATION, Text2TextGenerationWithPromptPipeline)):
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is not cls:
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=cls, pt_model=AutoModelForCausalLM,
                                                default={"model": DEFAULT_MODEL}, type="text")


def pipeline(task: str, prompt: Prompt | str | os.PathLike, model=None, tokenizer=None, **kwargs):
    """`transformers.pipeline` for the prompt tasks (rugpt); without a model, loads the one named in the prompt's
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
