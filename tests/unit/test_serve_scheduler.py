"""The batching scheduler on a tiny random model: batch equals alone, continuous batching, limits, cancelling."""

import asyncio
import time

import pytest
import torch

from _serve_helpers import metric, run, slow_engine
from rugpt.engines import create_engine
from rugpt.errors import UsageError
from rugpt.generation import GenerationSettings, Generator
from rugpt.serve.errors import api_error
from rugpt.serve.jobs import DecodeRequest, Failed, Finished, Piece, RowSpec, Started
from rugpt.serve.scheduler import BatchScheduler, Busy, NotReady
from rugpt.speculative import Speculator

PROMPTS = ["Мой дядя самых честных правил", "Буря мглою небо кроет", "Ночь", "Я помню чудное мгновенье",
           "У лукоморья дуб зелёный", "Выхожу один я на дорогу"]


def request_for(tiny, text, stream=False, **overrides) -> DecodeRequest:
    settings = GenerationSettings.from_preset(overrides.pop("preset", "greedy"), **overrides)
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [RowSpec(ids, None if settings.seed is None else settings.seed + r)
            for r in range(settings.num_return_sequences)]
    return DecodeRequest(rows, settings.row_settings(), stream)


def make_scheduler(tiny, max_batch=8, step_delay=0.0, ban_eos=False, **limits) -> BatchScheduler:
    scheduler = BatchScheduler(slow_engine(tiny, max_batch, step_delay, ban_eos), tiny.tokenizer, **limits)
    scheduler.start()
    return scheduler


async def outcome(ticket, timeout=20.0):
    """(rows' Finished events in order, pieces per row, the Failed event or None)."""
    finished, pieces = {}, {}
    while len(finished) < ticket.rows:
        event = await ticket.next_event(timeout)
        assert event is not None, "no event within the timeout"
        if isinstance(event, Failed):
            return [], pieces, event
        if isinstance(event, Piece):
            pieces.setdefault(event.index, []).append(event.text)
        if isinstance(event, Finished):
            finished[event.index] = event
    return [finished[i] for i in range(ticket.rows)], pieces, None


def mixed_requests(tiny, stream=False):
    """Requests with different prompts, lengths, sampling settings, seeds and stop strings."""
    return [
        request_for(tiny, PROMPTS[0], stream, max_new_tokens=20),
        request_for(tiny, PROMPTS[1], stream, preset="balanced", seed=7, max_new_tokens=15),
        request_for(tiny, PROMPTS[2], stream, preset="creative", seed=3, max_new_tokens=25, num_return_sequences=2),
        request_for(tiny, PROMPTS[3], stream, max_new_tokens=5),
        request_for(tiny, PROMPTS[4], stream, preset="balanced", seed=11, top_k=5, repetition_penalty=1.3),
        request_for(tiny, PROMPTS[5], stream, no_repeat_ngram_size=2, max_new_tokens=30),
    ]


def test_batched_results_equal_results_alone_token_for_token(tiny):
    async def together():
        scheduler = make_scheduler(tiny)
        tickets = [scheduler.submit(r) for r in mixed_requests(tiny)]
        results = [await outcome(t) for t in tickets]
        await scheduler.stop(1)
        return results, max(scheduler.engine.step_sizes)

    async def alone():
        scheduler = make_scheduler(tiny)
        results = [await outcome(scheduler.submit(r)) for r in mixed_requests(tiny)]
        await scheduler.stop(1)
        return results, max(scheduler.engine.step_sizes)

    (batched, widest), (single, narrowest) = run(together()), run(alone())
    assert widest > 2 and narrowest <= 2  # really batched, really alone (one request has n=2)
    for (b, _, b_fail), (s, _, s_fail) in zip(batched, single, strict=True):
        assert b_fail is None and s_fail is None
        assert [f.token_ids for f in b] == [f.token_ids for f in s]
        assert [f.text for f in b] == [f.text for f in s]


