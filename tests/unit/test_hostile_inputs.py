"""No input breaks a batch (issue 14): every value validation accepts works, on `Generator` and on the server,
and a request whose own row fails is the only one that fails."""

import asyncio
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _serve_helpers import asgi_client, decode_thread, make_app, post, run
from rugpt.errors import UsageError
from rugpt.generation import GenerationSettings, Generator, Preset

PROMPT = "Мой дядя самых честных правил"
TINY, HUGE = 5e-324, 1e308
EXTREME = {"top_p": TINY, "repetition_penalty": TINY, "temperature": TINY}  # each was a 500 for the whole batch

positive = st.one_of(st.sampled_from([TINY, 1e-300, 1e-38, 0.7, 1.0, HUGE, math.inf]),
                     st.floats(min_value=0, exclude_min=True))
unit_interval = st.one_of(st.sampled_from([TINY, 1e-30, 0.5, 1.0]),
                          st.floats(min_value=0, max_value=1, exclude_min=True))
big_int = st.one_of(st.integers(0, 20), st.integers(0, 10**30))
stop_strings = st.lists(st.one_of(st.text(min_size=1, max_size=3), st.sampled_from(["е", " ", "\ufffd", "а" * 5000])),
                        max_size=4)


@pytest.fixture(scope="module")
def generator(tiny):
    return Generator(tiny, engine="fast")


# --- Generator: the whole space GenerationSettings.validate accepts ---------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({
    "max_new_tokens": st.integers(1, 6), "do_sample": st.booleans(), "temperature": positive, "top_k": big_int,
    "top_p": unit_interval, "repetition_penalty": positive, "no_repeat_ngram_size": big_int,
    "num_beams": st.integers(1, 3), "num_return_sequences": st.integers(1, 3),
    "seed": st.one_of(st.none(), st.integers(-(2**80), 2**80)), "stop": stop_strings.map(tuple),
}))
def test_any_accepted_settings_generate_and_stream_the_same_text(generator, values):
    try:
        chosen = GenerationSettings(**values)
    except UsageError:
        return  # refused with a message naming the setting: that is the other allowed outcome
    result = generator.generate(PROMPT, chosen)
    assert len(result.completions) == chosen.num_return_sequences
    for completion in result.completions:
        assert completion.finish_reason in ("stop", "length") and len(completion.token_ids) <= chosen.max_new_tokens
        assert not any(s in completion.text for s in chosen.stop)
    if chosen.num_beams == 1 and chosen.num_return_sequences == 1 and chosen.seed is not None:
        assert "".join(generator.stream(PROMPT, chosen)) == result.text


# --- the server: the whole space its request schema accepts -------------------------------------------------------

maybe = st.none().__or__
text = st.text(max_size=12)
sampling_fields = {
    "max_tokens": maybe(st.integers(1, 10)), "temperature": maybe(st.one_of(st.sampled_from([0.0, TINY, 2.0]),
                                                                           st.floats(0, 2))),
    "top_p": maybe(unit_interval), "n": st.integers(1, 3), "seed": maybe(st.integers(-(2**80), 2**80)),
    "stream": st.booleans(), "top_k": maybe(big_int), "repetition_penalty": maybe(positive.filter(math.isfinite)),
    "no_repeat_ngram_size": maybe(big_int), "preset": maybe(st.sampled_from([p.value for p in Preset])),
    "stop": maybe(st.one_of(text, st.lists(text, max_size=5))),
}
completion_body = st.fixed_dictionaries(
    {"prompt": st.one_of(text, st.lists(text, max_size=3), st.just("\ud800 сломанный"))}, optional=sampling_fields)
chat_body = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": text}), min_size=1, max_size=3)},
    optional=sampling_fields)


def check_answer(response) -> None:
    """Never a 5xx; a refusal in OpenAI's error shape; a stream never carries a server error."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n") and '"server_error"' not in response.text
    else:
        assert all(c["finish_reason"] in ("stop", "length") for c in response.json()["choices"])


@pytest.fixture(scope="module")
def served(tiny):
    app = make_app(tiny, max_batch=4, default_max_tokens=4, max_tokens_limit=8, max_n=2)
    with decode_thread(app):
        yield app


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(completion_body.map(lambda b: ("/v1/completions", b)),
                 chat_body.map(lambda b: ("/v1/chat/completions", b))))
def test_any_request_the_schema_accepts_is_answered_without_a_5xx(served, call):
    path, body = call
    check_answer(run(post(served, path, body)))


@pytest.mark.parametrize("hostile", [{"top_p": TINY}, {"repetition_penalty": TINY}, {"temperature": TINY},
                                     {"repetition_penalty": HUGE, "top_k": 10**30, "seed": 10**30},
                                     {"stop": ["а" * 100_000]}])  # 600 kB of JSON escapes
def test_values_that_broke_the_batch_now_work(served, hostile):
    response = run(post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6} | hostile))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 6


def test_a_lone_surrogate_is_a_400_naming_the_prompt(served):
    response = run(post(served, "/v1/completions", {"prompt": "\ud800", "model": "\udfff"}))
    error = response.json()["error"]
    assert response.status_code == 404 and "\\udfff" in error["message"]  # echoed escaped, not a 500
    response = run(post(served, "/v1/completions", {"prompt": "\ud800"}))
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_a_hostile_request_arriving_while_three_decode_fails_alone(tiny):
    """Three requests decode; then one with the settings that used to break the batch, and one whose row
    yields NaN logits (a broken trained prompt's embedding) join them. The three finish with 200."""
    others = ["Буря мглою небо кроет", "Ночь, улица, фонарь", "Я помню чудное мгновенье"]
    broken_text = "Ядовитый анчар"
    taken = {i for t in others + [PROMPT] for i in tiny.tokenizer(t, add_special_tokens=False)["input_ids"]}
    poison = next(i for i in tiny.tokenizer(broken_text, add_special_tokens=False)["input_ids"] if i not in taken)
    app = make_app(tiny, max_batch=8, step_delay=0.02, poison=poison)

    async def main():
        async with asgi_client(app) as client:
            def send(body):
                return asyncio.ensure_future(client.post("/v1/completions", json={"max_tokens": 40} | body))

            three = [send({"prompt": p, "seed": i, "stream": i == 1}) for i, p in enumerate(others)]
            await asyncio.sleep(0.3)  # they are several steps in
            sizes_before = list(app.state.scheduler.engine.step_sizes)
            extreme = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5} | EXTREME)
            broken = await client.post("/v1/completions", json={"prompt": broken_text, "max_tokens": 5})
            return sizes_before, extreme, broken, await asyncio.gather(*three), app.state.scheduler.engine.lengths

    sizes_before, extreme, broken, three, lengths = run(main())
    assert max(sizes_before) == 3  # the three really were decoding together when the others came
    assert extreme.status_code == 200 and extreme.json()["usage"]["completion_tokens"] == 5
    assert broken.status_code == 500 and broken.json()["error"]["type"] == "server_error"
    assert "traceback" not in broken.text.lower()
    for response in three:
        assert response.status_code == 200
        if response.headers["content-type"].startswith("text/event-stream"):
            chunks = [json.loads(b[6:]) for b in response.text.split("\n\n") if b.startswith("data: {")]
            assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "length"
        else:
            assert response.json()["usage"]["completion_tokens"] == 40
    assert lengths == {}  # every row, the failed one's too, left the engine
