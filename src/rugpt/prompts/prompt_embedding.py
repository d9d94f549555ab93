"""The patched input-embedding layer: the model's own embeddings, with prompt rows at prompt-token positions
(ruprompts.prompt_embedding).

The attribute names are ruPrompts' (`embedding`, `prompt_provider`), so parameter names hold
"prompt_provider" as the Trainer callbacks expect and checkpoints keep ruPrompts' keys
(`transformer.wte.prompt_provider.weights`). The original nn.Embedding is kept as is, so unpatching
puts back the very same module.

Where ruPrompts printed "Invalid prompt token count" and went on with wrong embeddings, rugpt raises; and
rows of one batch may differ: some with the prompt, some without (left or right padded), some with
another MultiPrompt prompt. A row's prompt tokens are found by id, wherever padding puts them.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from rugpt.errors import UsageError
from rugpt.prompts.prompt_provider import BasePromptProvider

PROMPT_PROVIDER_KEY_NAME = "prompt_provider"


class BasePromptEmbedding(nn.Module, abc.ABC):
    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, sequence] ids → [batch, sequence, embedding] embeddings."""

    @property
    @abc.abstractmethod
    def default_embeddings(self) -> nn.Embedding:
        """The model's own embedding module."""

    @abc.abstractmethod
    def check_contains_prompt_token_ids(self, input_ids: torch.Tensor) -> bool: ...

    # rugpt: what code reading the model's input embeddings expects of an nn.Embedding (weight tying,
    # engines that read the table).
    @property
    def weight(self) -> torch.Tensor:
        return self.default_embeddings.weight

    @property
    def num_embeddings(self) -> int:
        return self.default_embeddings.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.default_embeddings.embedding_dim


class PromptEmbedding(BasePromptEmbedding):
    """Embeds `input_ids`; the k-th prompt token of a row gets row k of the provider. A row must hold all of
    the prompt's tokens or none of them."""

    def __init__(self, embedding: nn.Embedding, prompt_provider: BasePromptProvider, prompt_token_ids: list[int]):
        super().__init__()
        self.embedding = embedding
        self.prompt_provider = prompt_provider
        self.prompt_token_id = self._validate_prompt_token_ids(prompt_token_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids == self.prompt_token_id
        if not mask.any():
            return self.embedding(input_ids)
        # The prompt token id lies beyond the model's vocabulary: look up id 0 there, then overwrite.
        return self.inject(self.embedding(input_ids.masked_fill(mask, 0)), mask)

    def inject(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`embeds` with the provider's rows at the positions of `mask` ([batch, sequence] booleans)."""
        rows = self.prompt_provider()  # [n, hidden]
        counts = mask.reshape(-1, mask.shape[-1]).sum(-1)
        n = rows.shape[0]
        bad = ((counts != 0) & (counts != n)).nonzero()
        if len(bad):
            row = int(bad[0])
            raise UsageError(f"row {row} holds {int(counts[row])} prompt tokens (id {self.prompt_token_id}) but the "
                             f"prompt has {n}: format the text with the prompt and do not cut it (was it truncated to "
                             f"fit the context? shorten a field with PromptFormat.truncate instead)")
        full_rows = int((counts == n).sum())
        # masked_scatter fills positions in row-major order, so the k-th prompt token of each row gets row k.
        values = rows.to(device=embeds.device, dtype=embeds.dtype).repeat(full_rows, 1)
        return embeds.masked_scatter(mask.unsqueeze(-1), values)

    def _validate_prompt_token_ids(self, ids: list[int]) -> int:
        if len(ids) != 1:
            raise ValueError(f"PromptEmbedding expects prompt_token_ids to contain a single index, but received: "
                             f"{ids}")
        return int(ids[0])

    @property
    def default_embeddings(self) -> nn.Embedding:
        return self.embedding

    def check_contains_prompt_token_ids(self, input_ids: torch.Tensor) -> bool:
        return bool(torch.any(input_ids == self.prompt_token_id))

    def extra_repr(self) -> str:
        return f"prompt_token_id={self.prompt_token_id}"


class PromptEmbeddingSafe(BasePromptEmbedding):
    """Declared by ruPrompts 0.1.4 but never implemented there: abstract, so building one is a TypeError there
    and here; use PromptEmbedding."""

    def __init__(self, embedding: nn.Embedding, prompt_provider: BasePromptProvider, prompt_token_ids: list[int]):
        raise NotImplementedError("PromptEmbeddingSafe is not implemented (in ruPrompts 0.1.4 neither); use "
                                  "PromptEmbedding")


class MultiPromptEmbedding(BasePromptEmbedding):
    """Several prompts on one model, each with its own token; rows of one batch may use different prompts."""

    def __init__(self, default_embedding: nn.Embedding, embeddings: list[PromptEmbedding]):
        super().__init__()
        self._default_embeddings = default_embedding
        self.embeddings = nn.ModuleList(embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        found = [(e, input_ids == e.prompt_token_id) for e in self.embeddings]
        found = [(e, mask) for e, mask in found if mask.any()]
        if not found:
            return self.default_embeddings(input_ids)
        any_prompt = torch.stack([mask for _, mask in found]).any(0)
        embeds = self.default_embeddings(input_ids.masked_fill(any_prompt, 0))
        for embedding, mask in found:
            embeds = embedding.inject(embeds, mask)
        return embeds

    @property
    def default_embeddings(self) -> nn.Embedding:
        return self._default_embeddings

    def check_contains_prompt_token_ids(self, input_ids: torch.Tensor) -> bool:
        return any(e.check_contains_prompt_token_ids(input_ids) for e in self.embeddings)
