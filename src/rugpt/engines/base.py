"""The decode interface every engine implements: prefill a row, step rows with a KV cache, release a row.

Generation and the server's batching scheduler drive engines only through this interface, so a
faster engine changes nothing above it. Rows are independent sequences; each keeps its own KV cache
inside the engine until released. Logits come back as float32 on the CPU-side device of the engine.

Beyond one token per step, a row can be extended by several tokens in one forward pass (`extend`:
chunked prefill, checking a draft's tokens) and cut back (`truncate`: dropping rejected draft tokens).
Engines that keep keys and values as torch tensors can also copy a row's KV out (`export_kv`) and start
a row from such a copy (`open_row`), which is how the prefix cache (engines/prefix_cache.py) reuses
computed prompts; `shares_kv` says whether an engine can.
"""

from __future__ import annotations

import math
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

    def check_prompt(self, token_ids: list[int]) -> None:
        """Raise UsageError unless `token_ids` can start a row: not empty, and room left for one more token."""
        if not token_ids:
            raise UsageError("cannot prefill an empty prompt: give at least one token")
        if len(token_ids) >= self.context_length:
            raise UsageError(f"prompt of {len(token_ids)} tokens does not fit the context of {self.context_length}")

    def prefill(self, token_ids: list[int], embeds: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Start a new row from a prompt; returns its id and the next-token logits [vocab].

        `embeds` ([len(token_ids), hidden]) replaces the token embeddings of the prompt, which is how
        trained prompts enter; engines that cannot take them say so with `accepts_embeds`.
        """
        self.check_prompt(token_ids)
        if embeds is not None and not self.accepts_embeds:
            raise UsageError(f"engine {self.name!r} cannot take input embeddings")
        row = self._new_row_id()
        logits = self._prefill(row, token_ids, embeds)
        self.lengths[row] = len(token_ids)
        return row, logits

    def extend(self, row: int, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Append `token_ids` to `row`'s cache in one forward pass.

        Returns the logits after every appended token [len(token_ids), vocab] when `all_logits`, else only
        the next-token logits after the last one [vocab]. The same numbers as stepping the tokens one by one,
        or as prefilling the whole sequence at once: to float rounding with fp32 weights, to the format's own
        error with 16-bit or int8 ones (a step may run on another kernel, int8 quantizes a pass's inputs together).
        """
        self._check_active(row)
        if not token_ids:
            raise UsageError("cannot extend a row by no tokens: give at least one")
        if self.lengths[row] + len(token_ids) > self.context_length:
            raise UsageError(f"row {row} holds {self.lengths[row]} tokens; {len(token_ids)} more do not fit the "
                             f"context of {self.context_length}")
        logits = self._extend(row, token_ids, all_logits)
        self.lengths[row] += len(token_ids)
        return logits

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first `length` tokens of `row`'s cache, as if the later ones were never appended."""
        self._check_active(row)
        if not 0 <= length <= self.lengths[row]:
            raise UsageError(f"cannot truncate row {row} of {self.lengths[row]} tokens to {length}: "
                             f"give a length from 0 to {self.lengths[row]}")
        self._truncate(row, length)
        self.lengths[row] = length

    shares_kv: bool = False  # whether export_kv and open_row work (the prefix cache needs them)

    def export_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        """A copy of `row`'s keys and values for positions [start, end): [layers, 2, heads, end - start, head_dim]."""
        self._check_active(row)
        if not 0 <= start < end <= self.lengths[row]:
            raise UsageError(f"row {row} holds {self.lengths[row]} tokens; cannot export positions {start}..{end}")
        if not self.shares_kv:
            raise UsageError(f"engine {self.name!r} cannot export its KV cache (the prefix cache needs it)")
        return self._export_kv(row, start, end)

    def open_row(self, kv: torch.Tensor) -> int:
        """Start a new row whose cache holds `kv` ([layers, 2, heads, tokens, head_dim], from `export_kv`, positions
        from 0). It has no logits yet: `extend` it by the rest of its prompt (at least one token)."""
        if not self.shares_kv:
            raise UsageError(f"engine {self.name!r} cannot open a row from saved keys and values")
        tokens = kv.shape[3]
        if not 0 < tokens < self.context_length:
            raise UsageError(f"saved KV of {tokens} tokens does not fit the context of {self.context_length}")
        row = self._new_row_id()
        self._open_row(row, kv)
        self.lengths[row] = tokens
        return row

    def step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor:
        """Append one token to each of `rows` and return their next-token logits [len(rows), vocab]."""
        if len(rows) != len(token_ids):
            raise UsageError(f"step got {len(rows)} rows but {len(token_ids)} tokens")
        for row in rows:
            self._check_active(row)
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

    def _new_row_id(self) -> int:
        if len(self.lengths) >= self.max_rows:
            raise UsageError(f"engine holds max_rows={self.max_rows} rows already; release one first")
        row = self._next_id
        self._next_id += 1
        return row

    def _check_active(self, row: int) -> None:
        if row not in self.lengths:
            raise UsageError(f"row {row} is not active (released or never prefilled)")

    def _extend(self, row: int, token_ids: list[int], all_logits: bool) -> torch.Tensor:
        raise UsageError(f"engine {self.name!r} cannot extend a row by several tokens at once")

    def _truncate(self, row: int, length: int) -> None:
        raise UsageError(f"engine {self.name!r} cannot truncate a row")

    def _export_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        raise NotImplementedError  # only called where shares_kv is True

    def _open_row(self, row: int, kv: torch.Tensor) -> None:
        raise NotImplementedError  # only called where shares_kv is True

    @abstractmethod
    def _prefill(self, row: int, token_ids: list[int], embeds: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def _step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor: ...

    @abstractmethod
    def _release(self, row: int) -> None: ...


@torch.inference_mode()
def perplexity(engine: DecodeEngine, ids: list[int], window: int) -> float:
    """Perplexity of `ids` computed through the engine itself (its weight format, its kernels): each window of
    `window` predicted tokens is prefilled from its first token and the rest appended in one extend."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 2, window):
        chunk = ids[start:start + window + 1]
        row, first = engine.prefill(chunk[:1])
        logits = torch.cat([first[None], engine.extend(row, chunk[1:-1], all_logits=True)])
        nll += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
        engine.release(row)
    return math.exp(nll / count)

