"""Prompt and MultiPrompt: a format and a provider that patch a model, save, load and share (ruprompts.prompt).

    prompt = Prompt(PromptFormat("<P*8>{text}<P*4>"), TensorPromptProvider())
    prompt.patch(model, tokenizer)          # = initialize(model, tokenizer) + attach(model, tokenizer)
    prompt.save_pretrained("my-prompt")     # prompt.json + prompt_provider.bin, as ruPrompts (+ .safetensors)
    prompt = Prompt.from_pretrained("my-prompt")   # or a hub id, a folder saved by ruPrompts, a PEFT adapter

The steps follow ruPrompts 0.1.4: `initialize` sizes the format and the provider for the model (a loaded
prompt is already initialized), `attach` adds the prompt token to the tokenizer and swaps the model's
input-embedding module; a step out of order raises UserWarning (PromptUsageError is one). A prompt that
is initialized can be saved whether or not it is attached.

rugpt adds: `unpatch` (the original embedding module comes back), `render`, `parameters`, a check that a
loaded prompt fits the model's hidden size, `save_peft_adapter` (docs/prompt_tuning.md), and MultiPrompt
batches whose rows use different prompts.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rugpt.errors import UsageError
from rugpt.prompts.errors import PromptKeyError, PromptTypeError, PromptUsageError
from rugpt.prompts.peft_adapter import write_peft_dir
from rugpt.prompts.prompt_embedding import (
    BasePromptEmbedding,
    MultiPromptEmbedding,
    PromptEmbedding,
    PromptEmbeddingSafe,
)
from rugpt.prompts.prompt_format import BasePromptFormat, PromptFormat, PromptFormatSafe
from rugpt.prompts.prompt_provider import BasePromptProvider, TensorPromptProvider
from rugpt.prompts.storage import SavedPrompt, push_folder, read_prompt_dir, resolve_prompt_dir, write_prompt_dir

log = logging.getLogger(__name__)

PROMPT_PROVIDER_FILE_NAME = "prompt_provider.bin"
PROMPT_FILE_NAME = "prompt.json"


@dataclass
class PromptConfig:
    """What the prompt was trained for ("config" in prompt.json)."""

    embedding_dim: int | None = None
    prompt_length: int | None = None
    pretrained_model_name: str | None = None
    is_safe: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PromptConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class PromptContext:
    is_initialized: bool = False
    is_attached: bool = False
    model: Any = None
    tokenizer: Any = None
    embedding: BasePromptEmbedding | None = None


class Prompt:
    """A trainable prompt: where its tokens go (format) and what they are (provider).

    Args:
        format: a prompt format (rugpt also takes its template as a string).
        provider: a prompt provider (rugpt: default TensorPromptProvider()).
        config: what the prompt was trained for; filled by `initialize`.
    """

    def __init__(self, format: BasePromptFormat | str, provider: BasePromptProvider | None = None,
                 config: PromptConfig | None = None):
        format = PromptFormat(format) if isinstance(format, str) else format
        if not isinstance(format, BasePromptFormat):
            raise PromptTypeError(f"format must be a PromptFormat, got {type(format).__name__}")
        provider = TensorPromptProvider() if provider is None else provider
        if not isinstance(provider, nn.Module):
            raise PromptTypeError(f"provider must be a prompt provider (an nn.Module), got {type(provider).__name__}")
        self.format = format
        self.provider = provider
        self.config = config if config is not None else PromptConfig()
        self.ctx = PromptContext()
        self.source: str | None = None  # where from_pretrained found it, for error messages

    # --- text -------------------------------------------------------------------------------------------------

    def __call__(self, text: str | Mapping[str, Any] | list | None = None, return_ranges: bool = False,
                 **kwargs: Any):
        """Format a row: keyword fields (`text=` among them), a dict, or a list of dicts."""
        if isinstance(text, str):
            kwargs["text"] = text
            text = None
        return self.format(text if text is not None else kwargs, return_ranges=return_ranges)

    def render(self, text: str) -> str:
        """The model input for one user text (rugpt): after the prompt when the format has no fields, in its
        only field, or — with several fields — from a JSON object holding them."""
        names = getattr(self.format, "fields", ("text",))
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
        return self.ctx.is_initialized

    @property
    def is_attached(self) -> bool:
        return self.ctx.is_attached

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: the provider's, nothing of the model."""
        return self.provider.parameters()

    def patch(self, model: nn.Module, tokenizer) -> Prompt:
        """Apply the prompt to model and tokenizer: `initialize`, then `attach`. Works with `generate`,
        batches and padding; `unpatch` undoes it. Returns the prompt (ruPrompts: None)."""
        self.initialize(model, tokenizer)
        self.attach(model, tokenizer)
        return self

    def initialize(self, model: nn.Module, tokenizer) -> None:
        """Compile the format with `tokenizer` and build the provider for the model's embeddings (a loaded
        provider is checked to fit instead); fills `config`."""
        self.ctx.model, self.ctx.tokenizer = model, tokenizer
        self.format.initialize(tokenizer)
        if not self.format.prompt_length:
            raise UsageError(f"format {self.format.template!r} has no trainable slots: add <P*N> (or <P>) for the "
                             f"prompt tokens to tune")
        base = base_embedding(model)
        name = model_label(model)
        if self.provider.is_initialized:
            self.check_fits(base.embedding_dim, name)
        else:
            kwargs = {"prompt_length": self.format.prompt_length, "embedding_dim": base.embedding_dim,
                      "embedding": base, "init_tokens": self.format.init_tokens}
            if "tokenizer" in inspect.signature(self.provider.initialize).parameters:
                kwargs["tokenizer"] = tokenizer
            self.provider.initialize(**kwargs)
        self.provider.to(base.weight.device)
        self.config.pretrained_model_name = name
        self.config.prompt_length = self.format.prompt_length
        self.config.embedding_dim = base.embedding_dim
        self.ctx.is_initialized = True

    def attach(self, model: nn.Module, tokenizer) -> None:
        """Add the prompt token to `tokenizer` and give `model` the prompt-embedding layer."""
        if self.is_attached:
            self.detach()
        if not self.is_initialized:
            raise PromptUsageError("Prompt should be initialized to be attached: call prompt.initialize(model, "
                                   "tokenizer) first, or prompt.patch(model, tokenizer)")
        token_ids = self.format.add_tokens(tokenizer)
        base = base_embedding(model)
        if isinstance(model.get_input_embeddings(), BasePromptEmbedding):
            log.info("model already had a prompt; replacing it")
        layer = PromptEmbeddingSafe if isinstance(self.format, PromptFormatSafe) else PromptEmbedding
        self.provider.to(base.weight.device)
        self.ctx.embedding = layer(base, prompt_provider=self.provider, prompt_token_ids=token_ids)
        model.set_input_embeddings(self.ctx.embedding)
        self.ctx.model, self.ctx.tokenizer, self.ctx.is_attached = model, tokenizer, True

    def detach(self, model: nn.Module | None = None) -> None:
        """As ruPrompts: put `model`'s own embedding module back when a model is given; mark the prompt detached."""
        if model is not None:
            model.set_input_embeddings(base_embedding(model))
        self.ctx.is_attached = False

    def unpatch(self, model: nn.Module | None = None) -> None:
        """Put back the original input-embedding module of `model` or of the model the prompt was attached to
        (the prompt token stays in the tokenizer)."""
        self.detach(model if model is not None else self.ctx.model)
        self.ctx.embedding = None

    def check_fits(self, embedding_dim: int, model_name: str | None = None) -> None:
        """Raise UsageError when the provider was made for another hidden size or another number of tokens."""
        width = getattr(self.provider, "embedding_dim", None)
        if width is not None and width != embedding_dim:
            trained_for = self.config.pretrained_model_name
            raise UsageError(
                f"{self._name()} was trained for a model of hidden size {width}"
                f"{f' ({trained_for})' if trained_for else ''}, but this model"
                f"{f' ({model_name})' if model_name else ''} has hidden size {embedding_dim}: load the model it "
                f"was trained for, or train a prompt for this one with `rugpt prompt-tune`")
        self._check_length()

    def _check_length(self) -> None:
        rows = getattr(self.provider, "prompt_length", None)
        if rows is not None and self.format.is_initialized and rows != self.format.prompt_length:
            raise UsageError(f"{self._name()} has {rows} trained rows but its format {self.format.template!r} places "
                             f"{self.format.prompt_length} prompt tokens")

    def _name(self) -> str:
        return f"prompt {self.source!r}" if self.source else "this prompt"

    # --- files ------------------------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        if not self.is_initialized:
            raise PromptUsageError("Prompt should be initialized before serialization: call "
                                   "prompt.initialize(model, tokenizer) or prompt.patch(model, tokenizer) first")
        spec = {"format": self.format.as_dict(), "config": self.config.as_dict()}
        if getattr(self.provider, "kind", None) is not None:
            spec["provider"] = self.provider.as_dict()
        return spec

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False,
                        **kwargs: Any) -> SavedPrompt:
        """Save to a folder (created if needed; other files in it stay): prompt.json and prompt_provider.bin as
        ruPrompts writes them, plus prompt_provider.safetensors. With `push_to_hub=True` also upload it, to
        `repo_id=` (default: the folder's name). Returns the folder and each file's size (ruPrompts: None)."""
        if not self.is_initialized:
            raise PromptUsageError("Prompt should be initialized to be saved: call prompt.initialize(model, "
                                   "tokenizer) or prompt.patch(model, tokenizer) first")
        if os.path.isfile(save_directory):
            raise PromptUsageError(f"save_directory should be a directory, got file instead: {str(save_directory)!r}")
        with torch.no_grad():
            saved = write_prompt_dir(Path(save_directory), self.as_dict(), self.provider)
        if push_to_hub:
            push_folder(saved.path, kwargs.get("repo_id") or Path(save_directory).name, kwargs.get("private"),
                        kwargs.get("token") or kwargs.get("use_auth_token"),
                        kwargs.get("commit_message") or "Upload trained prompt")
        return saved

    @classmethod
    def from_pretrained(cls, pretrained_prompt_name_or_path: str | os.PathLike, as_safe: bool = False) -> Prompt:
        """Load a prompt from a folder or a hub id: saved by rugpt, by ruPrompts (prompt_provider.bin, read with
        torch's weights-only loader), or a PEFT prompt-tuning adapter. rugpt's LSTM and MLP providers come back
        as themselves, trainable further; the rest as a TensorPromptProvider of the saved rows."""
        folder = resolve_prompt_dir(pretrained_prompt_name_or_path)
        spec, provider = read_prompt_dir(folder)
        format_cls = PromptFormatSafe if as_safe else PromptFormat
        prompt_format = format_cls(spec["format"]["template"], spec["format"].get("compiled_template"))
        prompt = cls(prompt_format, provider, PromptConfig.from_dict(spec.get("config") or {}))
        prompt.source = str(pretrained_prompt_name_or_path)
        prompt._check_length()
        prompt.ctx.is_initialized = True
        return prompt

    def push_to_hub(self, repo_id: str, use_temp_dir: bool | None = None, commit_message: str | None = None,
                    private: bool | None = None, token: str | None = None, create_pr: bool = False,
                    **kwargs: Any) -> str:
        """Save to a temporary folder and upload it to a hub model repository; returns the repository URL."""
        token = token or kwargs.get("use_auth_token")
        with tempfile.TemporaryDirectory() as tmp:
            saved = self.save_pretrained(Path(tmp) / "prompt")
            return push_folder(saved.path, repo_id, private, token, commit_message or "Upload trained prompt",
                               create_pr=create_pr)

    def save_peft_adapter(self, save_directory: str | os.PathLike) -> SavedPrompt:
        """Export as a PEFT prompt-tuning adapter (adapter_config.json + adapter_model.safetensors) for
        `peft.PeftModel.from_pretrained`; the format must start with all its prompt tokens (rugpt)."""
        if not self.is_initialized:
            raise PromptUsageError("Prompt should be initialized to be saved: call prompt.initialize(model, "
                                   "tokenizer) or prompt.patch(model, tokenizer) first")
        with torch.no_grad():
            files = write_peft_dir(Path(save_directory), self.format, self.provider(), self.config.as_dict())
        return SavedPrompt(Path(save_directory), files)

    def get_default_model(self):
        """The model named in the config, loaded on the CPU by rugpt's safe loader (a causal LM)."""
        from rugpt.models import load

        return load(self._default_name(), device="cpu").model

    def get_default_tokenizer(self):
        from rugpt.models import checkpoint_folder, load_tokenizer, resolve

        name = self._default_name()
        return load_tokenizer(checkpoint_folder(name, resolve(name)))

    def _default_name(self) -> str:
        if not self.config.pretrained_model_name:
            raise PromptUsageError("Default model/tokenizer is not specified: the prompt's config names no model")
        return self.config.pretrained_model_name

    def __repr__(self) -> str:
        return f"Prompt({self.format!r}, {type(self.provider).__name__}, tokens={self.format.prompt_length})"


