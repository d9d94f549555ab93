"""The reference engine: transformers' own forward pass with a DynamicCache per row.

It supports every model transformers loads (any architecture, patched embeddings of trained prompts)
and is what the fast engine is checked against. Rows are stepped one at a time: correct, not fast.
"""

from __future__ import annotations

import inspect

import torch

from rugpt.engines.base import DecodeEngine


class TransformersEngine(DecodeEngine):
    name = "transformers"
    accepts_embeds = True

    def __init__(self, model, context_length: int, max_rows: int = 64):
        super().__init__(context_length, model.config.vocab_size, max_rows)
        self.model = model
        self._caches: dict[int, object] = {}
        # transformers 5 renames `past_key_values` to `cache` (the old name warns, then goes in 5.40);
        # models written against the old name (remote-code layouts, older releases) still take it.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def _prefill(self, row: int, token_ids: list[int], embeds: torch.Tensor | None) -> torch.Tensor:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        device = self.model.device
        if embeds is not None:
            inputs = {"inputs_embeds": embeds.unsqueeze(0).to(device)}
        else:
            inputs = {"input_ids": torch.tensor([token_ids], device=device)}
        logits = self.model(**inputs, **{self._cache_arg: cache}, use_cache=True).logits
        self._caches[row] = cache  # filled in place by the forward pass
        return logits[0, -1].float()

    @torch.inference_mode()
    def _step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor:
        device = self.model.device
        logits = []
        for row, token in zip(rows, token_ids, strict=True):
            out = self.model(input_ids=torch.tensor([[token]], device=device), **{self._cache_arg: self._caches[row]},
                             use_cache=True)
            logits.append(out.logits[0, -1].float())
        return torch.stack(logits)

    def _release(self, row: int) -> None:
        self._caches.pop(row, None)
