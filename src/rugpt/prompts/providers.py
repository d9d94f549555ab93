"""Prompt providers: trainable modules whose forward() returns the prompt's [n_tokens, hidden] matrix.

TensorPromptProvider stores the matrix itself (Lester et al., 2021). LSTMPromptProvider and
MLPPromptProvider compute it from a small network (the reparametrisation of Liu et al., "GPT Understands,
Too", 2021), which trains more stably; they are saved as networks, so a loaded one trains further as itself.
"""

from __future__ import annotations

import abc
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from rugpt.errors import UsageError


class ProviderInit(str, Enum):
    """Where a TensorPromptProvider's rows start."""

    vocab = "vocab"  # embeddings of random vocabulary tokens (ruPrompts' default)
    random = "random"  # normal noise at the scale of the model's embeddings
    text = "text"  # embeddings of the tokens of `init_text`, repeated to fill the prompt


class BasePromptProvider(nn.Module, abc.ABC):
    """A module that yields the prompt matrix; built for a prompt length and hidden size by `initialize`."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.prompt_length: int | None = None
        self.embedding_dim: int | None = None

    @property
    def is_initialized(self) -> bool:
        return self.prompt_length is not None

    def initialize(self, prompt_length: int, embedding: nn.Embedding, init_tokens: dict[int, int] | None = None,
                   tokenizer=None) -> None:
        """Create the parameters for `prompt_length` rows of the embedding's width and set their start values.

        `init_tokens` maps prompt positions to token ids whose embeddings those rows start from.
        """
        if prompt_length < 1:
            raise UsageError(f"prompt_length={prompt_length} must be >= 1: put at least one <P> in the format")
        self.build(prompt_length, embedding.embedding_dim)
        with torch.no_grad():
            self._start_values(embedding, init_tokens or {}, tokenizer)

    def build(self, prompt_length: int, embedding_dim: int) -> None:
        """Create the parameters with placeholder values (from_pretrained loads real ones into them)."""
        self.prompt_length, self.embedding_dim = prompt_length, embedding_dim
        self._build()

    @abc.abstractmethod
    def _build(self) -> None: ...

    @abc.abstractmethod
    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None: ...

    @abc.abstractmethod
    def forward(self) -> torch.Tensor:
        """The prompt matrix, [prompt_length, embedding_dim], differentiable in the parameters."""

    def settings(self) -> dict[str, Any]:
        """Constructor arguments, for prompt.json."""
        return {}

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "prompt_length": self.prompt_length, "embedding_dim": self.embedding_dim,
                **self.settings()}

    def _require_no_init_tokens(self, init_tokens: dict[int, int]) -> None:
        if init_tokens:
            raise UsageError(f"{type(self).__name__} computes its rows from a network and cannot start from token "
                             f"embeddings (<P>text</P>): use TensorPromptProvider for that, or plain <P*N> slots")


class TensorPromptProvider(BasePromptProvider):
    """Stores the prompt matrix directly: one trainable vector per prompt token."""

    kind = "tensor"

    def __init__(self, init: ProviderInit | str = ProviderInit.vocab, init_text: str | None = None):
        super().__init__()
        allowed = ", ".join(i.value for i in ProviderInit)
        if init not in {i.value for i in ProviderInit}:
            raise UsageError(f"init={init!r} is not a provider initialisation; use one of {allowed}")
        self.init = ProviderInit(init)
        if self.init is ProviderInit.text and not init_text:
            raise UsageError("init='text' needs init_text, e.g. init_text='Напиши смешной анекдот'")
        if init_text and self.init is not ProviderInit.text:
            self.init = ProviderInit.text
        self.init_text = init_text
        self.weights: nn.Parameter | None = None

    @classmethod
    def from_tensor(cls, weights: torch.Tensor) -> TensorPromptProvider:
        """A provider holding `weights` ([prompt_length, hidden]) as they are, ready to train further."""
        if weights.ndim != 2 or not weights.is_floating_point():
            raise UsageError(f"prompt weights must be a 2-D float tensor [tokens, hidden], got {tuple(weights.shape)} "
                             f"{weights.dtype}")
        provider = cls()
        provider.build(*weights.shape)
        with torch.no_grad():
            provider.weights.copy_(weights.float())
        return provider

    def _build(self) -> None:
        # float32 even for a bf16 model: a few thousand numbers, and updates of size lr would vanish in bf16.
        self.weights = nn.Parameter(torch.zeros(self.prompt_length, self.embedding_dim))

    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None:
        table = embedding.weight.detach().float()
        device = self.weights.device
        if self.init is ProviderInit.random:
            # torch's default N(0, 1) would be ~10x the scale of GPT-2 embeddings; match the model's spread.
            self.weights.normal_(float(table.mean()), float(table.std()))
        else:
            ids = self._start_ids(embedding.num_embeddings, tokenizer)
            self.weights.copy_(table[ids.to(table.device)].to(device))
        for position, token_id in init_tokens.items():
            self.weights[position] = table[token_id].to(device)

    def _start_ids(self, vocab_size: int, tokenizer) -> torch.Tensor:
        if self.init is ProviderInit.vocab:
            return torch.randint(0, vocab_size, (self.prompt_length,))
        if tokenizer is None:
            raise UsageError("init_text needs the tokenizer: initialise the provider through Prompt.patch")
        ids = tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UsageError(f"init_text={self.init_text!r} makes no tokens")
        repeats = -(-self.prompt_length // len(ids))  # as PEFT's TEXT init: repeat the text to fill the prompt
        return torch.tensor((ids * repeats)[: self.prompt_length])

    def forward(self) -> torch.Tensor:
        return self.weights

    def settings(self) -> dict[str, Any]:
        return {"init": self.init.value, "init_text": self.init_text}


class LSTMPromptProvider(BasePromptProvider):
    """Prompt rows from a bidirectional LSTM and a two-layer MLP over trainable inputs (P-tuning)."""

    kind = "lstm"

    def __init__(self, hidden_dim: int = -1, input_dim: int = -1, num_lstm_layers: int = 2):
        super().__init__()
        _check_dims(hidden_dim=hidden_dim, input_dim=input_dim)
        if num_lstm_layers < 1:
            raise UsageError(f"num_lstm_layers={num_lstm_layers} must be >= 1")
        self.hidden_dim, self.input_dim, self.num_lstm_layers = hidden_dim, input_dim, num_lstm_layers

    def _build(self) -> None:
        hidden = self.hidden_dim if self.hidden_dim > 0 else self.embedding_dim
        width = self.input_dim if self.input_dim > 0 else self.embedding_dim
        self.input = nn.Parameter(torch.rand(1, self.prompt_length, width))
        self.lstm = nn.LSTM(width, hidden, num_layers=self.num_lstm_layers, bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, self.embedding_dim))

    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None:
        self._require_no_init_tokens(init_tokens)  # the fresh modules' own initialisation is the start

    def forward(self) -> torch.Tensor:
        states, _ = self.lstm(self.input)  # [1, n, 2 * hidden]
        return self.mlp(states).squeeze(0)  # [n, embedding_dim]

    def settings(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim, "input_dim": self.input_dim, "num_lstm_layers": self.num_lstm_layers}


class MLPPromptProvider(BasePromptProvider):
    """Prompt rows from a two-layer MLP over trainable inputs (PEFT's MLP reparametrisation, without the LSTM)."""

    kind = "mlp"

    def __init__(self, hidden_dim: int = -1, input_dim: int = -1):
        super().__init__()
        _check_dims(hidden_dim=hidden_dim, input_dim=input_dim)
        self.hidden_dim, self.input_dim = hidden_dim, input_dim

    def _build(self) -> None:
        hidden = self.hidden_dim if self.hidden_dim > 0 else self.embedding_dim
        width = self.input_dim if self.input_dim > 0 else self.embedding_dim
        self.input = nn.Parameter(torch.randn(self.prompt_length, width))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, self.embedding_dim))

    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None:
        self._require_no_init_tokens(init_tokens)

    def forward(self) -> torch.Tensor:
        return self.mlp(self.input)  # [n, embedding_dim]

    def settings(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim, "input_dim": self.input_dim}


PROVIDERS: dict[str, type[BasePromptProvider]] = {
    cls.kind: cls for cls in (TensorPromptProvider, LSTMPromptProvider, MLPPromptProvider)
}


def provider_from_dict(spec: dict[str, Any]) -> BasePromptProvider:
    """A provider of the saved type, built with placeholder values for its weights to be loaded into."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in PROVIDERS:
        raise UsageError(f"prompt provider type {kind!r} is unknown; known: {', '.join(PROVIDERS)}")
    prompt_length, embedding_dim = spec.pop("prompt_length"), spec.pop("embedding_dim")
    provider = PROVIDERS[kind](**spec)
    provider.build(int(prompt_length), int(embedding_dim))
    return provider


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value != -1 and value < 1:
            raise UsageError(f"{name}={value} must be >= 1, or -1 for the model's hidden size")
