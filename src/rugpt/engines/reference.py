"""The reference engine: transformers' own forward pass with a DynamicCache per row.

It supports every model transformers loads (any architecture, patched embeddings of trained prompts)
and is what the fast engine is checked against. Rows are stepped one at a time: correct, not fast.
"""

from __future__ import annotations

import torch

from rugpt.engines.base import DecodeEngine


class TransformersEngine(DecodeEngine):
    name = "transformers"
    accepts_embeds = True

    def __init__(self, model, context_length: int, max_rows: int = 64):
        super().__init__(context_length, model.config.vocab_size, max_rows)
        self.model = model
        self._caches: dict[int, object] = {}

    @torch.inference_mode()
    def _prefill(self, row: int, token_ids: list[int], embeds: torch.Tensor | None) -> torch.Tensor:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        device = self.model.device
        if embeds is not None:
            out = self.model(inputs_embeds=embeds.unsqueeze(0).to(device), past_key_values=cache, use_cache=True)
        else:
            out = self.model(input_ids=torch.tensor([token_ids], device=device), past_key_values=cache, use_cache=True)
        self._caches[row] = out.past_key_values
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def _step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor:
        device = self.model.device
        logits = []
        for row, token in zip(rows, token_ids, strict=True):
            out = self.model(input_ids=torch.tensor([[token]], device=device), past_key_values=self._caches[row],
                             use_cache=True)
            self._caches[row] = out.past_key_values
            logits.append(out.logits[0, -1].float())
        return torch.stack(logits)

    def _release(self, row: int) -> None:
        self._caches.pop(row, None)
