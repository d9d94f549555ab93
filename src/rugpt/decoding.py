"""One sequence's decode, written once for `Generator` and for the server's batching scheduler.

A row holds its sampler, its text and its finish rules: end-of-text ends it with "stop" (that token is
not part of the text), a stop string ends it with "stop" (the text is cut before it), its token budget or
a full context ends it with "length". `advance` picks a token for every row of a batch, then steps the
engine once for the rows that go on; a row whose pick fails is reported on its own, so one row's fault
never stops the others.

Text is built incrementally: each token is decoded in a small window (never the whole text again), and
stop strings are matched with Knuth-Morris-Pratt automata fed only the new characters, so the work per
token does not grow with the text — on the server it runs inside the one decode thread.

Two things only some rows ask for, and only they pay for: a grammar (rugpt.grammar: the row's sampler chooses
among the tokens its matcher allows, and the row ends with "stop" once the grammar is complete) and
log-probabilities (each picked token's log-prob under the model's raw distribution, with the likeliest
alternatives: rugpt.sampling.token_logprobs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from rugpt.engines.base import DecodeEngine
from rugpt.sampling import RowSampler, SamplingParams, TokenLogprobs, token_logprobs

if TYPE_CHECKING:
    from rugpt.grammar import GrammarMatcher, JsonGrammar

FinishReason = Literal["stop", "length"]
# A character is at most 4 UTF-8 bytes, so a character split between tokens is whole within a few tokens;
# past this many pending tokens a trailing U+FFFD stands for invalid bytes and is let through, which keeps
# the decoded window (and the work per token) small even when a model emits byte garbage.
MAX_PENDING_TOKENS = 32


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    positions = [text.find(s) for s in stop if s in text]
    return text[: min(positions)] if positions else text


class IncrementalText:
    """Token ids to text, decoding only the tokens since the last complete character.

    Byte-level BPE can split a multi-byte character between tokens; such a token decodes to U+FFFD
    on its own, so its text waits until the character is complete. The previous window is decoded
    along with the new tokens (as vLLM does) so that tokenizers which join tokens with context-dependent
    spaces give the same text as decoding everything at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here: the start of the last confirmed piece
        self._read = 0  # tokens before this are text already

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (often all of its text, sometimes nothing yet)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text of the tokens still waiting, incomplete characters included (as U+FFFD)."""
        return self._advance(final=True) if self._read < len(self.ids) else ""

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        pending = len(self.ids) - self._read
        if not final and window.endswith("\ufffd") and pending < MAX_PENDING_TOKENS:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return window[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class StopMatcher:
    """Finds one stop string in text fed piece by piece (Knuth-Morris-Pratt), in time linear in the text.

    `partial` is the length of the longest end of the text so far that begins the stop string: the part
    a stream must hold back. The failure table is built only as far as the text has reached, so a stop
    string far longer than anything the model can write costs nothing.
    """

    def __init__(self, stop: str):
        if not stop:
            raise ValueError("a stop string must not be empty")
        self.stop = stop
        self.partial = 0
        self._border = [0]  # _border[i]: longest proper prefix of stop[: i + 1] that is also its suffix

    def feed(self, text: str) -> int | None:
        """Feed more text; the offset in `text` just past the first full match, or None."""
        stop, matched = self.stop, self.partial
        for offset, char in enumerate(text):
            while matched and stop[matched] != char:
                matched = self._border_of(matched - 1)
            if stop[matched] == char:
                matched += 1
            if matched == len(stop):
                self.partial = 0
                return offset + 1
        self.partial = matched
        return None

    def _border_of(self, i: int) -> int:
        stop, border = self.stop, self._border
        while len(border) <= i:
            j, k = len(border), border[-1]
            while k and stop[j] != stop[k]:
                k = border[k - 1]
            border.append(k + 1 if stop[j] == stop[k] else 0)
        return border[i]


class StopStringCutter:
    """Turns token ids into text pieces, holding back what may be the start of a stop string.

    Push tokens as they come (`push`, then `finish`), or pull pieces from an iterator of token batches
    (`pieces`); the pieces joined are the generated text cut at the first stop string, which `text` holds.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.stop = tuple(stop)
        self._decoder = IncrementalText(tokenizer)
        self._matchers = [StopMatcher(s) for s in self.stop]
        self._text = ""
        self._cut: int | None = None  # where the first stop string begins, once one came
        self._sent = 0

    @property
    def stopped(self) -> bool:
        """A stop string came: nothing more is released."""
        return self._cut is not None

    @property
    def text(self) -> str:
        """The text so far, cut before the first stop string (all of it once `finish` was called)."""
        return self._text if self._cut is None else self._text[: self._cut]

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; return the text that became safe to show (often empty)."""
        for token in token_ids:
            if self.stopped:
                break
            self._add(self._decoder.push(token))
        return self._release(self._safe_end())

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        if not self.stopped:
            self._add(self._decoder.flush())
        return self._release(len(self.text))

    def pieces(self, token_batches: Iterable[Iterable[int]]) -> Iterator[str]:
        for batch in token_batches:
            if piece := self.push(batch):
                yield piece
            if self.stopped:
                return
        if piece := self.finish():
            yield piece

    def _add(self, new: str) -> None:
        if not new or self.stopped:
            return
        start = len(self._text)
        self._text += new
        # Each matcher reports its first match; the earliest start among them wins, as in cut_at_stop.
        starts = [start + end - len(m.stop) for m in self._matchers if (end := m.feed(new)) is not None]
        if starts:
            self._cut = min(starts)

    def _safe_end(self) -> int:
        if self.stopped:
            return self._cut
        return len(self._text) - max((m.partial for m in self._matchers), default=0)

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece, self._sent = self._text[self._sent : upto], upto
        return piece


@dataclass(frozen=True)
class RowSettings:
    """How a row decodes: how it samples, how many tokens it may generate, which strings end it."""

    params: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # report each token's log-prob with this many alternatives; None: none
    grammar: JsonGrammar | None = None  # output held to it (each row gets its own matcher)


@dataclass(frozen=True)
class RowStep:
    """What one pick did to a row."""

    token: int | None  # the generated token; None when it was end-of-text, which is not part of the text
    piece: str  # text that became safe to show (the rest of the text when the row finished)
    finish: FinishReason | None  # set when this pick ended the row
    logprobs: TokenLogprobs | None = None  # the picked token's (end-of-text's too), when the row reports them


@dataclass(eq=False)
class RowDecoder:
    """One sequence being decoded: its engine row and next-token logits, its sampler, text and limits."""

    engine_row: int
    logits: torch.Tensor  # [vocab] for the next pick
    sampler: RowSampler
    cutter: StopStringCutter
    eos_id: int | None
    limit: int  # most tokens it may generate: its budget, or fewer when the context fills first
    ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    grammar: GrammarMatcher | None = None
    top_logprobs: int | None = None  # None: no log-probs for this row

    @property
    def text(self) -> str:
        return self.cutter.text

    def pick(self) -> RowStep:
        """Sample the next token from `logits` (among the grammar's allowed ones) and apply the finish rules."""
        allowed = self.grammar.allowed() if self.grammar is not None else None
        return self.take(self.sampler.next_token(self.logits, allowed))

    def take(self, token: int) -> RowStep:
        """Apply the finish rules to a token already chosen from `logits` (speculative decoding chooses it)."""
        logprobs = None
        if self.top_logprobs is not None:
            [logprobs] = token_logprobs(self.logits[None], [token], self.top_logprobs, self.sampler.vocab_size)
        if token == self.eos_id:
            return self._end(RowStep(None, self.cutter.finish(), "stop", logprobs))
        if self.grammar is not None:
            self.grammar.accept(token)
        self.ids.append(token)
        piece = self.cutter.push([token])
        if self.cutter.stopped or (self.grammar is not None and self.grammar.done):
            return self._end(RowStep(token, piece + self.cutter.finish(), "stop", logprobs))
        if len(self.ids) >= self.limit:
            return self._end(RowStep(token, piece + self.cutter.finish(), "length", logprobs))
        return RowStep(token, piece, None, logprobs)

    def close(self) -> str:
        """End the row early (cancelled): the text still held back."""
        return self.cutter.finish()

    def _end(self, step: RowStep) -> RowStep:
        self.finish_reason = step.finish
        return step


def start_row(engine: DecodeEngine, tokenizer, prompt_ids: list[int], settings: RowSettings, seed: int | None,
              embeds: torch.Tensor | None = None, prefilled: tuple[int, torch.Tensor] | None = None) -> RowDecoder:
    """Prefill `prompt_ids` (or their `embeds`, a trained prompt) on `engine` and set up the row's decode.

    `prefilled` is (engine row, next-token logits) of a row that already holds the prompt (the server prefills
    in chunks and from its prefix cache, rugpt.engines.prefill); it is used instead of a prefill."""
    sampler = RowSampler(settings.params, prompt_ids, seed, engine.sampleable_vocab)  # before the engine row
    cutter = StopStringCutter(tokenizer, settings.stop)
    grammar = settings.grammar.matcher() if settings.grammar is not None else None
    engine_row, logits = prefilled if prefilled is not None else engine.prefill(prompt_ids, embeds)
    # The context holds the prompt plus every generated token but the last, which needs no step after it.
    room = engine.context_length - engine.lengths[engine_row] + 1
    return RowDecoder(engine_row, logits, sampler, cutter, tokenizer.eos_token_id,
                      min(settings.max_new_tokens, room), grammar=grammar, top_logprobs=settings.logprobs)


def advance(engine: DecodeEngine, rows: list[RowDecoder]) -> list[RowStep | Exception]:
    """Pick one token for every row, then step the engine once for the rows that go on.

    Returns one outcome per row, in order: its RowStep, or the exception its pick raised (that row takes
    no part in the step; the others go on). Rows that finished keep their engine rows: the caller
    releases them. An exception of the engine step itself is raised: it cannot be told whose row broke it.
    """
    outcomes: list[RowStep | Exception] = []
    going: list[RowDecoder] = []
    for row in rows:
        try:
            step = row.pick()
        except Exception as exc:  # this row's fault (its settings, its logits): it alone stops
            outcomes.append(exc)
            continue
        outcomes.append(step)
        if step.finish is None:
            going.append(row)
    if going:
        logits = engine.step([row.engine_row for row in going], [row.ids[-1] for row in going])
        for row, row_logits in zip(going, logits, strict=True):
            row.logits = row_logits
    return outcomes
