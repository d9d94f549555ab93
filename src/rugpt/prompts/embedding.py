"""The patched input-embedding layer: the model's own embeddings, with prompt rows at prompt-token positions.

It wraps the original nn.Embedding (kept as `base`, so unpatching puts back the very same module) and
works with every way transformers calls it: training batches, `generate` (whose later steps see only new
tokens, never prompt tokens) and left- or right-padded batches, since a row's prompt tokens are found
by id, wherever padding puts them.
"""

from __future__ import annotations

import torch
from torch import nn

from rugpt.errors import UsageError
from rugpt.prompts.providers import BasePromptProvider


class PromptEmbedding(nn.Module):
    """Embeds `input_ids`; the k-th occurrence of a prompt's token in a row gets row k of its provider.

    `providers` maps a prompt token id to its provider; MultiPrompt passes several, Prompt one.
    A row must hold all of a prompt's tokens or none of them.
    """

    def __init__(self, base: nn.Embedding, providers: dict[int, BasePromptProvider]):
        super().__init__()
        self.base = base
        self.providers = nn.ModuleDict({str(token_id): provider for token_id, provider in providers.items()})

    @property
    def weight(self) -> torch.Tensor:
        """The base table, so that weight tying (lm_head) and code reading `.weight` keep working."""
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        masks = {int(token_id): input_ids == int(token_id) for token_id in self.providers}
        found = [(token_id, mask) for token_id, mask in masks.items() if mask.any()]
        if not found:
            return self.base(input_ids)
        any_prompt = torch.stack([mask for _, mask in found]).any(0)
        # Prompt token ids may lie beyond the model's vocabulary: look up id 0 there, then overwrite.
        embeds = self.base(input_ids.masked_fill(any_prompt, 0))
        for token_id, mask in found:
            embeds = self._insert(embeds, mask, self.providers[str(token_id)], token_id)
        return embeds

    @staticmethod
    def _insert(embeds: torch.Tensor, mask: torch.Tensor, provider: BasePromptProvider, token_id: int) -> torch.Tensor:
        rows = provider()  # [n, hidden]
        counts = mask.reshape(-1, mask.shape[-1]).sum(-1)
        n = rows.shape[0]
        bad = ((counts != 0) & (counts != n)).nonzero()
        if len(bad):
            row = int(bad[0])
            raise UsageError(f"row {row} holds {int(counts[row])} prompt tokens (id {token_id}) but the prompt has "
                             f"{n}: format the text with the prompt and do not cut it (was it truncated to fit "
                             f"the context? shorten a field with PromptFormat.truncate instead)")
        full_rows = int((counts == n).sum())
        # masked_scatter fills positions in row-major order, so the k-th prompt token of each row gets row k.
        values = rows.to(device=embeds.device, dtype=embeds.dtype).repeat(full_rows, 1)
        return embeds.masked_scatter(mask.unsqueeze(-1), values)

    def extra_repr(self) -> str:
        return f"prompt token ids: {', '.join(self.providers)}"
