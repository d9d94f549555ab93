"""MultiPrompt: several named prompts on one model at once, as in ruPrompts.

Each prompt gets its own prompt token (`<|[key]P|>`), so rows of one batch may use different
prompts; the patched embedding layer looks every token id up in its own provider.

    mp = MultiPrompt({"joke": "path/to/joke-prompt", "qa": Prompt.from_pretrained("path/to/qa")})
    mp.patch(model, tokenizer)
    mp("joke", "Заходит улитка в бар")           # the joke prompt's text for the model
    mp("qa", context="Трава зелёная.", question="Какая трава?")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from rugpt.errors import UsageError
from rugpt.prompts.embedding import PromptEmbedding
from rugpt.prompts.format import PromptFormat
from rugpt.prompts.prompt import Prompt, base_embedding
from rugpt.prompts.providers import BasePromptProvider


class MultiPrompt:
    """Named prompts sharing one model; `__call__(key, ...)` formats with the prompt of that key."""

    def __init__(self, prompts: Mapping[str, Prompt | str] | None = None):
        self.prompts: dict[str, Prompt] = {}
        self._model: nn.Module | None = None
        self._tokenizer = None
        for key, prompt in (prompts or {}).items():
            self.add_prompt(key, prompt)

    def add_prompt(self, key: str, prompt: Prompt | str) -> None:
        """Add a prompt (or the folder / hub id of one); on a patched model it takes effect at once."""
        if not key or not str(key).replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"prompt key {key!r} must be a non-empty name of letters, digits, '-' or '_'")
        if key in self.prompts:
            raise UsageError(f"a prompt with key {key!r} is already added; keys: {', '.join(self.prompts)}")
        prompt = Prompt.from_pretrained(prompt) if isinstance(prompt, str) else prompt
        prompt.format.set_key(key)
        self.prompts[key] = prompt
        if self._model is not None:
            self.patch(self._model, self._tokenizer)

    def __call__(self, key: str, text: str | Mapping[str, Any] | list | None = None, **fields: Any):
        return self._get(key)(text, **fields)

    def render(self, key: str, text: str) -> str:
        return self._get(key).render(text)

    @property
    def formats(self) -> dict[str, PromptFormat]:
        return {key: prompt.format for key, prompt in self.prompts.items()}

    @property
    def providers(self) -> dict[str, BasePromptProvider]:
        return {key: prompt.provider for key, prompt in self.prompts.items()}

    def patch(self, model: nn.Module, tokenizer) -> MultiPrompt:
        """Add every prompt's token to `tokenizer` and install one embedding layer serving them all."""
        if not self.prompts:
            raise UsageError("MultiPrompt has no prompts: add some with add_prompt(key, prompt)")
        base = base_embedding(model)
        by_token: dict[int, BasePromptProvider] = {}
        for prompt in self.prompts.values():
            prompt.initialize(model, tokenizer)
            [token_id] = prompt.format.add_tokens(tokenizer)
            by_token[token_id] = prompt.provider
        model.set_input_embeddings(PromptEmbedding(base, by_token))
        self._model, self._tokenizer = model, tokenizer
        return self

    def unpatch(self, model: nn.Module | None = None) -> None:
        model = model or self._model
        if model is not None:
            model.set_input_embeddings(base_embedding(model))
        self._model = self._tokenizer = None

    def _get(self, key: str) -> Prompt:
        if key not in self.prompts:
            raise UsageError(f"no prompt with key {key!r}; keys: {', '.join(self.prompts) or 'none'}")
        return self.prompts[key]
