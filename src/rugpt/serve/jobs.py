"""What a request asks of the scheduler (`DecodeRequest`), the `Job` it becomes, and the events it hears back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rugpt.decoding import RowSettings
from rugpt.sampling import TokenLogprobs


@dataclass(frozen=True)
class RowSpec:
    """One sequence to decode: its prompt and its seed (None: a fresh random one)."""

    prompt_ids: list[int]
    seed: int | None = None


@dataclass
class DecodeRequest:
    """What one request asks the scheduler for: rows decoded with the same settings.

    `embed`, when given, runs in the worker thread before a row's prefill and returns the prompt's
    input embeddings [len(prompt_ids), hidden] (a trained prompt), or None for plain token embeddings.
    """

    rows: list[RowSpec]
    settings: RowSettings
    stream: bool = False
    embed: Callable[[list[int]], torch.Tensor | None] | None = None


@dataclass(frozen=True)
class Started:
    waited: float  # seconds spent in the queue


@dataclass(frozen=True)
class Piece:
    index: int
    text: str  # a streamed row's next piece of text, held back while it may start a stop string
    logprobs: tuple[TokenLogprobs, ...] = ()  # of the tokens picked since the last piece, when asked for


@dataclass(frozen=True)
class Finished:
    index: int
    text: str  # the whole text of a non-streamed row (cut at a stop string); "" for a streamed one
    token_ids: tuple[int, ...]  # the generated tokens (without end-of-text)
    reason: str  # "stop", "length" or "cancelled"
    logprobs: tuple[TokenLogprobs, ...] = ()  # when asked for: every token's (a streamed row: those not yet sent)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Failed:
    error: Exception  # the scheduler's refusal, or the fault of this request's row; serve/errors.py maps it


Event = Started | Piece | Finished | Failed


@dataclass(eq=False)
class Job:
    """A submitted request as the scheduler keeps it; `events` is read by the request's coroutine."""

    id: str
    request: DecodeRequest
    key: str | None
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    started_at: float | None = None
    cancel_cause: str | None = None  # "client", "disconnect", "timeout" or "shutdown"
    open_rows: int = 0
    priority: int = 0  # lower starts first; equal priorities start in order of arrival

    def post(self, event: Event) -> None:
        """Hand an event to the request's coroutine; safe from any thread, a no-op once the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass
