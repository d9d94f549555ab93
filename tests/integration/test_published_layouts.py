"""Every capability on every published layout, in miniature (tests/layouts): the ruGPT-3 family as it is on
the hub — pickled `.bin` weights, slow tokenizer files, their own special ids, padded rows, shards, XL's
sparse attention — not only the bundled model.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from layouts import build_13b_sharded, build_large, build_old_finetune, build_small_2023
from layouts.gguf import build_gguf
from layouts.xl import build_xl
from rugpt.errors import UsageError
from rugpt.generation import GenerationSettings, Generator
from rugpt.models import load

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

# layout → (builder, (pad, bos, eos) the loaded tokenizer must say, end-of-text token)
LAYOUTS = {
    "small-2023": (build_small_2023, (0, 1, 2), "</s>"),
    "large": (build_large, (0, 1, 2), "</s>"),
    "old-config-finetune": (build_old_finetune, (0, 1, 2), "</s>"),
    "ruGPT-3.5-sharded": (build_13b_sharded, (0, 2, 3), "</s>"),
    "xl-converted": (build_xl, (0, 2, 1), "<|endoftext|>"),
    "ruGPT-3.5-gguf-q8": (lambda folder: build_gguf(folder, build_13b_sharded(folder / "source")), (0, 2, 3), "</s>"),
}
GPT2_ENGINES = ["auto", "transformers", "fast", "fast-bf16", "fast-fp16", "fast-int8"]
PROMPT = "Мороз и солнце; день чудесный!"
TRAINED_VOCAB = 400  # every layout's tokenizer (tests/layouts.build_tokenizer); rows past it are padding


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    builder, ids, end = LAYOUTS[request.param]
    if request.param.endswith("gguf-q8"):
        pytest.importorskip("gguf")
    folder = builder(tmp_path_factory.mktemp(request.param))
    loaded = load(str(folder), device="cpu")
    return request.param, folder, loaded, ids, end


def is_xl(loaded) -> bool:
    return not is_gguf(loaded) and loaded.model.config.model_type == "rugpt3xl"


def is_gguf(loaded) -> bool:
    return getattr(loaded, "gguf_path", None) is not None


def needs_llama_cpp(loaded, engine: str) -> bool:
    return engine.startswith("llamacpp") or (is_gguf(loaded) and engine == "auto")


def test_special_ids_come_from_the_model_files(layout):
    name, _, loaded, (pad, bos, eos), end = layout
    tokenizer = loaded.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (pad, bos, eos)
    assert tokenizer.eos_token == end
    assert loaded.model.generation_config.eos_token_id == eos and loaded.model.config.eos_token_id == eos
    assert loaded.sampleable_vocab == TRAINED_VOCAB  # padded rows (and invented tokens) excluded


@pytest.mark.parametrize("engine", GPT2_ENGINES)
def test_generates_russian_on_every_engine_without_padded_rows(layout, engine):
    name, _, loaded, _, _ = layout
    if is_xl(loaded) and engine.startswith("fast"):
        with pytest.raises(UsageError, match="fast engine"):
            Generator(loaded, engine=engine).generate(PROMPT, max_new_tokens=4)
        return
    if needs_llama_cpp(loaded, engine):
        pytest.importorskip("llama_cpp")
    generator = Generator(loaded, engine=engine)
    hot = GenerationSettings.from_preset("creative", temperature=3.0, max_new_tokens=24, seed=0)
    result = generator.generate(PROMPT, hot)
    assert result.engine != "abstract" and result.prompt_tokens > 3
    ids = result.completions[0].token_ids
    assert ids and max(ids) < TRAINED_VOCAB
    greedy = generator.generate(PROMPT, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    reference = Generator(loaded, engine="transformers").generate(PROMPT, max_new_tokens=8, do_sample=False,
                                                                  repetition_penalty=1.0)
    if engine in ("auto", "fast", "transformers") and not is_gguf(loaded):  # llama.cpp's q8 differs slightly
        assert greedy.completions[0].token_ids == reference.completions[0].token_ids


class EndOfTextFirst:
    """Wraps an engine so that the layout's end-of-text id is the likeliest token at every step."""

    def __init__(self, inner, eos: int):
        self.inner, self.eos = inner, eos

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, token_ids, embeds=None):
        row, logits = self.inner.prefill(token_ids, embeds)
        return row, self._push(logits)

    def step(self, rows, token_ids):
        return self._push(self.inner.step(rows, token_ids))

    def _push(self, logits):
        with torch.inference_mode():
            logits = logits.clone()
            logits[..., self.eos] = logits.max() + 100
        return logits


