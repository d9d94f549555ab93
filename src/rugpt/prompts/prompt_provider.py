"""Prompt providers: trainable modules whose forward() returns the prompt's [prompt_length, embedding_dim]
matrix (ruprompts.prompt_provider).

TensorPromptProvider stores the matrix itself (Lester et al., 2021). LSTMPromptProvider computes it from a
small network (the reparametrisation of Liu et al., "GPT Understands, Too", 2021), which trains more
stably; MLPPromptProvider (rugpt) does it without the LSTM. With the same seed each starts from the same
values as its ruPrompts namesake (the same random calls in the same order).

rugpt adds: a saved provider keeps its kind (an LSTM comes back as an LSTM, trainable further), the
tensor provider trains in float32 whatever the model's dtype, and can start from a text (`init_text`).
"""

from __future__ import annotations

import abc
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from rugpt.errors import UsageError
from rugpt.prompts.errors import PromptTypeError, PromptUsageError


class ProviderInit(str, Enum):
    """Where a TensorPromptProvider's rows start."""

    vocab = "vocab"  # embeddings of distinct random vocabulary tokens (ruPrompts' default)
    random = "random"  # standard normal noise, N(0, 1), as ruPrompts
    random_scaled = "random_scaled"  # rugpt: normal noise at the mean and spread of the model's embeddings
    text = "text"  # rugpt: embeddings of the tokens of `init_text`, repeated to fill the prompt


class BasePromptProvider(nn.Module, abc.ABC):
    """A module that yields the prompt matrix; `initialize` builds it for a prompt length and width.

    A provider of your own (as in ruPrompts) overrides `initialize`, `forward` and `is_initialized`; it is
    saved as its output rows and loads back as a TensorPromptProvider, as ruPrompts does with every provider.
    rugpt's providers instead implement `_build` and `_start_values` and set `kind`, so they are saved
    as themselves.
    """

    kind: ClassVar[str | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.prompt_length: int | None = None
        self.embedding_dim: int | None = None

    @property
    def is_initialized(self) -> bool:
        return self.prompt_length is not None

    def initialize(self, prompt_length: int, embedding_dim: int, embedding: nn.Embedding,
                   init_tokens: dict[int, int] | None = None, tokenizer=None) -> None:
        """Create `prompt_length` rows of width `embedding_dim` and set their start values; a no-op when the
        provider is already initialized (a loaded one).

        `init_tokens` maps prompt positions to token ids whose embeddings those rows start from;
        `tokenizer` (rugpt) is needed only for `init_text`.
        """
        if self.is_initialized:
            return
        if prompt_length < 1:
            raise UsageError(f"prompt_length={prompt_length} should be >= 1: put at least one <P> in the format")
        self._validate(prompt_length, embedding, init_tokens or {})
        self.build(prompt_length, embedding_dim)
        with torch.no_grad():
            self._start_values(embedding, init_tokens or {}, tokenizer)

    def build(self, prompt_length: int, embedding_dim: int) -> None:
        """Create the parameters with placeholder values (from_pretrained loads real ones into them)."""
        self.prompt_length, self.embedding_dim = int(prompt_length), int(embedding_dim)
        self._build()

    def _validate(self, prompt_length: int, embedding: nn.Embedding, init_tokens: dict[int, int]) -> None:
        """Refuse settings that cannot work, before anything is built."""

    def _build(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement initialize() or _build()")

    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement initialize() or _start_values()")

    @abc.abstractmethod
    def forward(self) -> torch.Tensor:
        """The prompt matrix, [prompt_length, embedding_dim], differentiable in the parameters."""

    def save_pretrained(self, output_file) -> None:
        """Save the provider's output rows with torch.save, as ruPrompts writes prompt_provider.bin."""
        if not self.is_initialized:
            raise PromptUsageError(f"{type(self).__name__} should be initialized before saving")
        torch.save(self().detach().cpu(), output_file)

    def settings(self) -> dict[str, Any]:
        """Constructor arguments, for prompt.json."""
        return {}

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "prompt_length": self.prompt_length, "embedding_dim": self.embedding_dim,
                **self.settings()}


class TensorPromptProvider(BasePromptProvider):
    """Stores the prompt matrix directly: one trainable vector per prompt token."""

    kind = "tensor"

    def __init__(self, init: ProviderInit | str = "vocab", init_text: str | None = None):
        """
        Args:
            init: "vocab" (embeddings of random vocabulary tokens, the default), "random" (N(0, 1)); rugpt
                adds "random_scaled" (noise at the scale of the model's embeddings) and "text".
            init_text: rugpt: start from the embeddings of this text's tokens, repeated (implies init="text").
        """
        super().__init__()
        allowed = [i.value for i in ProviderInit]
        if not isinstance(init, str) or init not in allowed:
            raise PromptTypeError(f"init={init!r} is not a provider initialisation; use one of {', '.join(allowed)}")
        init = ProviderInit(init)
        if init is ProviderInit.text and not init_text:
            raise UsageError("init='text' needs init_text, e.g. init_text='Напиши смешной анекдот'")
        self.init = ProviderInit.text if init_text else init
        self.init_text = init_text
        self.weights: nn.Parameter | None = None

    @property
    def is_initialized(self) -> bool:
        return self.weights is not None

    @classmethod
    def from_pretrained(cls, weights: torch.Tensor) -> TensorPromptProvider:
        """A provider holding `weights` ([prompt_length, embedding_dim]) as they are, ready to train further."""
        if not isinstance(weights, torch.Tensor) or weights.ndim != 2 or not weights.is_floating_point():
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise UsageError(f"prompt weights must be a 2-D float tensor [tokens, hidden], got {shape}")
        provider = cls()
        provider.build(*weights.shape)
        with torch.no_grad():
            provider.weights.copy_(weights.float())
        return provider

    from_tensor = from_pretrained  # rugpt's earlier name

    def _validate(self, prompt_length: int, embedding: nn.Embedding, init_tokens: dict[int, int]) -> None:
        if prompt_length > embedding.num_embeddings:
            raise PromptUsageError(f"prompt_length ({prompt_length}) cannot be greater than vocab size "
                                   f"({embedding.num_embeddings})")

    def _build(self) -> None:
        # float32 even for a bf16 model: a few thousand numbers, and updates of size lr would vanish in bf16.
        self.weights = nn.Parameter(torch.zeros(self.prompt_length, self.embedding_dim))

    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None:
        table = embedding.weight.detach()
        if self.init in (ProviderInit.vocab, ProviderInit.text) and table.shape[1] != self.embedding_dim:
            raise UsageError(f"embedding_dim={self.embedding_dim} differs from the embedding's width "
                             f"{table.shape[1]}: rows cannot start from vocabulary embeddings")
        device = self.weights.device
        if self.init is ProviderInit.random:
            self.weights.normal_()
        elif self.init is ProviderInit.random_scaled:
            self.weights.normal_(float(table.float().mean()), float(table.float().std()))
        else:
            ids = self._start_ids(embedding.num_embeddings, tokenizer)
            self.weights.copy_(table[ids.to(table.device)].float().to(device))
        for position, token_id in init_tokens.items():
            self.weights[position] = table[token_id].float().to(device)

    def _start_ids(self, vocab_size: int, tokenizer) -> torch.Tensor:
        if self.init is ProviderInit.vocab:
            return torch.randperm(vocab_size)[: self.prompt_length]  # distinct tokens, as ruPrompts
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
        """
        Args:
            hidden_dim: hidden size of the LSTM; -1: the model's embedding size.
            input_dim: input size of the LSTM; -1: the model's embedding size.
            num_lstm_layers: number of LSTM layers.
        """
        super().__init__()
        _check_dims(hidden_dim=hidden_dim, input_dim=input_dim)
        _check_int(num_lstm_layers=num_lstm_layers)
        if num_lstm_layers < 1:
            raise UsageError(f"num_lstm_layers={num_lstm_layers} must be >= 1")
        self.hidden_dim, self.input_dim, self.num_lstm_layers = hidden_dim, input_dim, num_lstm_layers
        self.input: nn.Parameter | None = None
        self.lstm: nn.LSTM | None = None
        self.mlp: nn.Sequential | None = None

    def _validate(self, prompt_length: int, embedding: nn.Embedding, init_tokens: dict[int, int]) -> None:
        _refuse_init_tokens(self, init_tokens)

    def _build(self) -> None:
        # As ruPrompts: -1 becomes the embedding size, and the modules are created in its order (same seed,
        # same start).
        self.hidden_dim = self.embedding_dim if self.hidden_dim == -1 else self.hidden_dim
        self.input_dim = self.embedding_dim if self.input_dim == -1 else self.input_dim
        self.input = nn.Parameter(torch.rand(1, self.prompt_length, self.input_dim))
        self.lstm = nn.LSTM(input_size=self.input_dim, hidden_size=self.hidden_dim, num_layers=self.num_lstm_layers,
                            bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * self.hidden_dim, self.hidden_dim), nn.ReLU(),
                                 nn.Linear(self.hidden_dim, self.embedding_dim))

    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None:
        pass  # the fresh modules' own initialisation is the start

    def forward(self) -> torch.Tensor:
        states, _ = self.lstm(self.input)  # [1, n, 2 * hidden]
        return self.mlp(states).squeeze(0)  # [n, embedding_dim]

    def settings(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim, "input_dim": self.input_dim, "num_lstm_layers": self.num_lstm_layers}


