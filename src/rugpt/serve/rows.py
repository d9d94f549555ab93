"""One sequence in the running batch: its sampler, its stop-string watch, and its text on the way out.

A streamed row's text is cut by generation's `StopStringCutter`, which pulls token batches from an
iterator; the decode loop pushes tokens instead. So each streamed row gets a small daemon thread that
runs the cutter over a blocking feed of tokens, the same code that `Generator.stream` runs, and posts
the pieces to the request's coroutine. Tokenizer calls release the GIL, so these threads are cheap.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from rugpt.generation import StopStringCutter, StopWatch, cut_at_stop
from rugpt.sampling import RowSampler
from rugpt.serve.jobs import Finished, Job, Piece, RowSpec


@dataclass(frozen=True)
class RowEnd:
    reason: str
    token_ids: tuple[int, ...]


class DecodeRow:
    """A row of one job in the engine; touched by the decode thread only (and its text thread)."""

    def __init__(self, job: Job, index: int, engine_row: int, logits: torch.Tensor, spec: RowSpec, tokenizer,
                 vocab_size: int):
        self.job, self.index, self.engine_row, self.logits = job, index, engine_row, logits
        self.tokenizer = tokenizer
        request = job.request
        self.sampler = RowSampler(request.params, spec.prompt_ids, spec.seed, vocab_size)
        self.watch = StopWatch(tokenizer, request.stop)
        self.ids: list[int] = []
        self._feed: queue.SimpleQueue | None = None
        if request.stream:
            self._feed = queue.SimpleQueue()
            threading.Thread(target=self._stream_text, name=f"rugpt-text-{job.id}-{index}", daemon=True).start()

    def add(self, token: int) -> str | None:
        """Record a generated token; "stop" when the text now holds a stop string, else None."""
        self.ids.append(token)
        if self._feed is not None:
            self._feed.put([token])
        return "stop" if self.watch.add(token) else None

    def finish(self, end: RowEnd) -> None:
        """Tell the request the row is done; a streamed row's text thread says it after its last piece."""
        if self._feed is not None:
            self._feed.put(end)
            return
        text = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.job.request.stop)
        self.job.post(Finished(self.index, text, end.token_ids, end.reason))

    def _stream_text(self) -> None:
        feed = self._feed
        ends: list[RowEnd] = []

        def batches():
            while isinstance(item := feed.get(), list):
                yield item
            ends.append(item)

        for piece in StopStringCutter(self.tokenizer, self.job.request.stop).pieces(batches()):
            self.job.post(Piece(self.index, piece))
        while not ends:  # the cutter met a stop string; the decode loop's end mark follows that very token
            item = feed.get()
            if isinstance(item, RowEnd):
                ends.append(item)
        self.job.post(Finished(self.index, "", ends[0].token_ids, ends[0].reason))
