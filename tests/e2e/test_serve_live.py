"""A live uvicorn on 127.0.0.1 (random free port): the official openai client, load, disconnects, cancelling.

Every test sends a bounded number of requests to 127.0.0.1 only, with client timeouts, and stops by itself.
"""

import asyncio
import json
import time

import httpx
import openai
import pytest

from _serve_helpers import live_server, make_app, metric

PROMPT = "Мой дядя самых честных правил"


def running_rows(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics", timeout=5).text, "rugpt_running_rows")


def wait_until(condition, timeout: float) -> None:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, "condition not met in time"
        time.sleep(0.01)


def test_the_official_openai_client_works(tiny):
    with live_server(make_app(tiny, api_keys=["sk-test"])) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=30)
        [model] = client.models.list().data
        completion = client.completions.create(model=model.id, prompt=PROMPT, max_tokens=8, temperature=0)
        chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Привет"}],
                                              max_tokens=8, seed=1)
        pieces = [c.choices[0].text for c in client.completions.create(
            model=model.id, prompt=PROMPT, max_tokens=8, temperature=0, stream=True) if c.choices]
        chat_pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Привет"}], max_tokens=8, seed=1, stream=True)]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model=model.id, prompt=PROMPT, max_tokens=127)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 8
    assert "".join(pieces) == completion.choices[0].text
    assert chat.choices[0].message.role == "assistant" and "".join(chat_pieces) == chat.choices[0].message.content


def test_the_official_openai_client_gets_logprobs_echo_and_json_schema_output(tiny):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "sure"],
              "properties": {"answer": {"enum": ["да", "нет"]}, "sure": {"type": "boolean"}}}
    with live_server(make_app(tiny, ban_eos=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Привет"}],
                                              max_tokens=4, seed=1, logprobs=True, top_logprobs=3)
        echoed = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
        structured = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Ответь в JSON"}], max_tokens=30, seed=4,
            response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema,
                                                                    "strict": True}})
        with pytest.raises(openai.BadRequestError, match="uniqueItems"):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "?"}],
                response_format={"type": "json_schema", "json_schema": {
                    "name": "bad", "strict": True, "schema": {"type": "array", "uniqueItems": True}}})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 and isinstance(t.bytes, list) for t in content)
    assert echoed.choices[0].text == PROMPT and echoed.choices[0].logprobs.token_logprobs[0] is None
    assert len(echoed.choices[0].logprobs.tokens) == echoed.usage.prompt_tokens
    assert len(completion.choices[0].logprobs.top_logprobs) == 3 and completion.choices[0].logprobs.text_offset[0] == 0
    assert structured.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(structured.choices[0].message.content), schema)


def test_32_concurrent_requests_with_8_waiting_slots_are_all_answered(tiny):
    app = make_app(tiny, max_batch=4, step_delay=0.01, max_waiting=8)

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": 20, "seed": i, "stream": i % 2 == 0}
        return await client.post("/v1/completions", json=body)

    async def burst(url: str) -> list:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(32))), 60)

    with live_server(app) as url:
        began = time.monotonic()
        responses = asyncio.run(burst(url))
        took = time.monotonic() - began
        page = httpx.get(f"{url}/metrics").text
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 12 and 429 in statuses
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
    for r in responses:
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n")
        elif r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 20
    assert metric(page, 'rugpt_rejections_total{reason="queue_full"}') == statuses.count(429)
    assert took < 60


def test_a_client_that_hangs_up_has_its_row_dropped(tiny):
    app = make_app(tiny, step_delay=0.02)
    body = {"prompt": PROMPT, "max_tokens": 100}  # 2 s of decoding if nobody stops it
    with live_server(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=10) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        wait_until(lambda: running_rows(url) == 0, 3.0)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        wait_until(lambda: running_rows(url) == 0, 3.0)
        page = httpx.get(f"{url}/metrics").text
    assert metric(page, 'rugpt_cancellations_total{cause="disconnect"}') == 2
    assert metric(page, "rugpt_generated_tokens_total") < 150  # two requests of 100, both cut short


def test_cancel_by_id_ends_a_stream_with_finish_reason_cancelled(tiny):
    app = make_app(tiny, step_delay=0.02)
    with live_server(app) as url:
        body = {"prompt": PROMPT, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            cancelled = httpx.delete(f"{url}/v1/requests/{response.headers['x-request-id']}", timeout=5)
            rest = [line for line in lines if line]
    assert cancelled.status_code == 200 and rest[-1] == "data: [DONE]"
    assert '"finish_reason":"cancelled"' in rest[-2]


def test_queue_time_limit_answers_503_and_streams_queue_position_first(tiny):
    app = make_app(tiny, max_batch=1, step_delay=0.02, max_queue_seconds=0.5)
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=10) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 100, "stream": True}):
                wait_until(lambda: running_rows(url) == 1, 2.0)
                with client.stream("POST", "/v1/completions",
                                   json={"prompt": PROMPT, "max_tokens": 5, "stream": True}) as waiting:
                    position = waiting.headers["x-queue-position"]
                    events = [line for line in waiting.iter_lines() if line]
                plain = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    assert position == "1" and events[0].startswith(": queue position 1")
    assert '"code": "queue_timeout"' in events[-1] and "max-queue-seconds" in events[-1]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "queue_timeout"


def test_shutdown_with_a_request_in_flight_does_not_hang(tiny):
    app = make_app(tiny, step_delay=0.05)
    began = time.monotonic()
    with live_server(app) as url:
        response = httpx.Client(timeout=10).send(
            httpx.Request("POST", f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 120, "stream": True}),
            stream=True)
        next(line for line in response.iter_lines() if line.startswith("data: "))
    response.close()
    assert time.monotonic() - began < 20 and not app.state.scheduler.ready
