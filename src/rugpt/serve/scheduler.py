"""The batching scheduler: the one place where requests of different people are decoded together.

Requests wait in a bounded queue, lower `priority` first and then in order of arrival (a key over its
per-key limit is refused at submit, so it never holds up others); one worker thread owns the decode engine
and runs a loop of (admit waiting requests into free rows → drop cancelled rows → feed new prompts to the
engine → sample one token per row → one batched engine step). Sampling, stop strings and the finish rules
are the decode core's (`rugpt.decoding`, shared with `Generator`); this module keeps admission, cancellation
and routing events only. A request joins the running batch between two steps and leaves it as soon as it is
done (continuous batching, as in Orca, OSDI '22), so rows of different lengths, sampling settings and trained
prompts share every step. A new row's prompt enters in chunks of `prefill_chunk` tokens, at most
`prefill_chunks_per_step` chunks between two steps (chunked prefill, as in Sarathi-Serve, OSDI '24), so a long
prompt never stalls the running rows for long; it starts from the prefix cache's blocks where it can
(rugpt.engines.prefill), and a finished row's prompt and text go into that cache for the next turn. Each row
samples with its own seeded generator, so its text does not depend on what it was batched with. A row
whose prefill or pick fails (its prompt's embedding, its logits) fails its own request only; the rest of
the batch goes on.

Refusals are plain exceptions (`Busy`, `NotReady`, `DuplicateRequestId`), raised by `submit` or carried,
like a row's fault, by a `Failed` event; serve/errors.py turns them into HTTP answers.

The asyncio side talks to the worker through a lock-protected queue and per-request asyncio queues
fed with `loop.call_soon_threadsafe`; torch releases the GIL, so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass

from rugpt.decoding import advance, start_row
from rugpt.engines.base import DecodeEngine
from rugpt.engines.prefill import PromptPrefill
from rugpt.engines.prefix_cache import PrefixCache
from rugpt.serve.jobs import DecodeRequest, Event, Failed, Finished, Job, Started
from rugpt.serve.metrics import ServerMetrics
from rugpt.serve.rows import ServedRow
from rugpt.speculative import Speculator, advance_speculating

log = logging.getLogger(__name__)


def _waiting_order(job: Job) -> tuple[int, float]:
    return job.priority, job.queued_at


@dataclass(eq=False)
class _PendingRow:
    """A row of a started job whose prompt is still entering the engine (worker thread only)."""

    job: Job
    index: int
    prefill: PromptPrefill


class Refused(Exception):
    """The scheduler cannot take or finish a request; `reason` says why, in a word (metrics, error codes)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Busy(Refused):
    """Too many requests waiting, or too many of one key: retry after `retry_after` seconds (None: unknown)."""

    def __init__(self, message: str, reason: str, retry_after: float | None):
        super().__init__(message, reason)
        self.retry_after = retry_after


class NotReady(Refused):
    """Shutting down, crashed, or waited too long in the queue."""


class DuplicateRequestId(Refused):
    """A request with this id is already waiting or running."""


