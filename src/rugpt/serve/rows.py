"""One row of a job in the running batch: the decode core's row (`rugpt.decoding`) plus where its events go.

The decode rules live in the core, shared with `Generator`; this only routes a row's text to its request:
a streamed row's pieces as they become safe to show, every row's end as a `Finished` event. Log-probs, when
the request asked for them, travel with the piece that follows their token (or with the end).
"""

from __future__ import annotations

from rugpt.decoding import RowDecoder, RowStep
from rugpt.serve.jobs import Finished, Job, Piece
from rugpt.speculative import SpeculatingRow


class ServedRow:
    """A row of `job` (its `index`-th sequence); touched by the decode thread only. `speculating` wraps `row`
    when the server drafts (--speculate)."""

    def __init__(self, job: Job, index: int, row: RowDecoder, speculating: SpeculatingRow | None = None):
        self.job, self.index, self.row, self.speculating = job, index, row, speculating
        self.logprobs: list = []  # every token's, or a streamed row's not yet sent

    def report(self, step: RowStep) -> None:
        """Send a streamed row's new text to its request."""
        if step.logprobs is not None:
            self.logprobs.append(step.logprobs)
        if self.job.request.stream and step.piece:
            self.job.post(Piece(self.index, step.piece, tuple(self.logprobs)))
            self.logprobs.clear()

    def finish(self, reason: str) -> None:
        """Tell the request the row is done: a streamed row's last held-back text, or a plain row's whole text."""
        rest = self.row.close() if reason == "cancelled" else ""
        if self.job.request.stream:
            if rest:
                self.job.post(Piece(self.index, rest))
            self.job.post(Finished(self.index, "", tuple(self.row.ids), reason, tuple(self.logprobs)))
            return
        self.job.post(Finished(self.index, self.row.text, tuple(self.row.ids), reason, tuple(self.logprobs)))
