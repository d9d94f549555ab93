"""OpenAI's log-probs, echo, response_format and priority on the in-process app, checked against the model itself:
exact shapes, numbers equal to a forward pass (1e-4), echo equal to rugpt's scoring, JSON that validates."""

import asyncio
import json
import time

import pytest
import torch

from _serve_helpers import asgi_client, make_app, metric, run
from rugpt.generation import GenerationSettings, Generator
from rugpt.scoring import Scorer, ScoreSettings

PROMPT = "Мой дядя самых честных правил"
USER = [{"role": "user", "content": "Привет!"}]
MOOD = {"type": "object", "additionalProperties": False, "required": ["mood", "level"],
        "properties": {"mood": {"enum": ["рад", "грустен"]}, "level": {"type": "integer", "minimum": 0, "maximum": 9}}}


def data_chunks(text: str) -> list[dict]:
    return [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]


def model_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over `ids`: row p is the distribution of token p + 1."""
    with torch.inference_mode():
        return torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def post_all(app, *requests: tuple[str, dict]) -> list:
    async def main():
        async with asgi_client(app) as client:
            return [await client.post(path, json=body) for path, body in requests]

    return run(main(), 60)


def test_completion_logprobs_are_the_models_with_openai_shape(tiny):
    [response] = post_all(make_app(tiny, ban_eos=False), ("/v1/completions", {
        "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}))
    [choice] = response.json()["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    greedy = GenerationSettings.from_preset("balanced", do_sample=False, max_new_tokens=6)
    expected = Generator(tiny, engine="fast").generate(PROMPT, greedy).completions[0]
    ids = tiny.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    generated = expected.token_ids + ([tiny.tokenizer.eos_token_id] if expected.finish_reason == "stop" else [])
    assert choice["text"] == expected.text and len(logprobs["tokens"]) == len(generated)
    reference = model_logprobs(tiny, ids + generated)[len(ids) - 1 : -1]
    for position, token in enumerate(generated):
        assert logprobs["token_logprobs"][position] == pytest.approx(float(reference[position, token]), abs=1e-4)
        top = logprobs["top_logprobs"][position]
        best = torch.topk(reference[position], 3).values.tolist()
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(best[: len(top)], abs=1e-4)
    assert "".join(logprobs["tokens"][: len(expected.token_ids)]) == choice["text"]
    offsets = [0]
    for token in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs["text_offset"] == offsets


def test_chat_logprobs_have_openai_shape_and_only_when_asked(tiny):
    chat = {"messages": USER, "max_tokens": 5, "seed": 3}
    with_top, without_top, plain = post_all(
        make_app(tiny), ("/v1/chat/completions", chat | {"logprobs": True, "top_logprobs": 2}),
        ("/v1/chat/completions", chat | {"logprobs": True}), ("/v1/chat/completions", chat))
    choice = with_top.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert set(choice["logprobs"]) == {"content", "refusal"} and len(content) == 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"] or entry["token"].startswith("bytes:")
        assert len(entry["top_logprobs"]) == 2 and all(set(t) == {"token", "logprob", "bytes"}
                                                       for t in entry["top_logprobs"])
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    joined = b"".join(bytes(entry["bytes"]) for entry in content).decode("utf-8", "replace").strip()
    assert joined == choice["message"]["content"]
    assert [e["top_logprobs"] for e in without_top.json()["choices"][0]["logprobs"]["content"]] == [[]] * 5
    assert plain.json()["choices"][0]["logprobs"] is None
    assert [e["token"] for e in without_top.json()["choices"][0]["logprobs"]["content"]] == [
        e["token"] for e in content]  # the same seed, the same answer, asked or not


def test_echo_scores_the_prompt_as_rugpt_scoring_does(tiny):
    text = "Мороз и солнце; день чудесный!"
    echo_only, echo_and_more, more = post_all(
        make_app(tiny),
        ("/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}),
        ("/v1/completions", {"prompt": text, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0}),
        ("/v1/completions", {"prompt": text, "max_tokens": 3, "temperature": 0}))
    body = echo_only.json()
    [choice] = body["choices"]
    scored = Scorer(tiny).score([text], ScoreSettings(prepend_bos=False, token_details=True))[0].tokens
    assert choice["text"] == text and body["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx([t.logprob for t in scored], abs=1e-4)
    assert "".join(logprobs["tokens"]) == text and logprobs["text_offset"][0] == 0
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    with_more = echo_and_more.json()["choices"][0]
    generated = more.json()["choices"][0]["text"]
    assert with_more["text"] == text + generated
    assert with_more["logprobs"]["token_logprobs"][: len(scored) + 1] == logprobs["token_logprobs"]
    assert len(with_more["logprobs"]["tokens"]) == len(scored) + 1 + 3
    assert with_more["logprobs"]["text_offset"][len(scored) + 1] == len(text)


def test_token_id_prompts_as_lm_evaluation_harness_sends_them(tiny):
    """local-completions' loglikelihood payload: token ids, echo, logprobs 1, max_tokens 1, temperature 0."""
    contexts = [tiny.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Небо синее", "Трава")]
    [response] = post_all(make_app(tiny), ("/v1/completions", {
        "prompt": contexts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}))
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for ids, choice in zip(contexts, body["choices"], strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids) + 1
        reference = model_logprobs(tiny, ids)
        assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(
            [float(reference[p - 1, ids[p]]) for p in range(1, len(ids))], abs=1e-4)
        for value, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= value - 1e-6  # what lm-eval's is_greedy compares


def test_streamed_logprobs_join_to_the_whole_answer(tiny):
    completion = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    chat = {"messages": USER, "max_tokens": 6, "seed": 2, "logprobs": True, "top_logprobs": 1}
    plain, streamed, plain_chat, streamed_chat = post_all(
        make_app(tiny), ("/v1/completions", completion), ("/v1/completions", completion | {"stream": True}),
        ("/v1/chat/completions", chat), ("/v1/chat/completions", chat | {"stream": True}))
    whole = plain.json()["choices"][0]
    chunks = [c["choices"][0] for c in data_chunks(streamed.text)]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks if "logprobs" in c for v in c["logprobs"][field]] == whole["logprobs"][field]
    chat_chunks = [c["choices"][0] for c in data_chunks(streamed_chat.text)]
    entries = [e for c in chat_chunks if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert entries == plain_chat.json()["choices"][0]["logprobs"]["content"]


def test_json_schema_output_parses_and_validates(tiny):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    schema_format = {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD, "strict": True}}
    requests = [("/v1/chat/completions", {"messages": USER, "max_tokens": 40, "seed": s, "n": 2,
                                          "response_format": schema_format}) for s in range(3)]
    requests.append(("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "seed": 1,
                                         "response_format": {"type": "json_object"}}))
    *chats, completion = post_all(make_app(tiny, ban_eos=False), *requests)
    for response in chats:
        for choice in response.json()["choices"]:
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["message"]["content"]), MOOD)
    cut = completion.json()["choices"][0]
    assert cut["finish_reason"] == "length" and cut["text"].startswith("{")  # as OpenAI: may be incomplete


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_why(tiny):
    pytest.importorskip("llguidance")
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True},
                                                  "strict": True}}
    [response] = post_all(make_app(tiny), ("/v1/chat/completions", {"messages": USER, "response_format": bad}))
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in error["message"] and error["code"] == "invalid_response_format"