def test_rows_that_speculate_give_the_same_tokens_as_plain_decoding_in_one_batch(bundled):
    # the bundled model copies a quoted passage, so lookup drafts get accepted; the random rows rarely draft
    quote = "Повтори слово в слово: «Мороз и солнце; день чудесный! Еще ты дремлешь, друг прелестный» —"
    requests = [request_for(bundled, quote, max_new_tokens=30, repetition_penalty=1.0), *mixed_requests(bundled)]

    async def main(speculator):
        scheduler = make_scheduler(bundled, speculator=speculator)
        tickets = [scheduler.submit(r) for r in requests]
        results = [await outcome(t) for t in tickets]
        await scheduler.stop(1)
        return results, scheduler.metrics.render().decode()

    (plain, _), (drafted, page) = run(main(None)), run(main(Speculator("lookup", bundled, "fast")))
    for (p, _, p_fail), (d, _, d_fail) in zip(plain, drafted, strict=True):
        assert p_fail is None and d_fail is None
        assert [f.token_ids for f in d] == [f.token_ids for f in p]
        assert [(f.text, f.reason) for f in d] == [(f.text, f.reason) for f in p]
    assert metric(page, "rugpt_speculative_drafted_tokens_total") > 0
    assert 0 < metric(page, "rugpt_speculative_accepted_tokens_total") <= metric(
        page, "rugpt_speculative_drafted_tokens_total")
    assert metric(page, "rugpt_generated_tokens_total") == sum(len(f.token_ids) for r, _, _ in plain for f in r)


def test_greedy_rows_match_the_library_generator(tiny):
    expected = Generator(tiny, engine="fast").generate(PROMPTS[0], GenerationSettings.from_preset(
        "greedy", max_new_tokens=20))

    async def served():
        scheduler = make_scheduler(tiny)
        finished, _, _ = await outcome(scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=20)))
        await scheduler.stop(1)
        return finished[0]

    got = run(served())
    assert list(got.token_ids) == expected.completions[0].token_ids
    assert got.text == expected.text and got.reason == expected.completions[0].finish_reason


def test_streamed_pieces_join_to_the_non_streamed_text_with_stop_strings(tiny):
    async def main():
        scheduler = make_scheduler(tiny, ban_eos=True)
        plain, _, _ = await outcome(scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=30)))
        full = plain[0].text
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        cut, _, _ = await outcome(scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=30, stop=(stop,))))
        streamed, pieces, _ = await outcome(scheduler.submit(
            request_for(tiny, PROMPTS[1], stream=True, max_new_tokens=30, stop=(stop,))))
        await scheduler.stop(1)
        return full, stop, cut[0], streamed[0], "".join(pieces[0])

    full, stop, cut, streamed, joined = run(main())
    assert cut.reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    assert joined == cut.text and streamed.reason == "stop" and streamed.token_ids == cut.token_ids


def test_a_new_request_joins_the_running_batch_between_steps(tiny):
    async def main():
        scheduler = make_scheduler(tiny, step_delay=0.01, ban_eos=True)
        first = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=40))
        assert isinstance(await first.next_event(5), Started)
        await asyncio.sleep(0.1)  # the first request is several steps in
        second = scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=10))
        a, _, _ = await outcome(first)
        b, _, _ = await outcome(second)
        alone, _, _ = await outcome(scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=40)))
        await scheduler.stop(1)
        return scheduler.engine.step_sizes, a[0], b[0], alone[0]

    sizes, a, b, alone = run(main())
    assert sizes[0] == 1 and 2 in sizes  # it started alone, then the second request joined it
    assert a.token_ids == alone.token_ids and len(a.token_ids) == 40 and len(b.token_ids) == 10