def test_cli_generates_from_the_folder_on_every_engine(layout):
    from typer.testing import CliRunner

    from rugpt.cli import app

    _, folder, loaded, _, _ = layout
    engines = ["auto", "transformers"] if is_xl(loaded) else GPT2_ENGINES
    if not is_xl(loaded):
        engines = [*engines, "llamacpp-f32", "llamacpp-q8"]
    for engine in engines:
        if needs_llama_cpp(loaded, engine) and not importlib.util.find_spec("llama_cpp"):
            continue
        result = CliRunner().invoke(app, ["generate", PROMPT, "--model", str(folder), "--engine", engine,
                                          "--max-new-tokens", "6", "--seed", "0", "--json"])
        assert result.exit_code == 0, (engine, result.output)
        payload = json.loads(result.stdout)
        assert payload["engine"].startswith(engine.split("-")[0] if engine != "auto" else "")
        assert payload["completions"][0]["token_ids"]


def test_speculative_lookup_gives_the_plain_greedy_text(layout):
    from typer.testing import CliRunner

    from rugpt.cli import app

    _, folder, loaded, _, _ = layout
    if is_gguf(loaded):
        pytest.importorskip("llama_cpp")
    generator = Generator(loaded)
    greedy = dict(max_new_tokens=16, do_sample=False, repetition_penalty=1.0)
    plain = generator.generate(PROMPT + " " + PROMPT, **greedy)
    drafted = generator.generate(PROMPT + " " + PROMPT, speculate="lookup", **greedy)
    assert drafted.completions[0].token_ids == plain.completions[0].token_ids
    assert drafted.speculation is not None and plain.speculation is None
    result = CliRunner().invoke(app, ["generate", PROMPT, "--model", str(folder), "--speculate", "lookup",
                                      "--preset", "greedy", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["completions"][0]["token_ids"]


def test_generation_stops_at_the_models_own_end_of_text(layout):
    _, _, loaded, (_, _, eos), _ = layout
    generator = Generator(loaded, engine="transformers")
    generator._engine = EndOfTextFirst(generator.engine(), eos)
    result = generator.generate(PROMPT, max_new_tokens=10, do_sample=False)
    assert result.completions[0].finish_reason == "stop" and result.completions[0].token_ids == []


def test_scores_and_classifies(layout):
    import rugpt

    _, _, loaded, _, _ = layout
    scored = rugpt.score(["Мороз и солнце", "Жил-был старик"], model=loaded)
    assert all(s.perplexity > 1 and s.num_tokens > 1 for s in scored)
    prediction = rugpt.classify("Какой чудесный день", model=loaded, template="{text}\nНастроение:",
                                labels=("хорошее", "плохое"))
    assert prediction.label in ("хорошее", "плохое")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetunes_with_the_models_own_end_of_text(layout, method, tmp_path):
    from rugpt.training.finetune import finetune

    _, folder, loaded, (_, _, eos), _ = layout
    data = tmp_path / "poems.txt"
    data.write_text("\n\n".join(["Мороз и солнце; день чудесный!", "Ещё ты дремлешь, друг прелестный —",
                                 "Пора, красавица, проснись:", "Открой сомкнуты негой взоры"] * 6), encoding="utf-8")
    out = tmp_path / "run"
    result = finetune(data, out, model=str(folder), method=method, block_size=32, batch_size=2, max_steps=2,
                      eval_every=2, save_every=2, lr=1e-3, merge=method == "lora")
    assert result.steps == 2
    tuned = load(str(out))
    assert tuned.tokenizer.eos_token_id == eos
    assert Generator(tuned, engine="transformers").generate(PROMPT, max_new_tokens=3).completions


def test_packed_blocks_end_documents_with_the_models_own_token(layout, tmp_path):
    from rugpt.training.data import load_data
    from rugpt.training.settings import FinetuneSettings

    _, folder, loaded, (_, _, eos), _ = layout
    data = tmp_path / "docs.txt"
    data.write_text("Мороз и солнце\n\nЖил-был старик\n\nДень чудесный\n\nПора, красавица", encoding="utf-8")
    settings = FinetuneSettings(data=data, out=tmp_path / "run", model=str(folder), block_size=16, eval_fraction=0.25)
    packed = load_data(settings, loaded.tokenizer, loaded.context_length)
    train = packed.train
    ends = train.tokens[(train.tokens == eos) & train.targets]
    assert len(ends) == train.documents  # one end-of-text per document, the model's own id


def test_prompt_tunes(layout, tmp_path):
    from rugpt.prompts.training import PromptTuningSettings, prompt_tune

    _, folder, _, _, _ = layout
    loaded = load(str(folder), device="cpu")  # patched in place: a copy of its own
    rows = [{"text": "Вопрос: Какая столица у России?", "target": "Москва"}] * 8
    settings = PromptTuningSettings(format="<P*4>{text}", max_steps=2, batch_size=4, epochs=1)
    result = prompt_tune(rows, settings, model=loaded, out=tmp_path / "prompt")
    assert (tmp_path / "prompt" / "prompt.json").is_file() and result.epochs
    assert Generator(loaded).generate("Вопрос: Сколько дней в неделе?", max_new_tokens=3).completions


def test_serves_the_openai_client(layout):
    openai = pytest.importorskip("openai")
    from _serve_helpers import live_server
    from rugpt.serve import ServerSettings, create_app

    _, _, loaded, _, _ = layout
    if needs_llama_cpp(loaded, "auto"):
        pytest.importorskip("llama_cpp")
    with live_server(create_app(ServerSettings(shutdown_grace=1.0), loaded=loaded)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        [model] = client.models.list().data
        completion = client.completions.create(model=model.id, prompt=PROMPT, max_tokens=6, temperature=0)
        chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Привет"}],
                                              max_tokens=6, seed=1)
    assert completion.usage.completion_tokens == 6 and completion.choices[0].text
    assert chat.choices[0].message.role == "assistant"


def test_plays_one_adventure_turn(layout):
    from rugpt.apps.adventure.context import TokenCounter
    from rugpt.apps.adventure.engine import Game, local_completer
    from rugpt.apps.adventure.state import Adventure, AdventureSettings

    _, _, loaded, _, _ = layout
    if needs_llama_cpp(loaded, "auto"):
        pytest.importorskip("llama_cpp")
    adventure = Adventure(title="Тест", scenario="test", world="Лес у реки.", opening="Вы стоите у замка.",
                          memory="Вы — рыцарь.", settings=AdventureSettings(max_new_tokens=12))
    game = Game(adventure, TokenCounter(loaded.tokenizer), loaded.context_length, seeds=iter(range(100)).__next__)
    turn = game.act("do", "я открываю дверь", local_completer(Generator(loaded)))
    assert turn.action and isinstance(turn.output, str)


def test_exports_gguf_with_its_own_tokenizer(layout):
    pytest.importorskip("gguf")
    from rugpt.engines.gguf_convert import convert

    _, folder, loaded, (pad, bos, eos), _ = layout
    if is_gguf(loaded):
        pytest.skip("already a GGUF file")
    if is_xl(loaded):
        with pytest.raises(UsageError, match="llama.cpp cannot run"):
            convert(folder)
        return
    path = convert(folder)
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: reader.fields[name] for name in reader.fields}

    def value(name):
        field = fields[name]
        return int(field.parts[field.data[0]][0])

    assert value("tokenizer.ggml.eos_token_id") == eos and value("tokenizer.ggml.bos_token_id") == bos
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == loaded.model.config.vocab_size
    assert json.dumps(bytes(tokens.parts[tokens.data[eos]]).decode()) == json.dumps(loaded.tokenizer.eos_token)
