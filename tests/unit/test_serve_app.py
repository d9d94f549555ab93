"""The app in-process (httpx's ASGI transport): OpenAI shapes, streaming, errors, limits, auth, cancel by id."""

import asyncio
import json

import pytest
from fastapi import APIRouter, Request

from _serve_helpers import asgi_client, make_app, metric, run
from rugpt.generation import GenerationSettings, Generator

PROMPT = "Мой дядя самых честных правил"
GREEDY = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
JSON = {"content-type": "application/json"}


def sse_events(text: str) -> list[str]:
    return [block for block in text.split("\n\n") if block]


def data_chunks(text: str) -> list[dict]:
    return [json.loads(b[6:]) for b in sse_events(text) if b.startswith("data: {")]


def test_completion_has_openai_shape_usage_and_queue_headers(tiny):
    async def main():
        async with asgi_client(make_app(tiny)) as client:
            return await client.post("/v1/completions", json=GREEDY)

    response = run(main())
    body = response.json()
    assert response.status_code == 200 and body["object"] == "text_completion"
    assert body["id"] == response.headers["x-request-id"] and response.headers["x-queue-position"] == "0"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    greedy = GenerationSettings.from_preset("balanced", do_sample=False, max_new_tokens=12)  # temperature 0
    expected = Generator(tiny, engine="fast").generate(PROMPT, greedy)
    assert choice["text"] == expected.text
    assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": 12,
                             "total_tokens": expected.prompt_tokens + 12}


def test_n_and_prompt_lists_give_one_choice_per_row(tiny):
    async def main():
        async with asgi_client(make_app(tiny, max_batch=8)) as client:
            return (await client.post("/v1/completions", json={"prompt": ["Ночь", "Буря"], "n": 2, "seed": 5,
                                                               "max_tokens": 4, "preset": "creative"})).json()

    body = run(main())
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3] and body["usage"]["completion_tokens"] == 16


def test_chat_answers_as_the_assistant(tiny):
    async def main():
        async with asgi_client(make_app(tiny)) as client:
            messages = [{"role": "system", "content": "Ты поэт."}, {"role": "user", "content": "Привет!"}]
            plain = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                                     "temperature": 0})
            streamed = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                                        "temperature": 0, "stream": True})
            return plain.json(), streamed.text

    body, stream = run(main())
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    chunks = data_chunks(stream)
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == body["choices"][0]["message"]["content"] and stream.endswith("data: [DONE]\n\n")


