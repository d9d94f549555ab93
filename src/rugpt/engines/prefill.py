"""A prompt entering an engine a chunk at a time, starting from the prefix cache where it can.

Why chunks: a prefill is one forward pass over the whole prompt, and while it runs no other row of the
batch moves; a 1,000-token prompt holds every running row for as long as dozens of decode steps. Split
into chunks (`extend` on the engine), it can be interleaved with decode steps by whoever drives the
engine (the server's scheduler): running rows keep producing tokens while the prompt arrives, and the
prompt's logits are the same as from one prefill, to float rounding.

Why the cache comes first: a prompt that starts with blocks another row computed (the same chat, adventure
or few-shot prompt) opens its row from them and computes only the rest; once its prompt is in, its own
whole blocks go into the cache for the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rugpt.engines.base import DecodeEngine
from rugpt.engines.prefix_cache import PrefixCache


@dataclass(eq=False)
class PromptPrefill:
    """One prompt on its way into `engine`: call `advance` until `logits` is set, or `abandon` it.

    A prompt given as `embeds` (a trained prompt) enters in one prefill and never touches the cache: the
    engine's extend takes token ids only, and equal ids there do not mean equal inputs.
    """

    engine: DecodeEngine
    token_ids: list[int]
    embeds: torch.Tensor | None = None
    cache: PrefixCache | None = None
    row: int | None = None  # the engine row, once opened
    done: int = 0  # prompt tokens in the row's cache
    reused: int = 0  # of them, those taken from the prefix cache
    logits: torch.Tensor | None = None  # next-token logits [vocab], once the whole prompt is in

    def __post_init__(self) -> None:
        self.engine.check_prompt(self.token_ids)  # a prompt that can never fit fails before any work

    @property
    def uses_cache(self) -> bool:
        return self.cache is not None and self.embeds is None

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done

    def advance(self, tokens: int | None = None) -> int:
        """Compute up to `tokens` more prompt tokens (None: all the rest) in one forward pass; returns how many
        were computed. The first call opens the row, from the cache when the prompt starts with cached blocks."""
        if self.row is None:
            self._open()
        if self.embeds is not None:  # a trained prompt: all of it in one prefill
            take = self.remaining
            self.row, logits = self.engine.prefill(self.token_ids, self.embeds)
        else:
            take = self.remaining if tokens is None else max(1, min(tokens, self.remaining))
            chunk = self.token_ids[self.done : self.done + take]
            if self.row is None:
                self.row, logits = self.engine.prefill(chunk)
            else:
                logits = self.engine.extend(self.row, chunk)
        self.done += take
        if self.remaining == 0:
            self.logits = logits
            if self.uses_cache:
                self.cache.store(self.engine, self.row, self.token_ids)
        return take

    def abandon(self) -> None:
        """Free the engine row of a prompt that will not be finished."""
        if self.row is not None:
            self.engine.release(self.row)
            self.row = None

    def _open(self) -> None:
        if not self.uses_cache:
            return
        hit = self.cache.lookup(self.token_ids)
        if hit.blocks:
            self.row = self.cache.open_row(self.engine, hit)
            self.done = self.reused = hit.tokens
