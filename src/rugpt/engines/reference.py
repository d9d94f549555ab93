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
    shares_kv = True

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

    @torch.inference_mode()
    def _extend(self, row: int, token_ids: list[int], all_logits: bool) -> torch.Tensor:
        # Positions continue from the cache's length: transformers reads them off the cache it is given.
        out = self.model(input_ids=torch.tensor([token_ids], device=self.model.device),
                         **{self._cache_arg: self._caches[row]}, use_cache=True)
        return out.logits[0].float() if all_logits else out.logits[0, -1].float()

    def _truncate(self, row: int, length: int) -> None:
        dropped = self.lengths[row] - length
        if dropped:
            self._caches[row].crop(-dropped)  # a negative count drops that many from the end (transformers 5)

    @torch.inference_mode()
    def _export_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        layers = self._caches[row].layers
        # each layer's keys and values are [1, heads, tokens, head_dim]; stacking copies them
        return torch.stack([torch.stack((layer.keys[0, :, start:end], layer.values[0, :, start:end]))
                            for layer in layers])

    @torch.inference_mode()
    def _open_row(self, row: int, kv: torch.Tensor) -> None:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        device = self.model.device
        for index, (keys, values) in enumerate(kv):
            cache.update(keys.unsqueeze(0).to(device), values.unsqueeze(0).to(device), index)
        self._caches[row] = cache

    def _release(self, row: int) -> None:
        self._caches.pop(row, None)