def test_stream_sends_pieces_finish_reason_usage_and_done(tiny):
    async def main():
        async with asgi_client(make_app(tiny)) as client:
            plain = await client.post("/v1/completions", json=GREEDY)
            streamed = await client.post("/v1/completions", json=GREEDY | {
                "stream": True, "stream_options": {"include_usage": True}})
            return plain.json(), streamed

    body, streamed = run(main())
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = data_chunks(streamed.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == body["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    assert sse_events(streamed.text)[-1] == "data: [DONE]"


def test_models_health_and_metrics(tiny):
    async def main():
        async with asgi_client(make_app(tiny, served_name="tiny-test")) as client:
            await client.post("/v1/completions", json=GREEDY)
            return [await client.get(path) for path in ("/v1/models", "/v1/models/tiny-test", "/health", "/metrics")]

    models, card, health, metrics = run(main())
    assert models.json()["data"][0]["id"] == "tiny-test" and card.json()["context_length"] == 128
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = metrics.text
    for name in ("rugpt_queue_depth", "rugpt_running_rows", "rugpt_generated_tokens_total",
                 "rugpt_request_latency_seconds_bucket", "rugpt_rejections_total"):
        assert name in page
    assert metric(page, "rugpt_generated_tokens_total") == 12
    assert metric(page, 'rugpt_request_latency_seconds_count{route="/v1/completions"}') == 1


@pytest.mark.parametrize("body, status, expect", [
    ({"prompt": "слово " * 200, "max_tokens": 5}, 400, "context"),
    ({"prompt": PROMPT, "max_tokens": 127}, 400, "maximum context length is 128"),
    ({"prompt": PROMPT, "max_tokens": 5000}, 400, "max_tokens=5000"),
    ({"prompt": PROMPT, "n": 9}, 400, "n=9"),
    ({"prompt": PROMPT, "temperature": 5}, 400, "temperature"),
    ({"prompt": PROMPT, "preset": "wild"}, 400, "preset"),
    ({"prompt": PROMPT, "preset": "precise"}, 400, "beam search"),
    ({"prompt": PROMPT, "logprobs": 6}, 400, "logprobs"),
    ({"prompt": PROMPT, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "echo"),
    ({"prompt": [5, 10**6], "max_tokens": 2}, 400, "outside this model's vocabulary"),
    ({"prompt": PROMPT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, 400, "objectx"),
    ({"prompt": PROMPT, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ({"prompt": PROMPT, "presence_penalty": 0.5}, 400, "repetition_penalty"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": PROMPT, "trained_prompt": "joke"}, 400, "unknown trained prompt 'joke'"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "not served here"),
    ({"max_tokens": 5}, 400, "prompt"),
])
def test_client_mistakes_are_4xx_in_openai_error_shape(tiny, body, status, expect):
    async def main():
        async with asgi_client(make_app(tiny, max_n=4, max_tokens_limit=1000)) as client:
            return await client.post("/v1/completions", json=body)

    response = run(main())
    error = response.json()["error"]
    assert response.status_code == status and set(error) == {"message", "type", "param", "code"}
    assert expect in error["message"]


def test_bad_json_and_unknown_paths_are_shaped_too(tiny):
    async def main():
        async with asgi_client(make_app(tiny)) as client:
            broken = await client.post("/v1/completions", content=b"{not json", headers=JSON)
            missing = await client.get("/v1/nothing")
            return broken, missing

    broken, missing = run(main())
    assert broken.status_code == 400 and "error" in broken.json()
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_body_over_the_cap_is_413_with_or_without_content_length(tiny):
    async def chunks():
        for _ in range(8):
            yield b" " * 1000

    async def main():
        async with asgi_client(make_app(tiny, max_body_bytes=4096)) as client:
            declared = await client.post("/v1/completions", json={"prompt": "x" * 5000})
            chunked = await client.post("/v1/completions", content=chunks(), headers=JSON)
            metrics = (await client.get("/metrics")).text
            return declared, chunked, metrics

    declared, chunked, metrics = run(main())
    assert declared.status_code == 413 and chunked.status_code == 413
    assert "4096 bytes" in declared.json()["error"]["message"]
    assert metric(metrics, 'rugpt_rejections_total{reason="body_too_large"}') == 2


def test_api_keys_are_required_and_checked(tiny):
    async def main():
        async with asgi_client(make_app(tiny, api_keys=["k-one", "k-two"])) as client:
            none = await client.post("/v1/completions", json=GREEDY)
            wrong = await client.post("/v1/completions", json=GREEDY, headers={"Authorization": "Bearer k-three"})
            right = await client.post("/v1/completions", json=GREEDY, headers={"Authorization": "Bearer k-two"})
            models = await client.get("/v1/models")
            health = await client.get("/health")
            metrics = await client.get("/metrics")
            keyed_metrics = await client.get("/metrics", headers={"Authorization": "Bearer k-one"})
            return none, wrong, right, models, health, metrics, keyed_metrics

    none, wrong, right, models, health, metrics, keyed_metrics = run(main())
    assert none.status_code == wrong.status_code == models.status_code == metrics.status_code == 401
    assert none.json()["error"]["code"] == "invalid_api_key" and none.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and health.status_code == 200
    # the counters tell of other clients' traffic: behind the key, like the API (issue 14)
    assert metrics.json()["error"]["code"] == "invalid_api_key" and "rugpt_generated_tokens" not in metrics.text
    assert keyed_metrics.status_code == 200 and metric(keyed_metrics.text, "rugpt_generated_tokens_total") == 12


def test_one_api_key_gets_429_beyond_its_share_while_another_is_served(tiny):
    async def main():
        app = make_app(tiny, step_delay=0.01, api_keys=["alice", "bob"], max_inflight_per_key=1)
        alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("alice", "bob"))
        body = {"prompt": PROMPT, "max_tokens": 30}
        async with asgi_client(app) as client:
            first = asyncio.ensure_future(client.post("/v1/completions", json=body, headers=alice))
            await asyncio.sleep(0.1)
            second = await client.post("/v1/completions", json=body, headers=alice)
            other = await client.post("/v1/completions", json=body, headers=bob)
            return await first, second, other

    first, second, other = run(main())
    assert first.status_code == 200 and other.status_code == 200
    assert second.status_code == 429 and second.json()["error"]["code"] == "per_key_limit"
    assert "retry-after" in second.headers


def test_cancel_by_id_ends_a_non_streaming_request_with_what_it_has(tiny):
    async def main():
        app = make_app(tiny, step_delay=0.01, api_keys=["alice", "bob"])
        alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("alice", "bob"))
        async with asgi_client(app) as client:
            pending = asyncio.ensure_future(client.post(
                "/v1/completions", json={"prompt": PROMPT, "max_tokens": 100, "temperature": 0},
                headers=alice | {"X-Request-Id": "my-request-1"}))
            await asyncio.sleep(0.2)
            stranger = await client.delete("/v1/requests/my-request-1", headers=bob)
            cancelled = await client.delete("/v1/requests/my-request-1", headers=alice)
            response = await pending
            again = await client.delete("/v1/requests/my-request-1", headers=alice)
            return stranger, cancelled, response, again

    stranger, cancelled, response, again = run(main())
    assert stranger.status_code == 404 and again.status_code == 404
    assert cancelled.json() == {"id": "my-request-1", "object": "request", "status": "cancelled"}
    body = response.json()
    assert response.status_code == 200 and body["id"] == "my-request-1"
    assert body["choices"][0]["finish_reason"] == "cancelled" and 0 < body["usage"]["completion_tokens"] < 100


def test_request_timeout_is_504_and_frees_the_row(tiny):
    async def main():
        app = make_app(tiny, step_delay=0.01, request_timeout=0.2)
        async with asgi_client(app) as client:
            response = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100})
            await asyncio.sleep(0.1)
            return response, app.state.scheduler.engine.lengths

    response, lengths = run(main())
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout" and lengths == {}


def test_other_routers_share_the_scheduler(tiny):
    extra = APIRouter()

    @extra.get("/play/echo")
    async def echo(request: Request) -> dict:
        service = request.app.state.service
        settings = GenerationSettings.from_preset("greedy", max_new_tokens=6)
        [completion] = await service.complete("Жили-были", settings)
        pieces = [piece async for piece in service.stream("Жили-были", settings)]
        return {"text": completion.text, "streamed": "".join(pieces), "tokens": len(completion.token_ids)}

    async def main():
        async with asgi_client(make_app(tiny, routers=[extra])) as client:
            return (await client.get("/play/echo")).json()

    body = run(main())
    assert body["text"] == body["streamed"] and body["tokens"] == 6


def test_playground_page_and_script_are_served(tiny):
    async def main():
        async with asgi_client(make_app(tiny)) as client:
            return await client.get("/"), await client.get("/static/playground.js")

    page, script = run(main())
    assert page.status_code == 200 and "playground.js" in page.text
    assert script.status_code == 200 and "/v1/completions" in script.text


def test_a_request_id_already_running_is_a_409_and_the_first_goes_on(tiny):
    async def main():
        async with asgi_client(make_app(tiny, step_delay=0.01)) as client:
            body, header = {"prompt": PROMPT, "max_tokens": 30}, {"X-Request-Id": "same-id-123"}
            first = asyncio.ensure_future(client.post("/v1/completions", json=body, headers=header))
            await asyncio.sleep(0.1)
            second = await client.post("/v1/completions", json=body, headers=header)
            return await first, second

    first, second = run(main())
    assert first.status_code == 200 and second.status_code == 409
    assert second.json()["error"]["code"] == "duplicate_request_id" and "same-id-123" in second.text


def test_a_streamed_row_that_fails_ends_its_stream_with_an_error_event_only(tiny):
    ids = tiny.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    poison = next(i for i in tiny.tokenizer("анчар", add_special_tokens=False)["input_ids"] if i not in ids)

    async def main():
        async with asgi_client(make_app(tiny, step_delay=0.01, poison=poison)) as client:
            good = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20}))
            bad = await client.post("/v1/completions", json={"prompt": "анчар", "max_tokens": 20, "stream": True})
            return await good, bad

    good, bad = run(main())
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 20
    events = sse_events(bad.text)
    assert json.loads(events[-1][6:])["error"]["type"] == "server_error" and "data: [DONE]" not in events
