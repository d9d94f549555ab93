"""One sequence in the running batch: its sampler, its stop-string watch, and its text on the way out.

A streamed row's text goes through generation's `StopStringCutter` (the code `Generator.stream` runs),
fed by the decode thread as each token is picked; the pieces are posted to the request's coroutine.
"""

from __future__ import annotations

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
        self.ids: list[int] = []
        # A streamed row's cutter decodes its text anyway and knows when a stop string came; others need a watch.
        self.cutter = StopStringCutter(tokenizer, request.stop) if request.stream else None
        self.watch = None if request.stream else StopWatch(tokenizer, request.stop)

    def add(self, token: int) -> str | None:
        """Record a generated token; "stop" when the text now holds a stop string, else None."""
        self.ids.append(token)
        if self.cutter is not None:
            self._post_piece(self.cutter.push([token]))
            return "stop" if self.cutter.stopped else None
        return "stop" if self.watch.add(token) else None

    def finish(self, end: RowEnd) -> None:
        """Tell the request the row is done (a streamed row's text has gone out piece by piece)."""
        if self.cutter is not None:
            self._post_piece(self.cutter.finish())
            self.job.post(Finished(self.index, "", end.token_ids, end.reason))
            return
        text = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.job.request.stop)
        self.job.post(Finished(self.index, text, end.token_ids, end.reason))

    def _post_piece(self, piece: str) -> None:
        if piece:
            self.job.post(Piece(self.index, piece))
