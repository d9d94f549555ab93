"""The llama.cpp engines against the transformers reference, on a tiny random GPT-2 converted to GGUF."""

import importlib.util
import sys

import pytest
import torch
from _engine_helpers import prompt_ids, run_tokens

from rugpt.engines import create_engine
from rugpt.engines import gguf_convert as conversion
from rugpt.errors import UsageError

missing = [name for name in ("llama_cpp", "gguf") if importlib.util.find_spec(name) is None]
needs_llamacpp = pytest.mark.skipif(
    bool(missing), reason=f"{', '.join(missing)} not installed: pip install 'rugpt[llamacpp]' to test these engines")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Converted models go to a temp cache, never the user's."""
    folder = tmp_path_factory.mktemp("rugpt-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RUGPT_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def f32_engine(tiny, cache):
    return create_engine(tiny, "llamacpp-f32", max_rows=4)


@pytest.fixture(scope="module")
def reference(tiny):
    return create_engine(tiny, "transformers")


@needs_llamacpp
def test_f32_logits_match_transformers_at_every_step(tiny, f32_engine, reference):
    ids = prompt_ids(tiny)
    continuation = list(range(100, 130))
    expected = run_tokens(reference, ids, continuation)
    got = run_tokens(f32_engine, ids, continuation)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # ggml's GELU reads a table of fp16 inputs, so a few 1e-4 of difference is expected, not more.
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


@needs_llamacpp
def test_batched_ragged_step_equals_rows_alone(tiny, f32_engine):
    prompts = [prompt_ids(tiny, t) for t in ("Буря мглою", "Я помню чудное мгновенье, передо мной", "Ночь")]
    alone = [run_tokens(f32_engine, p, [7, 8, 9]) for p in prompts]
    rows = [f32_engine.prefill(p)[0] for p in prompts]
    batched = [f32_engine.step(rows, [t, t, t]) for t in (7, 8, 9)]
    reordered = f32_engine.step(rows[::-1], [5, 5, 5])  # logits come back in the order asked
    for row in rows:
        f32_engine.release(row)
    for i in range(3):
        torch.testing.assert_close(torch.stack([b[i] for b in batched]), alone[i][1:], atol=1e-4, rtol=1e-4)
    assert reordered.shape == (3, f32_engine.vocab_size)


@needs_llamacpp
def test_release_frees_the_sequence_for_a_new_row(tiny, f32_engine):
    fresh = run_tokens(f32_engine, prompt_ids(tiny, "Три слова тут"), [5, 6])
    rows = [f32_engine.prefill(prompt_ids(tiny, t))[0] for t in ("Один", "Два слова", "Три", "Четыре")]
    with pytest.raises(UsageError, match="max_rows=4"):
        f32_engine.prefill([1, 2])
    f32_engine.release(rows[1])
    f32_engine.release(rows[1])  # releasing twice is harmless
    # The freed sequence's old cells must be gone: the new row sees only its own tokens.
    again = run_tokens(f32_engine, prompt_ids(tiny, "Три слова тут"), [5, 6])
    torch.testing.assert_close(again, fresh, atol=1e-5, rtol=1e-5)
    for row in rows:
        f32_engine.release(row)
    assert f32_engine.active_rows == []


@needs_llamacpp
def test_q8_stays_close(tiny, f32_engine, cache):
    ids = prompt_ids(tiny)
    exact = run_tokens(f32_engine, ids, [10, 11, 12, 13])
    q8 = create_engine(tiny, "llamacpp-q8", max_rows=2)
    assert q8.name == "llamacpp-q8"
    approx = run_tokens(q8, ids, [10, 11, 12, 13])
    assert (approx - exact).abs().max() / exact.abs().max() < 0.05
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8


@needs_llamacpp
def test_generator_greedy_text_matches_transformers(tiny, cache):
    from rugpt.generation import GenerationSettings, Generator

    settings = GenerationSettings.from_preset("greedy", max_new_tokens=12)
    ours = Generator(tiny, engine="llamacpp-f32").generate_batch(["Буря мглою", "Ночь"], settings)
    theirs = Generator(tiny, engine="transformers").generate_batch(["Буря мглою", "Ночь"], settings)
    assert [r.completions[0].token_ids for r in ours] == [r.completions[0].token_ids for r in theirs]
    assert ours[0].engine == "llamacpp-f32"


@needs_llamacpp
def test_conversion_is_cached_and_atomic(tiny, tmp_path, monkeypatch):
    first = conversion.convert(tiny.source, "f16", cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert conversion.convert(tiny.source, "f16", cache=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in first.parent.parent.iterdir()] == [first.parent.name]  # no temp folders left

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(conversion, "write_gguf", crash)
    with pytest.raises(OSError, match="disk full"):
        conversion.convert(tiny.source, "q8_0", cache=tmp_path)
    assert [p.name for p in first.parent.parent.iterdir()] == [first.parent.name]  # nothing half-written


@needs_llamacpp
def test_gguf_metadata_and_tokenizer_round_trip(tiny, f32_engine):
    import gguf
    import llama_cpp

    path = conversion.convert(tiny.source, "f32")
    reader = gguf.GGUFReader(path)

    def field(name):
        return reader.fields[name].contents()

    assert field("general.architecture") == "gpt2"
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert len(field("tokenizer.ggml.tokens")) == tiny.model.config.vocab_size
    assert field("tokenizer.ggml.eos_token_id") == tiny.tokenizer.eos_token_id
    assert field("gpt2.block_count") == tiny.model.config.n_layer
    text = "Я помню чудное мгновенье: передо мной явилась ты, 1799 год!"
    raw = text.encode()
    out = (llama_cpp.llama_token * 256)()
    vocab = llama_cpp.llama_model_get_vocab(f32_engine._model)
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), out, 256, False, False)
    assert list(out[:n]) == tiny.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_unsupported_checkpoints_are_refused(tiny_model_dir, tmp_path):
    config = conversion.json.loads((tiny_model_dir / "config.json").read_text())
    assert conversion.unsupported_reason(config) is None
    assert "activation" in conversion.unsupported_reason(config | {"activation_function": "relu"})
    with pytest.raises(UsageError, match="lacks"):
        conversion.convert(tmp_path, "f32")


def test_missing_llama_cpp_says_how_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(UsageError, match=r"pip install 'rugpt\[llamacpp\]'"):
        create_engine(tiny, "llamacpp-q8")


def test_trained_prompt_falls_back_to_transformers(tiny):
    class Patched(torch.nn.Module):  # stands in for a trained prompt's embedding layer
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids)

    original = tiny.model.get_input_embeddings()
    tiny.model.set_input_embeddings(Patched(original))
    try:
        assert create_engine(tiny, "llamacpp-f32").name == "transformers"
    finally:
        tiny.model.set_input_embeddings(original)
