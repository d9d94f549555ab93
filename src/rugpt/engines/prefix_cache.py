"""Automatic prefix caching: keys and values of prompts already computed, reused by prompts that start the same.

Conversations repeat themselves: each adventure turn, each chat message, each text under one few-shot
prompt sends the whole history again. The cache keeps the KV state of computed tokens in blocks of
`BLOCK_TOKENS` (as vLLM's automatic prefix caching does): block i of a sequence is keyed by (the id of
block i-1, its own tokens), so blocks form a tree of token prefixes and a lookup walks it from the root,
block by block; keys hold the tokens themselves, so unlike a hash chain two prefixes never collide.

Memory is bounded by a budget in bytes, least recently used blocks out. Using a block also uses its
ancestors, and they are touched after it, so a parent is always more recent than its children: the least
recently used block is always a leaf, and evicting it never strands a child whose prefix is gone.

A block's KV depends on everything before it in its sequence and on the engine's weights, so one cache
serves one engine, and rows whose prompt enters as embeddings (trained prompts) stay out of it: the same
token ids there do not mean the same inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from rugpt.engines.base import DecodeEngine

BLOCK_TOKENS = 16
_ROOT = -1  # the parent id of a sequence's first block


@dataclass(eq=False)
class _Block:
    id: int
    parent: int  # id of the block before it, _ROOT for a first block
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2, heads, BLOCK_TOKENS, head_dim], the engine's export_kv layout

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        return self.parent, self.tokens

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class CacheHit:
    """The cached blocks a prompt starts with, in order; `tokens` of the prompt they hold."""

    blocks: tuple[_Block, ...]

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK_TOKENS


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # of them, those that found at least one block
    tokens_saved: int = 0  # prompt tokens taken from the cache instead of computed
    evicted_blocks: int = 0


class PrefixCache:
    """Blocks of computed KV under `budget_bytes`; `lookup` and `open_row` start rows, `store` keeps new blocks."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._next_id = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, token_ids: list[int]) -> CacheHit:
        """The longest run of cached blocks `token_ids` starts with, leaving at least its last token out: a row
        needs one computed token for its next-token logits."""
        self.stats.lookups += 1
        usable = (len(token_ids) - 1) // BLOCK_TOKENS
        chain = self._walk(token_ids, usable)
        if chain:
            self.stats.hits += 1
            self.stats.tokens_saved += len(chain) * BLOCK_TOKENS
            self._touch(chain)
        return CacheHit(tuple(chain))

    def open_row(self, engine: DecodeEngine, hit: CacheHit) -> int:
        """A new engine row holding the hit's tokens (extend it by the rest of the prompt for logits)."""
        return engine.open_row(torch.cat([block.kv for block in hit.blocks], dim=3))

    def store(self, engine: DecodeEngine, row: int, token_ids: list[int]) -> None:
        """Keep the whole blocks of `token_ids` (the tokens in `row`'s cache, in order) that are not kept yet."""
        full = min(len(token_ids), engine.lengths[row]) // BLOCK_TOKENS
        chain = self._walk(token_ids, full)
        parent = chain[-1].id if chain else _ROOT
        for index in range(len(chain), full):
            start = index * BLOCK_TOKENS
            block = _Block(self._next_id, parent, tuple(token_ids[start : start + BLOCK_TOKENS]),
                           engine.export_kv(row, start, start + BLOCK_TOKENS))
            self._next_id += 1
            self._add(block)
            chain.append(block)
            parent = block.id
        self._touch(chain)
        self._evict()

    def _walk(self, token_ids: list[int], most: int) -> list[_Block]:
        chain: list[_Block] = []
        parent = _ROOT
        for index in range(most):
            block = self._blocks.get((parent, tuple(token_ids[index * BLOCK_TOKENS : (index + 1) * BLOCK_TOKENS])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def _add(self, block: _Block) -> None:
        self._blocks[block.key] = block
        self._bytes += block.nbytes

    def _touch(self, chain: list[_Block]) -> None:
        # Deepest first, so that every parent ends up more recent than its children (see the module docstring).
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _evict(self) -> None:
        while self._bytes > self.budget_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)  # a leaf: its children were used before it
            self._bytes -= block.nbytes
            self.stats.evicted_blocks += 1
