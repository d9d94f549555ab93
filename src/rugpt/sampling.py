"""Choosing the next token from logits, the same way on every engine and for every row of a batch.

The order and semantics follow transformers' logits processors: repetition penalty, n-gram blocking,
then temperature, top-k, top-p. Each row samples with its own seeded `torch.Generator`, so a row's
text depends on its seed alone, not on which other rows share its batch.

Every value the settings' validation lets through must work, because on the server one row's failure
would be a failure inside a shared batch: temperatures and penalties down to the smallest positive float
and up to the largest, top_p so small it rounds to zero in float32, top_k past the vocabulary, logits with
-inf, +inf or NaN. Only a row with no finite logit at all has nothing to pick (`NoTokenToPick`).

A row may also be held to a set of allowed tokens (a grammar's mask, rugpt.grammar): the mask applies after
the penalties, so the tokens sampling chooses from are always allowed ones. Log-probabilities reported to a
caller (`token_logprobs`) are the model's own distribution, log-softmax of the raw logits before any of this,
as vLLM reports them by default and as OpenAI describes them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

SEED_SPACE = 2**64  # torch.Generator takes seeds in [-2**63, 2**64); any int seed is taken modulo this


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
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        # Modulo the seed space, so that every int (seed + row too) is a seed; torch itself maps -1 to 2**64 - 1.
        self.generator = torch.Generator().manual_seed(seed % SEED_SPACE)

    def next_token(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """Pick the next token from this row's logits [vocab] and append it to the history.

        `allowed` (bool [n ≤ vocab], True where a token may come next; ids past it are never allowed) holds the
        row to a grammar. It outranks repetition penalty and n-gram blocking: when those ban every allowed
        token, the row picks among the allowed ones as if they were off, rather than having nothing to pick."""
        token = pick_token(self.target_logits(logits, allowed), self.params, self.generator)
        self.history.append(token)
        return token

    def target_logits(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """What `next_token` picks from: `process`, then the grammar's mask (see `next_token`)."""
        processed = self.process(logits)
        if allowed is not None:
            restrict(processed, allowed)
            if not bool(torch.isfinite(processed).any()):
                processed = restrict(logits.float().clone(), allowed)
        return processed

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits after repetition penalty and n-gram blocking (before temperature and truncation)."""
        logits = logits.float().clone()
        if self.vocab_size is not None:
            logits[self.vocab_size :] = float("-inf")
        p = self.params
        if p.repetition_penalty != 1.0 and self.history:
            seen = torch.tensor(sorted(set(self.history)), dtype=torch.long)
            scores = logits[seen]
            penalty = float32_factor(p.repetition_penalty)
            logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
        if p.no_repeat_ngram_size > 0:
            banned = banned_ngram_tokens(self.history, p.no_repeat_ngram_size)
            if banned:
                logits[list(banned)] = float("-inf")
        return logits


def restrict(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set every token of `logits` [vocab] outside `allowed` (bool [n]; ids ≥ n included) to -inf, in place."""
    n = min(allowed.numel(), logits.numel())
    logits[:n].masked_fill_(~allowed[:n], float("-inf"))
    logits[n:] = float("-inf")
    return logits


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability (natural log) under the model's own distribution at its position, and the
    likeliest tokens there as (id, log-prob), likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# JSON has no -inf or NaN: a token the model gives no chance at all is reported at this floor, as vLLM does.
LOGPROB_FLOOR = -9999.0


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int = 0,
                   vocab_size: int | None = None) -> list[TokenLogprobs]:
    """Log-softmax of raw `logits` [positions, vocab] at each position's token, with the `top` likeliest ids.

    The alternatives come from ids below `vocab_size` (padded embedding rows are never offered); the log-probs
    themselves are over the whole row of logits, as a forward pass over the text scores it (rugpt.scoring)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    logprobs = torch.nan_to_num(logprobs, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    chosen = logprobs.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logprobs.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprobs(t, lp) for t, lp in zip(tokens, chosen, strict=True)]
    offered = logprobs[:, :vocab_size] if vocab_size else logprobs
    values, indices = torch.topk(offered, min(top, offered.shape[-1]), dim=-1)
    return [TokenLogprobs(t, lp, tuple(zip(ids, vals, strict=True)))
            for t, lp, ids, vals in zip(tokens, chosen, indices.tolist(), values.tolist(), strict=True)]


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


class NoTokenToPick(RuntimeError):
    """Every logit of a row is -inf or NaN (a broken model or prompt embedding, or n-gram blocking that
    banned the whole vocabulary): that row cannot go on."""


def float32_factor(value: float) -> float:
    """`value` (> 0) clamped into float32's positive normal range, so that dividing or multiplying float32
    logits by it can overflow to ±inf but never gives 0 / 0 or inf / inf (NaN). Ordinary values pass as they are."""
    info = torch.finfo(torch.float32)
    return min(max(value, info.tiny), info.max)


def candidates(logits: torch.Tensor) -> torch.Tensor:
    """Logits with NaN as -inf (never picked) and, when some are +inf, only those left, equally likely.

    Raises NoTokenToPick when nothing is left to pick."""
    logits = torch.where(torch.isnan(logits), float("-inf"), logits)
    top = float(logits.max())
    if top == float("-inf"):
        raise NoTokenToPick(f"no token can be picked: all {logits.numel()} logits of this row are -inf or NaN")
    if top == float("inf"):
        logits = torch.where(logits == top, 0.0, float("-inf"))
    return logits


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p."""
    if not params.do_sample:
        return int(torch.argmax(candidates(logits)))
    probs, indices = sampling_probs(logits, params)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution sampling draws from: the tokens it may pick after temperature, top-k and top-p, likeliest
    first, and their probabilities (what speculative decoding checks drafts against)."""
    logits = candidates(logits)
    # Shifted so the likeliest logit is 0 before scaling: a tiny temperature sends the others to -inf
    # (effectively greedy) instead of the likeliest to +inf, and softmax never sees inf - inf.
    logits = (logits - logits.max()) / float32_factor(params.temperature)
    if 0 < params.top_k < logits.numel():
        values, indices = torch.topk(logits, params.top_k)
    else:
        values, indices = torch.sort(logits, descending=True)
    if params.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        # keep a token while the mass before it is below top_p; the first always stays, even when top_p
        # is so small that it rounds to 0 against float32 probabilities
        keep = (torch.cumsum(probs, dim=-1) - probs) < params.top_p
        keep[0] = True
        values, indices = values[keep], indices[keep]
    return torch.softmax(values, dim=-1), indices
