"""The decode interface every engine implements: prefill a row, step rows with a KV cache, release a row.

Generation and the server's batching scheduler drive engines only through this interface, so a
faster engine changes nothing above it. Rows are independent sequences; each keeps its own KV cache
inside the engine until released. Logits come back as float32 on the CPU-side device of the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from rugpt.errors import UsageError


class DecodeEngine(ABC):
    """A model that can hold up to `max_rows` sequences and decode them together."""

    name: str = "abstract"

    def __init__(self, context_length: int, vocab_size: int, max_rows: int):
        self.context_length = context_length
        self.vocab_size = vocab_size  # logits per row (the model's embedding rows)
        self.sampleable_vocab = vocab_size  # ids below it may be generated; create_engine narrows it
        self.max_rows = max_rows
        self.lengths: dict[int, int] = {}  # row id → tokens in its cache
        self._next_id = 0

    @property
    def active_rows(self) -> list[int]:
        return list(self.lengths)

    def prefill(self, token_ids: list[int], embeds: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Start a new row from a prompt; returns its id and the next-token logits [vocab].

        `embeds` ([len(token_ids), hidden]) replaces the token embeddings of the prompt, which is how
        trained prompts enter; engines that cannot take them say so with `accepts_embeds`.
        """
        if not token_ids:
            raise UsageError("cannot prefill an empty prompt: give at least one token")
        if len(token_ids) >= self.context_length:
            raise UsageError(f"prompt of {len(token_ids)} tokens does not fit the context of {self.context_length}")
        if len(self.lengths) >= self.max_rows:
            raise UsageError(f"engine holds max_rows={self.max_rows} rows already; release one first")
        if embeds is not None and not self.accepts_embeds:
            raise UsageError(f"engine {self.name!r} cannot take input embeddings")
        row = self._next_id
        self._next_id += 1
        logits = self._prefill(row, token_ids, embeds)
        self.lengths[row] = len(token_ids)
        return row, logits

    def step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor:
        """Append one token to each of `rows` and return their next-token logits [len(rows), vocab]."""
        if len(rows) != len(token_ids):
            raise UsageError(f"step got {len(rows)} rows but {len(token_ids)} tokens")
        for row in rows:
            if row not in self.lengths:
                raise UsageError(f"row {row} is not active (released or never prefilled)")
            if self.lengths[row] >= self.context_length:
                raise UsageError(f"row {row} has filled the context of {self.context_length} tokens")
        logits = self._step(rows, token_ids)
        for row in rows:
            self.lengths[row] += 1
        return logits

    def release(self, row: int) -> None:
        """Forget a row and free its cache; releasing an unknown row is a no-op (it may have timed out)."""
        if self.lengths.pop(row, None) is not None:
            self._release(row)

    def release_all(self) -> None:
        for row in list(self.lengths):
            self.release(row)

    accepts_embeds: bool = False

    @abstractmethod
    def _prefill(self, row: int, token_ids: list[int], embeds: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def _step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor: ...

    @abstractmethod
    def _release(self, row: int) -> None: ...