def test_lower_priority_numbers_start_first(tiny):
    app = make_app(tiny, max_batch=1, step_delay=0.01)
    done: list[str] = []

    async def send(client, name: str, priority: int, tokens: int):
        response = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": tokens,
                                                              "priority": priority})
        assert response.status_code == 200
        done.append(name)

    async def main():
        async with asgi_client(app) as client:
            first = asyncio.create_task(send(client, "running", 0, 30))
            began = time.monotonic()
            while metric(app.state.metrics.render().decode(), "rugpt_running_rows") < 1:
                assert time.monotonic() - began < 20
                await asyncio.sleep(0.01)
            late = asyncio.create_task(send(client, "low", 5, 2))
            await asyncio.sleep(0.1)  # "low" waits in the queue before "high" arrives
            urgent = asyncio.create_task(send(client, "high", -1, 2))
            await asyncio.gather(first, late, urgent)

    run(main(), 60)
    assert done == ["running", "high", "low"]


def test_openapi_documents_every_status_the_routes_answer(tiny):
    async def main():
        async with asgi_client(make_app(tiny)) as client:
            return (await client.get("/openapi.json")).json()

    spec = run(main())
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "409", "413", "429", "500", "503", "504"}
        assert "text/event-stream" in responses["200"]["content"]
        assert responses["429"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    assert {"401", "413", "500"} <= set(spec["paths"]["/v1/models"]["get"]["responses"])
    assert "503" in spec["paths"]["/health"]["get"]["responses"]
    assert "422" not in json.dumps(spec["paths"])  # validation errors are 400 here
    assert set(spec["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


def test_speculating_server_answers_as_the_plain_one_with_logprobs_json_and_sampling(tiny):
    pytest.importorskip("llguidance")
    schema_format = {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD, "strict": True}}
    requests = [
        ("/v1/completions", {"prompt": PROMPT + ", " + PROMPT, "max_tokens": 24, "temperature": 0, "logprobs": 2}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "seed": 5, "n": 2}),
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 40, "seed": 1, "response_format": schema_format}),
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 12, "temperature": 0, "logprobs": True,
                                  "top_logprobs": 2}),
    ]

    def answers(**settings):
        return [response.json()["choices"] for response in post_all(make_app(tiny, ban_eos=False, **settings),
                                                                    *requests)]

    drafted, plain = split_numbers(answers(speculate="lookup")), split_numbers(answers())
    assert drafted[0] == plain[0]  # the same text, tokens, finish reasons and shapes
    # log-probs of checked drafts come from an extend, the plain ones from a step: equal up to float rounding
    assert drafted[1] == pytest.approx(plain[1], abs=1e-4)


def split_numbers(value) -> tuple:
    """(`value` with every float replaced by None, the floats in order)."""
    if isinstance(value, float):
        return None, [value]
    if isinstance(value, dict):
        parts = {key: split_numbers(item) for key, item in value.items()}
        return {key: part[0] for key, part in parts.items()}, [n for part in parts.values() for n in part[1]]
    if isinstance(value, list):
        parts = [split_numbers(item) for item in value]
        return [part[0] for part in parts], [n for part in parts for n in part[1]]
    return value, []
