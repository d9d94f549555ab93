"""Prompt: a PromptFormat and a provider; patches a model, saves, loads and shares (the ruPrompts API).

    prompt = Prompt(PromptFormat("<P*8>{text}<P*4>"), TensorPromptProvider())
    prompt.patch(model, tokenizer)          # trainable: prompt.parameters()
    prompt.save_pretrained("my-prompt")     # prompt.json + prompt_provider.safetensors
    prompt = Prompt.from_pretrained("my-prompt")   # or a hub id, or a folder saved by ruPrompts
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from rugpt.errors import UsageError
from rugpt.prompts.embedding import PromptEmbedding
from rugpt.prompts.format import PromptFormat
from rugpt.prompts.providers import BasePromptProvider, TensorPromptProvider
from rugpt.prompts.storage import SavedPrompt, push_folder, read_prompt_dir, resolve_prompt_dir, write_prompt_dir

log = logging.getLogger(__name__)


@dataclass
class PromptConfig:
    """What the prompt was trained for (ruPrompts' "config" in prompt.json)."""

    embedding_dim: int | None = None
    prompt_length: int | None = None
    pretrained_model_name: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PromptConfig:
        known = {f.name for f in fields(cls)}  # ruPrompts also wrote "is_safe", which means nothing here
        return cls(**{k: v for k, v in values.items() if k in known})


class Prompt:
    """A trainable prompt: where its tokens go (format) and what they are (provider)."""

    def __init__(self, format: PromptFormat | str, provider: BasePromptProvider | None = None,
                 config: PromptConfig | None = None):
        self.format = PromptFormat(format) if isinstance(format, str) else format
        self.provider = provider if provider is not None else TensorPromptProvider()
        self.config = config or PromptConfig()
        self.source: str | None = None  # where from_pretrained found it, for error messages
        self._model: nn.Module | None = None

    # --- text -------------------------------------------------------------------------------------------------

    def __call__(self, text: str | Mapping[str, Any] | list | None = None, return_ranges: bool = False,
                 **fields: Any):
        """Format a row: keyword fields, a dict, a list of dicts, or a plain `text` for the field "text"."""
        if isinstance(text, str):
            fields["text"] = text
            text = None
        return self.format(text if text is not None else fields, return_ranges=return_ranges)

    def render(self, text: str) -> str:
        """The model input for one user text: after the prompt when the format has no fields, in its only
        field, or — with several fields — from a JSON object holding them."""
        names = self.format.fields
        if not names:
            return self.format({}) + text
        if len(names) == 1:
            return self.format({names[0]: text})
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, dict):
            example = json.dumps({name: "..." for name in names}, ensure_ascii=False)
            raise UsageError(f"this prompt's format has fields {', '.join(names)}: give the text as a JSON object "
                             f"such as {example}")
        return self.format(values)

    # --- model ------------------------------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        return self.format.is_initialized and self.provider.is_initialized

    @property
    def is_attached(self) -> bool:
        return self._model is not None and isinstance(self._model.get_input_embeddings(), PromptEmbedding)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: the provider's, nothing of the model."""
        return self.provider.parameters()

    def patch(self, model: nn.Module, tokenizer) -> Prompt:
        """Add the prompt token to `tokenizer` and give `model` an input-embedding layer that puts the
        provider's rows at its positions. Works with `generate`, batches and padding; `unpatch` undoes it."""
        self.initialize(model, tokenizer)
        self.attach(model, tokenizer)
        return self

    def initialize(self, model: nn.Module, tokenizer) -> None:
        """Size the format and provider for this model (a loaded provider is checked instead)."""
        self.format.initialize(tokenizer)
        if not self.format.has_slots:
            raise UsageError(f"format {self.format.template!r} has no trainable slots: add <P*N> (or <P>) for the "
                             f"prompt tokens to tune")
        base = base_embedding(model)
        if self.provider.is_initialized:
            self.check_fits(base.embedding_dim, model_label(model))
        else:
            self.provider.initialize(self.format.prompt_length, base, self.format.init_tokens, tokenizer)
        self.provider.to(base.weight.device)
        self.config = PromptConfig(base.embedding_dim, self.format.prompt_length, model_label(model))

    def check_fits(self, embedding_dim: int, model_name: str | None = None) -> None:
        """Raise UsageError when the provider was made for another hidden size or another number of tokens."""
        if self.provider.embedding_dim != embedding_dim:
            trained_for = self.config.pretrained_model_name
            raise UsageError(
                f"{self._name()} was trained for a model of hidden size {self.provider.embedding_dim}"
                f"{f' ({trained_for})' if trained_for else ''}, but this model"
                f"{f' ({model_name})' if model_name else ''} has hidden size {embedding_dim}: load the model it "
                f"was trained for, or train a prompt for this one with `rugpt prompt-tune`")
        self._check_length()

    def _check_length(self) -> None:
        if self.provider.prompt_length != self.format.prompt_length:
            raise UsageError(f"{self._name()} has {self.provider.prompt_length} trained rows but its format "
                             f"{self.format.template!r} places {self.format.prompt_length} prompt tokens")

    def _name(self) -> str:
        return f"prompt {self.source!r}" if self.source else "this prompt"

    def attach(self, model: nn.Module, tokenizer) -> None:
        if not self.is_initialized:
            raise UsageError("the prompt must be initialised for a model before it is attached: call patch()")
        [token_id] = self.format.add_tokens(tokenizer)
        base = base_embedding(model)
        if isinstance(model.get_input_embeddings(), PromptEmbedding):
            log.info("model already had a prompt; replacing it")
        model.set_input_embeddings(PromptEmbedding(base, {token_id: self.provider}))
        self._model = model

    def unpatch(self, model: nn.Module | None = None) -> None:
        """Put the model's original input-embedding module back (the prompt token stays in the tokenizer)."""
        model = model or self._model
        if model is not None:
            model.set_input_embeddings(base_embedding(model))
        self._model = None

    detach = unpatch  # ruPrompts' name

    # --- files ------------------------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        if not self.is_initialized:
            raise UsageError("the prompt must be initialised (patch it onto a model) before it is saved")
        return {"format": self.format.as_dict(), "config": asdict(self.config), "provider": self.provider.as_dict()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> SavedPrompt:
        """Write prompt.json and prompt_provider.safetensors to a folder; returns the folder and file sizes."""
        return write_prompt_dir(Path(save_directory), self.as_dict(), self.provider)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> Prompt:
        """Load a prompt from a folder (rugpt's or ruPrompts' layout) or a hub id; LSTM and MLP providers come
        back as themselves, trainable further."""
        folder = resolve_prompt_dir(name_or_path)
        spec, provider = read_prompt_dir(folder)
        prompt_format = PromptFormat(spec["format"]["template"], spec["format"].get("compiled_template"))
        prompt = cls(prompt_format, provider, PromptConfig.from_dict(spec.get("config") or {}))
        prompt.source = str(name_or_path)
        prompt._check_length()
        return prompt

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload trained prompt") -> str:
        """Save to a temporary folder and upload it to a hub model repository; returns the repository URL."""
        with tempfile.TemporaryDirectory() as tmp:
            saved = self.save_pretrained(Path(tmp) / "prompt")
            return push_folder(saved.path, repo_id, private, token, commit_message)

    def __repr__(self) -> str:
        return f"Prompt({self.format!r}, {type(self.provider).__name__}, tokens={self.format.prompt_length})"


def base_embedding(model: nn.Module) -> nn.Embedding:
    """The model's own input-embedding module, under any prompt patch."""
    layer = model.get_input_embeddings()
    return layer.base if isinstance(layer, PromptEmbedding) else layer


def model_label(model: nn.Module) -> str | None:
    """A portable name of the model for prompt.json: its registry alias or hub id, not a local path."""
    from rugpt.models import BUNDLED_DIR

    name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if name and Path(name).expanduser().resolve() == BUNDLED_DIR.resolve():
        return "bundled"
    return name