def test_full_queue_is_refused_with_429_and_retry_after(tiny):
    async def main():
        scheduler = make_scheduler(tiny, max_batch=1, step_delay=0.01, ban_eos=True, max_waiting=1)
        running = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=30))
        waiting = scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=5))
        with pytest.raises(Busy) as refused:
            scheduler.submit(request_for(tiny, PROMPTS[2], max_new_tokens=5))
        assert waiting.position_at_submit == 1
        done = [await outcome(running), await outcome(waiting)]
        await scheduler.stop(1)
        return refused.value, done

    refused, done = run(main())
    answer = api_error(refused)
    assert refused.reason == "queue_full" and answer.status == 429 and answer.code == "queue_full"
    assert int(answer.headers["Retry-After"]) >= 1
    assert all(fail is None for _, _, fail in done)


def test_a_request_waiting_longer_than_the_queue_limit_gets_503_and_never_starts(tiny):
    async def main():
        scheduler = make_scheduler(tiny, max_batch=1, step_delay=0.02, ban_eos=True, max_queue_seconds=0.2)
        running = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=40))
        late = scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=5))
        began = time.monotonic()
        first = await late.next_event(5)
        waited = time.monotonic() - began
        await scheduler.stop(0)
        return first, waited, running

    first, waited, _ = run(main())
    assert isinstance(first, Failed) and isinstance(first.error, NotReady) and first.error.reason == "queue_timeout"
    assert api_error(first.error).status == 503 and "max-queue-seconds" in str(first.error) and waited < 5


def test_one_key_may_hold_only_its_share(tiny):
    async def main():
        scheduler = make_scheduler(tiny, max_batch=2, step_delay=0.01, ban_eos=True, max_inflight_per_key=2)
        mine = [scheduler.submit(request_for(tiny, p, max_new_tokens=10), key="a") for p in PROMPTS[:2]]
        with pytest.raises(Busy) as refused:
            scheduler.submit(request_for(tiny, PROMPTS[2], max_new_tokens=10), key="a")
        other = scheduler.submit(request_for(tiny, PROMPTS[3], max_new_tokens=10), key="b")
        for ticket in [*mine, other]:
            await outcome(ticket)
        again = await outcome(scheduler.submit(request_for(tiny, PROMPTS[2], max_new_tokens=3), key="a"))
        await scheduler.stop(1)
        return refused.value, again

    refused, (finished, _, failure) = run(main())
    assert api_error(refused).status == 429 and refused.reason == "per_key_limit"
    assert failure is None and finished[0].reason == "length"


def test_cancel_drops_a_running_row_within_a_step_and_a_waiting_one_at_once(tiny):
    async def main():
        scheduler = make_scheduler(tiny, max_batch=1, step_delay=0.01, ban_eos=True)
        running = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=100))
        waiting = scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=100))
        assert isinstance(await running.next_event(5), Started)
        await asyncio.sleep(0.05)
        assert waiting.cancel() and running.cancel()
        began = time.monotonic()
        ran, _, _ = await outcome(running)
        queued, _, _ = await outcome(waiting)
        took = time.monotonic() - began
        await scheduler.stop(1)
        return ran[0], queued[0], took, scheduler

    ran, queued, took, scheduler = run(main())
    assert ran.reason == "cancelled" and 0 < len(ran.token_ids) < 100 and took < 2
    assert queued.reason == "cancelled" and queued.token_ids == ()
    assert scheduler.engine.lengths == {}


def test_a_failing_prefill_fails_only_its_own_request(tiny):
    def broken_embed(ids):
        raise UsageError("this prompt cannot be embedded")

    async def main():
        scheduler = make_scheduler(tiny)
        bad_request = request_for(tiny, PROMPTS[0])
        bad_request.embed = broken_embed
        bad = scheduler.submit(bad_request)
        good = scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=5))
        results = await outcome(bad), await outcome(good)
        await scheduler.stop(1)
        return results

    (_, _, failure), (finished, _, ok) = run(main())
    assert api_error(failure.error).status == 400 and "cannot be embedded" in str(failure.error)
    assert ok is None and len(finished[0].token_ids) == 5