class MLPPromptProvider(BasePromptProvider):
    """Prompt rows from a two-layer MLP over trainable inputs (rugpt; PEFT's MLP reparametrisation)."""

    kind = "mlp"

    def __init__(self, hidden_dim: int = -1, input_dim: int = -1):
        super().__init__()
        _check_dims(hidden_dim=hidden_dim, input_dim=input_dim)
        self.hidden_dim, self.input_dim = hidden_dim, input_dim

    def _validate(self, prompt_length: int, embedding: nn.Embedding, init_tokens: dict[int, int]) -> None:
        _refuse_init_tokens(self, init_tokens)

    def _build(self) -> None:
        hidden = self.hidden_dim if self.hidden_dim > 0 else self.embedding_dim
        width = self.input_dim if self.input_dim > 0 else self.embedding_dim
        self.input = nn.Parameter(torch.randn(self.prompt_length, width))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, self.embedding_dim))

    def _start_values(self, embedding: nn.Embedding, init_tokens: dict[int, int], tokenizer) -> None:
        pass

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


def _refuse_init_tokens(provider: BasePromptProvider, init_tokens: dict[int, int]) -> None:
    if init_tokens:
        raise UsageError(f"{type(provider).__name__} doesn't support initialization from tokens (<P>text</P>): its "
                         f"rows come from a network; use TensorPromptProvider for that, or plain <P*N> slots")


def _check_int(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise PromptTypeError(f"{name}={value!r} must be an int")


def _check_dims(**dims: int) -> None:
    _check_int(**dims)
    for name, value in dims.items():
        if value != -1 and value < 1:
            raise UsageError(f"{name}={value} must be >= 1, or -1 for the model's hidden size")