class Ticket:
    """The asyncio side's handle on a submitted request."""

    def __init__(self, scheduler: BatchScheduler, job: Job, position: int, expected_wait: float | None):
        self._scheduler, self._job = scheduler, job
        self.id = job.id
        self.position_at_submit, self.expected_wait_at_submit = position, expected_wait

    @property
    def rows(self) -> int:
        return len(self._job.request.rows)

    def queue_position(self) -> tuple[int, float | None]:
        """(1-based place among waiting requests, expected seconds until start); (0, 0.0) once started."""
        return self._scheduler.queue_position(self._job)

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when `timeout` seconds pass without one."""
        try:
            return await asyncio.wait_for(self._job.events.get(), timeout)
        except TimeoutError:
            return None

    def cancel(self, cause: str = "client") -> bool:
        return self._scheduler.cancel(self.id, cause)


class BatchScheduler:
    """Owns the engine through one worker thread; `submit` from the event loop, `stop` at shutdown."""

    def __init__(self, engine: DecodeEngine, tokenizer, metrics: ServerMetrics | None = None, *,
                 max_waiting: int = 64, max_queue_seconds: float = 0.0, max_inflight_per_key: int = 0,
                 prefix_cache_bytes: int = 0, prefill_chunk: int = 0, prefill_chunks_per_step: int = 1,
                 speculator: Speculator | None = None):
        """`prefix_cache_bytes` 0 turns the prefix cache off (so does an engine that cannot export its KV);
        `prefill_chunk` 0 prefills each prompt whole, before the next step; with a `speculator` every row drafts,
        in the rounds where a draft pays, and checks its drafts in one extend while the rows without drafts step
        together."""
        self.engine, self.tokenizer = engine, tokenizer
        self.metrics = metrics or ServerMetrics()
        self.max_batch = engine.max_rows
        self.max_waiting, self.max_queue_seconds = max_waiting, max_queue_seconds
        self.max_inflight_per_key = max_inflight_per_key
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes and engine.shares_kv else None
        self.prefill_chunk, self.prefill_chunks_per_step = prefill_chunk, prefill_chunks_per_step
        self.speculator = speculator
        if speculator is not None:
            speculator.reserve(engine.max_rows)
        self._prefilling: list[_PendingRow] = []  # worker thread only, in order of admission
        self._cached_prompts: dict[ServedRow, list[int]] = {}  # rows whose whole text goes to the cache at the end
        self._cond = threading.Condition()
        self._waiting: list[Job] = []  # no free rows for them yet, in order of (priority, arrival)
        self._ready: list[Job] = []  # rows reserved, to be prefilled by the decode thread
        self._jobs: dict[str, Job] = {}  # waiting and running, by id
        self._per_key: Counter[str] = Counter()
        self._reserved = 0  # rows held by running jobs (and by jobs being prefilled)
        self._rows: list[ServedRow] = []  # worker thread only
        self._mean_run: float | None = None  # moving average of a request's decode time, for wait estimates
        self._stopping = False
        self._crashed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rugpt-decode", daemon=True)

    # --- event-loop side ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self._crashed is None

    def submit(self, request: DecodeRequest, key: str | None = None, job_id: str | None = None,
               priority: int = 0) -> Ticket:
        """Queue a request; call on the event loop. Waiting requests start in order of (priority, arrival),
        lower priority first. Raises Busy, DuplicateRequestId or NotReady when it cannot be taken."""
        job = Job(job_id or f"req-{secrets.token_hex(12)}", request, key, asyncio.get_running_loop(),
                  priority=priority)
        with self._cond:
            self._check_admissible(job)
            self._jobs[job.id] = job
            if key is not None:
                self._per_key[key] += 1
            # bisect.insort is stable (after equal keys): arrival order among equal priorities.
            bisect.insort_right(self._waiting, job, key=_waiting_order)
            self._promote()
            position, wait = self._position(job)
            self._cond.notify()
        return Ticket(self, job, position, wait)

    def cancel(self, job_id: str, cause: str = "client") -> bool:
        """Cancel a waiting or running request; a running one leaves the batch before the next step."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.cancel_cause is not None:
                return False
            job.cancel_cause = cause
            if job in self._waiting or job in self._ready:  # not started: answer at once
                if job in self._ready:
                    self._ready.remove(job)
                    self._reserved -= len(job.request.rows)
                else:
                    self._waiting.remove(job)
                self._forget(job)
                self._promote()
                for index in range(len(job.request.rows)):
                    job.post(Finished(index, "", (), "cancelled"))
        self.metrics.cancellations.labels(cause).inc()
        return True

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """(whether a request with this id is waiting or running, the API key that sent it)."""
        with self._cond:
            job = self._jobs.get(job_id)
            return (job is not None, job.key if job else None)

    def queue_position(self, job: Job) -> tuple[int, float | None]:
        with self._cond:
            return self._position(job) if job in self._waiting else (0, 0.0)

    async def stop(self, grace: float) -> None:
        """Refuse new requests, fail waiting ones, give running ones `grace` seconds, then fail them; never hangs."""
        with self._cond:
            self._stopping = True
            for job in list(self._waiting):
                job.post(Failed(NotReady("the server is shutting down; retry later", "shutting_down")))
                self._forget(job)
            self._waiting.clear()
            self.metrics.queue_depth.set(0)
            self._cond.notify()
        if not self._thread.is_alive():
            return
        await asyncio.to_thread(self._thread.join, grace)
        if self._thread.is_alive():
            with self._cond:
                for job in self._jobs.values():
                    job.cancel_cause = job.cancel_cause or "shutdown"
            await asyncio.to_thread(self._thread.join, 5.0)  # one prefill or step
        if self._thread.is_alive():
            log.warning("the decode thread is still busy after shutdown; leaving it behind (daemon thread)")

    # --- under the lock ----------------------------------------------------------------------------------------

    def _check_admissible(self, job: Job) -> None:
        if self._stopping or self._crashed is not None:
            raise NotReady("the server is shutting down or its decode loop failed; retry later", "not_ready")
        if job.id in self._jobs:
            raise DuplicateRequestId(f"a request with id {job.id!r} is already running; use another X-Request-Id",
                                     "duplicate_request_id")
        limit = self.max_inflight_per_key
        if limit and job.key is not None and self._per_key[job.key] >= limit:
            self.metrics.rejections.labels("per_key_limit").inc()
            raise Busy(f"this API key already has {limit} requests running or waiting (the per-key limit); "
                       f"wait for one to finish", "per_key_limit", self._mean_run)
        must_wait = self._waiting or self.max_batch - self._reserved < len(job.request.rows)
        if must_wait and len(self._waiting) >= self.max_waiting:  # requests about to start do not count
            self.metrics.rejections.labels("queue_full").inc()
            _, wait = self._position_after(len(self._waiting), sum(len(j.request.rows) for j in self._waiting))
            raise Busy(f"the server is busy: {len(self._waiting)} requests are already waiting; retry later",
                       "queue_full", wait)

    def _promote(self) -> None:
        """Reserve rows for waiting requests, in order, while the first of them fits."""
        while self._waiting and len(self._waiting[0].request.rows) <= self.max_batch - self._reserved:
            job = self._waiting.pop(0)
            self._reserved += len(job.request.rows)
            self._ready.append(job)
        self.metrics.queue_depth.set(len(self._waiting))

    def _position(self, job: Job) -> tuple[int, float | None]:
        rows = 0
        for place, waiting in enumerate(self._waiting, start=1):
            rows += len(waiting.request.rows)
            if waiting is job:
                return self._position_after(place, rows)
        return 0, 0.0

    def _position_after(self, place: int, rows_through: int) -> tuple[int, float | None]:
        """Place in the queue and expected wait of a request with `rows_through` rows up to and including its own."""
        short = rows_through - (self.max_batch - self._reserved)
        if short <= 0:
            return 0, 0.0
        # Rows leave the batch at about max_batch / mean_run per second; `short` of them must leave first.
        wait = None if self._mean_run is None else short * self._mean_run / self.max_batch
        return place, wait

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if job.key is not None:
            self._per_key[job.key] -= 1
            if self._per_key[job.key] <= 0:
                del self._per_key[job.key]

    # --- worker thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                taken = self._take()
                if taken is None:
                    return
                for job in taken:
                    self._start(job)
                self._drop_cancelled()
                self._prefill_some()
                if self._rows:
                    self._step_or_fail()
        except BaseException as exc:  # the decode loop must never die silently: fail everyone, report unhealthy
            self._crashed = exc
            self._fail_all(exc if isinstance(exc, Exception) else RuntimeError(f"decode loop ended: {exc!r}"))
        finally:
            self.engine.release_all()

    def _take(self) -> list[Job] | None:
        """Jobs that fit the free rows, first come first served; blocks while idle; None once stopped and idle."""
        with self._cond:
            while True:
                self._expire_waiting()
                self._promote()
                taken, self._ready = self._ready, []
                if taken or self._rows or self._prefilling:
                    return taken
                if self._stopping:
                    return None
                self._cond.wait(timeout=1.0)

    def _expire_waiting(self) -> None:
        if not self.max_queue_seconds:
            return
        now = time.monotonic()
        # With priorities the oldest request need not be first in line: look at every one.
        for job in [j for j in self._waiting if now - j.queued_at > self.max_queue_seconds]:
            self._waiting.remove(job)
            self._forget(job)
            self.metrics.rejections.labels("queue_timeout").inc()
            job.post(Failed(NotReady(
                f"the request waited {now - job.queued_at:.1f} s for a free slot, more than this server's limit "
                f"of {self.max_queue_seconds:g} s (--max-queue-seconds); retry later", "queue_timeout")))

    def _start(self, job: Job) -> None:
        """Queue the job's prompts for prefill; its rows join the batch as their prompts are in."""
        job.started_at = time.monotonic()
        job.post(Started(job.started_at - job.queued_at))
        self.metrics.queue_wait.observe(job.started_at - job.queued_at)
        request = job.request
        try:
            pending = []
            for index, spec in enumerate(request.rows):
                embeds = request.embed(spec.prompt_ids) if request.embed else None
                prefill = PromptPrefill(self.engine, spec.prompt_ids, embeds, self.prefix_cache)
                pending.append(_PendingRow(job, index, prefill))
        except Exception as exc:  # this request's fault (its prompt, its embedding) or ours: only it fails
            self._abandon(job, exc)
            return
        job.open_rows = len(pending)
        self._prefilling.extend(pending)
        self.metrics.running_requests.inc()

    def _abandon(self, job: Job, error: Exception) -> None:
        job.post(Failed(error))  # first, so the request hears nothing that follows
        with self._cond:
            self._reserved -= len(job.request.rows)
            self._forget(job)
            self._promote()

    def _prefill_some(self) -> None:
        """Feed waiting prompts to the engine, in order, up to one step's budget of tokens (all of them when
        chunking is off); a row whose prompt is in joins the batch."""
        budget = self.prefill_chunk * self.prefill_chunks_per_step
        while self._prefilling and (not self.prefill_chunk or budget > 0):
            pending = self._prefilling[0]
            try:
                budget -= pending.prefill.advance(min(self.prefill_chunk, budget) if self.prefill_chunk else None)
                if pending.prefill.logits is not None:
                    self._join(pending)
            except Exception as exc:  # its prompt or its settings: only its request fails
                self._end_job(pending.job, Failed(exc))

    def _join(self, pending: _PendingRow) -> None:
        job, prefill = pending.job, pending.prefill
        spec = job.request.rows[pending.index]
        row = start_row(self.engine, self.tokenizer, spec.prompt_ids, job.request.settings, spec.seed,
                        prefilled=(prefill.row, prefill.logits))
        self._prefilling.remove(pending)
        speculating = None
        if self.speculator is not None:
            speculating = self.speculator.start(row, spec.prompt_ids, self.engine.sampleable_vocab)
        served = ServedRow(job, pending.index, row, speculating)
        self._rows.append(served)
        self.metrics.running_rows.set(len(self._rows))
        self.metrics.prompt_tokens.inc(len(spec.prompt_ids))
        if prefill.uses_cache:
            self._cached_prompts[served] = spec.prompt_ids
            self._count_cache_use(prefill.reused)

    def _count_cache_use(self, reused: int) -> None:
        metrics, cache = self.metrics, self.prefix_cache
        metrics.prefix_cache_lookups.inc()
        if reused:
            metrics.prefix_cache_hits.inc()
            metrics.prefix_cache_saved_tokens.inc(reused)
        metrics.prefix_cache_hit_rate.set(cache.stats.hits / cache.stats.lookups)
        metrics.prefix_cache_bytes.set(cache.nbytes)

    def _drop_cancelled(self) -> None:
        started = [*self._rows, *self._prefilling]
        for job in {row.job: None for row in started if row.job.cancel_cause is not None}:
            if job.cancel_cause == "shutdown":
                self._end_job(job, Failed(NotReady("the server shut down before the request finished",
                                                   "shutting_down")))
                continue
            self._close_rows(job)

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as exc:  # cannot tell whose row broke the engine step: fail the batch, keep serving
            for job in {row.job: None for row in self._rows}:
                self._end_job(job, Failed(exc))

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            waiting = list(self._waiting) + self._ready
            self._waiting.clear()
            self._ready.clear()
            for job in waiting:
                self._forget(job)
        for job in waiting:
            job.post(Failed(error))
        for job in {row.job: None for row in [*self._rows, *self._prefilling]}:
            self._end_job(job, Failed(error))

    def _step(self) -> None:
        rows = list(self._rows)
        if self.speculator is None:
            outcomes = [o if isinstance(o, Exception) else [o]
                        for o in advance(self.engine, [served.row for served in rows])]
        else:
            outcomes = advance_speculating(self.engine, [served.speculating for served in rows],
                                           self.speculator.costs)
        if any(isinstance(o, list) and o[-1].finish is None for o in outcomes):
            self.metrics.steps.inc()
        for served, outcome in zip(rows, outcomes, strict=True):
            if served not in self._rows:  # its job already failed through another of its rows
                continue
            if isinstance(outcome, Exception):
                self._end_job(served.job, Failed(outcome))
                continue
            for step in outcome:
                if step.token is not None:
                    self.metrics.tokens.inc()
                served.report(step)
            if outcome[-1].finish is not None:
                self._finish_row(served, outcome[-1].finish)

    def _finish_row(self, served: ServedRow, reason: str) -> None:
        prompt = self._cached_prompts.pop(served, None)
        if prompt is not None and reason != "cancelled":  # a finished row's text is the next turn's prompt
            self.prefix_cache.store(self.engine, served.row.engine_row, prompt + served.row.ids)
            self.metrics.prefix_cache_bytes.set(self.prefix_cache.nbytes)
        self.engine.release(served.row.engine_row)
        if served.speculating is not None:
            served.speculating.release()
            self.metrics.drafted_tokens.inc(served.speculating.stats.drafted)
            self.metrics.accepted_tokens.inc(served.speculating.stats.accepted)
        self._rows.remove(served)
        self.metrics.running_rows.set(len(self._rows))
        # The id is forgotten before the request hears its end: a client that reacts to the answer at once
        # (cancel again, resubmit with the same id) must find it gone.
        self._close_row(served.job)
        served.finish(reason)

    def _drop_pending(self, pending: _PendingRow) -> None:
        """A row cancelled or failed before its prompt was in: it ends without text."""
        pending.prefill.abandon()
        self._prefilling.remove(pending)
        self._close_row(pending.job)
        pending.job.post(Finished(pending.index, "", (), "cancelled"))

    def _close_row(self, job: Job) -> None:
        job.open_rows -= 1
        with self._cond:
            self._reserved -= 1
            self._promote()
            if job.open_rows == 0:
                self._forget(job)
                self._record_run(job)

    def _close_rows(self, job: Job) -> None:
        for row in [r for r in self._rows if r.job is job]:
            self._finish_row(row, "cancelled")
        for pending in [p for p in self._prefilling if p.job is job]:
            self._drop_pending(pending)

    def _end_job(self, job: Job, event: Failed) -> None:
        """Fail a started job: its coroutine hears `event` first, then its rows leave the batch."""
        job.post(event)
        self._close_rows(job)

    def _record_run(self, job: Job) -> None:
        self.metrics.running_requests.dec()
        if job.started_at is not None and job.cancel_cause is None:
            run = time.monotonic() - job.started_at
            self._mean_run = run if self._mean_run is None else 0.8 * self._mean_run + 0.2 * run