def test_stop_fails_waiting_requests_and_never_hangs(tiny):
    async def main():
        scheduler = make_scheduler(tiny, max_batch=1, step_delay=0.05, ban_eos=True)
        running = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=500))
        waiting = scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=5))
        assert isinstance(await running.next_event(5), Started)
        began = time.monotonic()
        await scheduler.stop(grace=0.2)
        took = time.monotonic() - began
        with pytest.raises(NotReady) as refused:
            scheduler.submit(request_for(tiny, PROMPTS[2]))
        return await outcome(running), await outcome(waiting), took, refused.value, scheduler

    (_, _, ran), (_, _, queued), took, refused, scheduler = run(main())
    assert all(api_error(e).status == 503 for e in (ran.error, queued.error, refused))
    assert took < 6 and not scheduler.ready


def test_ragged_steps_ignore_garbage_in_never_written_cache_memory(tiny):
    """Continuous batching steps rows of different lengths together; the fast engine's cache is torch.empty
    memory, and a NaN left there must not reach the shorter rows (0 attention weight × NaN is NaN)."""
    engine = create_engine(tiny, "fast", max_rows=4)
    for cache in (*engine.k_cache, *engine.v_cache):
        cache.fill_(float("nan"))
    long_row, _ = engine.prefill([5, 6, 7, 8])
    short_row, _ = engine.prefill([5])
    logits = torch.stack([engine.step([long_row, short_row], [1, 2]) for _ in range(3)])
    assert not torch.isnan(logits).any()


OPENING = ("Ты стоишь у входа в тёмную пещеру. Слева шумит река, справа поднимается узкая тропа в горы, "
           "а за спиной догорает костёр.")
# (preset, seed, n): greedy, and sampling with a seed, one row and two
CONVERSATIONS = [("greedy", None, 1), ("balanced", 5, 2), ("creative", 9, 1)]


def token_request(ids: list[int], preset: str, seed: int | None, n: int, max_new_tokens: int = 12) -> DecodeRequest:
    settings = GenerationSettings.from_preset(preset, seed=seed, max_new_tokens=max_new_tokens, num_return_sequences=n)
    return DecodeRequest([RowSpec(list(ids), None if seed is None else seed + r) for r in range(n)],
                         settings.row_settings())


async def play_two_turns(tiny, scheduler, together: bool) -> list[list[tuple[int, ...]]]:
    """Three conversations of two turns; turn two's prompt is turn one's, its first reply and a new line."""
    def encode(text):
        return tiny.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def turn(prompts):
        requests = [token_request(p, *c) for p, c in zip(prompts, CONVERSATIONS, strict=True)]
        if together:
            tickets = [scheduler.submit(r) for r in requests]
            results = [await outcome(t) for t in tickets]
        else:
            results = [await outcome(scheduler.submit(r)) for r in requests]
        assert all(fail is None for _, _, fail in results)
        return [[f.token_ids for f in finished] for finished, _, _ in results]

    openings = [encode(OPENING + line) for line in (" Ты идёшь к реке.", " Ты ждёшь.", " Ты зовёшь на помощь.")]
    first = await turn(openings)
    second = await turn([p + list(replies[0]) + encode("\n> Что дальше?")
                         for p, replies in zip(openings, first, strict=True)])
    return first + second


def test_the_prefix_cache_and_chunked_prefill_change_no_token_batched_or_alone(tiny):
    async def main(together, **options):
        scheduler = make_scheduler(tiny, ban_eos=True, **options)
        tokens = await play_two_turns(tiny, scheduler, together)
        await scheduler.stop(1)
        return tokens, scheduler.metrics.render().decode()

    plain, _ = run(main(False))
    cached, page = run(main(True, prefix_cache_bytes=10**8))
    chunked, chunked_page = run(main(True, prefix_cache_bytes=10**8, prefill_chunk=8))
    assert cached == plain and chunked == plain
    assert metric(page, "rugpt_prefix_cache_hits_total") >= 3  # every second turn, and the n=2 request's twin
    assert metric(page, "rugpt_prefix_cache_saved_tokens_total") >= 3 * 32
    assert metric(page, "rugpt_prefix_cache_hit_rate") > 0 and metric(page, "rugpt_prefix_cache_bytes") > 0
    assert metric(chunked_page, "rugpt_prefix_cache_hits_total") >= 3


