"""Trained prompts on the server: chosen by name from --prompts-dir, batched with plain rows, same text as alone."""

import asyncio

import pytest
import torch

from _serve_helpers import asgi_client, make_app, run
from rugpt.generation import GenerationSettings, Generator
from rugpt.models import load

prompts = pytest.importorskip("rugpt.prompts", reason="rugpt.prompts (prompt tuning) is not available")

TEMPLATE = "<P*4>{text}<P*2>"
GREEDY = {"preset": "greedy", "no_repeat_ngram_size": 0, "max_tokens": 10}


@pytest.fixture(scope="module")
def prompts_dir(tiny_model_dir, tmp_path_factory):
    """A folder with one trained (here: randomly initialised) prompt, 'joke', saved for the tiny model."""
    folder = tmp_path_factory.mktemp("prompts")
    lm = load(str(tiny_model_dir), device="cpu")
    torch.manual_seed(1)
    prompt = prompts.Prompt(prompts.PromptFormat(TEMPLATE), prompts.TensorPromptProvider())
    prompt.patch(lm.model, lm.tokenizer)
    with torch.no_grad():
        for parameter in prompt.parameters():
            parameter.normal_(0, 1.0)  # far from the vocabulary's rows, so the prompt visibly changes the text
    prompt.save_pretrained(folder / "joke")
    return folder


@pytest.fixture(scope="module")
def served(tiny_model_dir, prompts_dir):
    """A private model copy for the server: loading prompts patches the model."""
    return load(str(tiny_model_dir), device="cpu")


def test_a_trained_prompt_gives_the_text_the_library_gives(served, prompts_dir, tiny_model_dir):
    async def main():
        async with asgi_client(make_app(served, prompts_dir=prompts_dir)) as client:
            models = (await client.get("/v1/models")).json()
            body = {"prompt": "Заходит улитка в бар", "temperature": 0, **GREEDY}
            trained = await client.post("/v1/completions", json=body | {"trained_prompt": "joke"})
            plain = await client.post("/v1/completions", json=body)
            return models, trained.json(), plain.json()

    models, trained, plain = run(main())
    assert models["data"][0]["trained_prompts"] == ["joke"]
    lm = load(str(tiny_model_dir), device="cpu")
    prompt = prompts.Prompt.from_pretrained(prompts_dir / "joke").patch(lm.model, lm.tokenizer)
    settings = GenerationSettings.from_preset("greedy", no_repeat_ngram_size=0, max_new_tokens=10)
    expected = Generator(lm, engine="fast").generate(prompt.render("Заходит улитка в бар"), settings)
    assert trained["choices"][0]["text"] == expected.text
    assert trained["choices"][0]["text"] != plain["choices"][0]["text"]


def test_trained_and_plain_rows_share_a_batch_and_keep_their_texts(served, prompts_dir):
    bodies = [{"prompt": text, **GREEDY} | extra for text in ("Ночь", "Буря мглою", "Жили-были")
              for extra in ({}, {"trained_prompt": "joke"})]

    async def main():
        app = make_app(served, max_batch=8, step_delay=0.005, prompts_dir=prompts_dir)
        async with asgi_client(app) as client:
            together = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            alone = [await client.post("/v1/completions", json=b) for b in bodies]
            return together, alone, max(app.state.scheduler.engine.step_sizes)

    together, alone, widest = run(main())
    assert widest > 1
    assert [r.json()["choices"][0]["text"] for r in together] == [r.json()["choices"][0]["text"] for r in alone]


def test_reserved_prompt_tokens_in_a_request_are_refused(served, prompts_dir):
    async def main():
        async with asgi_client(make_app(served, prompts_dir=prompts_dir)) as client:
            smuggled = "<|[joke]P|>" * 6 + "текст"
            plain = await client.post("/v1/completions", json={"prompt": smuggled, "max_tokens": 3})
            unknown = await client.post("/v1/completions", json={"prompt": "x", "trained_prompt": "poem"})
            return plain, unknown

    plain, unknown = run(main())
    assert plain.status_code == 400 and "reserved token" in plain.json()["error"]["message"]
    assert unknown.status_code == 400 and "this server has: joke" in unknown.json()["error"]["message"]