class MultiPrompt:
    """Serves several prompts with one model; each key switches to its prompt, which has its own token.

        mp = MultiPrompt({"joke": "path/to/joke-prompt", "qa": Prompt.from_pretrained("path/to/qa")})
        mp.patch(model, tokenizer)
        mp(key="joke", text="Заходит улитка в бар")       # the joke prompt's text for the model
        mp(key="qa", context="Трава зелёная.", question="Какая трава?")
    """

    def __init__(self, prompts: Mapping[str, Prompt | str] | None = None):
        self.prompts: dict[str, Prompt] = {}
        self.ctx = PromptContext()
        for key, prompt in (prompts or {}).items():
            self.add_prompt(key=key, prompt=prompt)

    def add_prompt(self, key: str, prompt: Prompt | str) -> None:
        """Add a prompt (or the folder / hub id of one); on an attached MultiPrompt it takes effect at once."""
        if key in self.prompts:
            raise PromptUsageError(f"Prompt with key '{key}' is already added; keys: {', '.join(self.prompts)}")
        if not isinstance(key, str) or not key or not key.replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"prompt key {key!r} must be a non-empty name of letters, digits, '-' or '_'")
        prompt = Prompt.from_pretrained(prompt) if isinstance(prompt, str | os.PathLike) else prompt
        if self.is_attached and not prompt.is_initialized:
            prompt.initialize(self.ctx.model, self.ctx.tokenizer)
        prompt.format.set_key(key)
        self.prompts[key] = prompt
        if self.is_attached:
            self._install(self.ctx.model, self.ctx.tokenizer)

    def __call__(self, key: str, text: str | Mapping[str, Any] | list | None = None, **kwargs: Any):
        return self._get(key)(text, **kwargs)

    def render(self, key: str, text: str) -> str:
        return self._get(key).render(text)

    def patch(self, model: nn.Module, tokenizer) -> MultiPrompt:
        self.initialize(model, tokenizer)
        self.attach(model, tokenizer)
        return self

    def initialize(self, model: nn.Module, tokenizer) -> None:
        for prompt in self.prompts.values():
            prompt.initialize(model, tokenizer)
        self.ctx.model, self.ctx.tokenizer = model, tokenizer

    def attach(self, model: nn.Module, tokenizer) -> None:
        """Add every prompt's token to `tokenizer` and install one embedding layer serving them all."""
        if self.is_attached:
            raise PromptUsageError("MultiPrompt can be attached only once")
        if not self.is_initialized:
            raise PromptUsageError("MultiPrompt should be initialized to be attached: call mp.initialize(model, "
                                   "tokenizer) first, or mp.patch(model, tokenizer)")
        self._install(model, tokenizer)

    def _install(self, model: nn.Module, tokenizer) -> None:
        base = base_embedding(model)
        embeddings = []
        for prompt in self.prompts.values():
            token_ids = prompt.format.add_tokens(tokenizer)
            prompt.provider.to(base.weight.device)
            embeddings.append(PromptEmbedding(base, prompt_provider=prompt.provider, prompt_token_ids=token_ids))
        self.ctx.embedding = MultiPromptEmbedding(default_embedding=base, embeddings=embeddings)
        model.set_input_embeddings(self.ctx.embedding)
        self.ctx.model, self.ctx.tokenizer, self.ctx.is_attached = model, tokenizer, True

    def unpatch(self, model: nn.Module | None = None) -> None:
        """Put back the model's own input-embedding module (rugpt)."""
        model = model if model is not None else self.ctx.model
        if model is not None:
            model.set_input_embeddings(base_embedding(model))
        self.ctx.is_attached, self.ctx.embedding = False, None

    @property
    def is_initialized(self) -> bool:
        return all(prompt.is_initialized for prompt in self.prompts.values())

    @property
    def is_attached(self) -> bool:
        return self.ctx.is_attached

    @property
    def formats(self) -> dict[str, BasePromptFormat]:
        return {key: prompt.format for key, prompt in self.prompts.items()}

    @property
    def providers(self) -> dict[str, BasePromptProvider]:
        return {key: prompt.provider for key, prompt in self.prompts.items()}

    def _get(self, key: str) -> Prompt:
        if key not in self.prompts:
            raise PromptKeyError(f"no prompt with key {key!r}; keys: {', '.join(self.prompts) or 'none'}")
        return self.prompts[key]


def base_embedding(model: nn.Module) -> nn.Embedding:
    """The model's own input-embedding module, under any prompt patch."""
    layer = model.get_input_embeddings()
    return layer.default_embeddings if isinstance(layer, BasePromptEmbedding) else layer


_extract_default_embedding = base_embedding  # ruPrompts' name


def model_label(model: nn.Module) -> str | None:
    """The model's name for prompt.json (ruPrompts: config.name_or_path), made portable: the registry alias of
    the bundled model, the hub id of a snapshot folder in the HF cache, not a local path."""
    from rugpt.models import BUNDLED_DIR

    name = getattr(getattr(model, "config", None), "name_or_path", None)
    if not name:
        return name
    path = Path(name).expanduser()
    if path.resolve() == BUNDLED_DIR.resolve():
        return "bundled"
    parts = path.parts  # .../models--org--name/snapshots/<commit>
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return name