def test_running_rows_keep_stepping_while_a_long_prompt_arrives_in_chunks(tiny):
    calls = []
    long_prompt = tiny.tokenizer(OPENING * 3, add_special_tokens=False)["input_ids"][:90]
    chunks = -(-len(long_prompt) // 8)

    async def main():
        scheduler = make_scheduler(tiny, max_batch=2, ban_eos=True, prefill_chunk=8)
        engine = scheduler.engine
        for name in ("prefill", "extend", "step"):
            method = getattr(engine, name)
            setattr(engine, name, lambda *a, _m=method, _n=name, **k: (calls.append(_n), _m(*a, **k))[1])
        running = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=60))
        assert isinstance(await running.next_event(5), Started)
        while "step" not in calls:
            await asyncio.sleep(0.01)
        arriving = scheduler.submit(token_request(long_prompt, "greedy", None, 1, max_new_tokens=3))
        results = [await outcome(running), await outcome(arriving)]
        await scheduler.stop(1)
        return results

    results = run(main())
    assert all(fail is None for _, _, fail in results)
    assert len(long_prompt) == 90
    arrival = calls[calls.index("prefill", 1):]  # from the long prompt's first chunk, a prefill
    last_chunk = len(arrival) - 1 - arrival[::-1].index("extend")
    assert arrival[1 : last_chunk + 1].count("extend") == chunks - 1
    assert arrival[: last_chunk + 1].count("step") >= chunks - 1  # a decode step between every two chunks


def test_waiting_requests_start_by_priority_then_arrival(tiny):
    async def main():
        scheduler = make_scheduler(tiny, max_batch=1, step_delay=0.01, ban_eos=True)
        busy = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=20))
        tickets = {name: scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=2), priority=priority)
                   for name, priority in [("late-5", 5), ("first-0", 0), ("later-5", 5), ("second-0", 0)]}
        places = {name: ticket.position_at_submit for name, ticket in tickets.items()}
        order = []

        async def finish(name, ticket):
            await outcome(ticket)
            order.append(name)

        await asyncio.gather(outcome(busy), *(finish(n, t) for n, t in tickets.items()))
        await scheduler.stop(1)
        return places, order

    places, order = run(main())
    assert order == ["first-0", "second-0", "late-5", "later-5"]
    assert places == {"late-5": 1, "first-0": 1, "later-5": 3, "second-0": 2}  # places when each arrived


def test_priority_composes_with_the_per_key_limit(tiny):
    async def main():
        scheduler = make_scheduler(tiny, max_batch=1, step_delay=0.01, ban_eos=True, max_inflight_per_key=1)
        busy = scheduler.submit(request_for(tiny, PROMPTS[0], max_new_tokens=20), key="c")
        mine = scheduler.submit(request_for(tiny, PROMPTS[1], max_new_tokens=2), key="a", priority=3)
        with pytest.raises(Busy) as refused:  # a key at its limit stays there, however urgent its request
            scheduler.submit(request_for(tiny, PROMPTS[2], max_new_tokens=2), key="a", priority=-10)
        other = scheduler.submit(request_for(tiny, PROMPTS[2], max_new_tokens=2), key="b", priority=0)
        assert other.queue_position()[0] == 1 and mine.queue_position()[0] == 2  # b's urgent request goes first
        for ticket in (busy, other, mine):
            await outcome(ticket)
        await scheduler.stop(1)
        return refused.value

    assert run(main()).reason == "per_key_limit"
