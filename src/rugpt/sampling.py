"""Choosing the next token from logits, the same way on every engine and for every row of a batch.

The order and semantics follow transformers' logits processors: repetition penalty, n-gram blocking,
then temperature, top-k, top-p. Each row samples with its own seeded `torch.Generator`, so a row's
text depends on its seed alone, not on which other rows share its batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """The per-token part of generation settings."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


@dataclass
class RowSampler:
    """Picks tokens for one sequence; `history` is the prompt plus everything picked so far.

    `vocab_size`, when given, is how many ids may be generated: ids at or past it (padded embedding rows,
    trained-prompt tokens) are never picked and are left out of the history."""

    params: SamplingParams
    history: list[int]
    seed: int | None = None
    vocab_size: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Trained-prompt tokens lie past the output vocabulary: nothing to penalise or ban there.
        self.history = [t for t in self.history if self.vocab_size is None or t < self.vocab_size]
        self.generator = torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick the next token from this row's logits [vocab] and append it to the history."""
        token = pick_token(self.process(logits), self.params, self.generator)
        self.history.append(token)
        return token

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits after repetition penalty and n-gram blocking (before temperature and truncation)."""
        logits = logits.float().clone()
        if self.vocab_size is not None:
            logits[self.vocab_size :] = float("-inf")
        p = self.params
        if p.repetition_penalty != 1.0 and self.history:
            seen = torch.tensor(sorted(set(self.history)), dtype=torch.long)
            scores = logits[seen]
            logits[seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        if p.no_repeat_ngram_size > 0:
            banned = banned_ngram_tokens(self.history, p.no_repeat_ngram_size)
            if banned:
                logits[list(banned)] = float("-inf")
        return logits


def banned_ngram_tokens(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `history`."""
    if len(history) < n:
        return set()
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    banned = set()
    for i in range(len(history) - n + 1):
        if tuple(history[i : i + n - 1]) == prefix:
            banned.add(history[i + n - 1])
    return banned


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p."""
    if not params.do_sample:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        values, indices = torch.topk(logits, params.top_k)
    else:
        values, indices = torch.sort(logits, descending=True)
    if params.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        # keep a token while the mass before it is below top_p (so the first token always stays)
        keep = (torch.cumsum(probs, dim=-1) - probs) < params.top_p
        values, indices = values[keep], indices[keep]
    probs = torch.softmax(values, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])
