"""GGUF files as models: tokenizer and ids from the file, llama.cpp over the file, torch model only on demand.

The files come from rugpt's converter over the tiny random GPT-2 (tests/layouts/gguf.py), so the
source checkpoint is the reference: same token ids, same greedy text, same logits once dequantized.
"""

import sys
from pathlib import Path

import pytest
import torch

from rugpt.engines import create_engine
from rugpt.errors import ModelNotFound, UsageError
from rugpt.gguf_checkpoint import load_gguf

pytest.importorskip("gguf")
from layouts.gguf import build_gguf  # noqa: E402  (needs gguf)

RUSSIAN = [
    "Мороз и солнце; день чудесный!",
    "Ещё ты дремлешь, друг прелестный — пора, красавица, проснись.",
    "В 1837 году, 29 января (по старому стилю), поэта не стало... Ёлка, ёж, щёлочь?",
    "  Два пробела, табуляция\tи перевод\nстроки: 3,14 и 100 000 рублей.",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Checkpoints converted for the llamacpp-* engines go to a temp cache, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RUGPT_CACHE", str(tmp_path_factory.mktemp("rugpt-cache")))
        yield


@pytest.fixture(scope="module")
def f32_file(tiny_model_dir, tmp_path_factory) -> Path:
    return build_gguf(tmp_path_factory.mktemp("gguf-f32"), tiny_model_dir, "f32")


@pytest.fixture(scope="module")
def q8_file(tiny_model_dir, tmp_path_factory) -> Path:
    return build_gguf(tmp_path_factory.mktemp("gguf-q8"), tiny_model_dir, "q8_0")


def test_tokenizer_from_the_file_matches_the_source(tiny, q8_file):
    loaded = load_gguf(q8_file, "tiny-q8", device="cpu")
    for text in RUSSIAN:
        expected = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(expected) > 5
        assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == expected
        assert loaded.tokenizer(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
        assert loaded.tokenizer.decode(expected) == text
    end = tiny.tokenizer.eos_token
    assert loaded.tokenizer(f"Конец.{end}")["input_ids"][-1] == tiny.tokenizer.eos_token_id  # kept whole


def test_special_ids_and_shape_come_from_the_metadata(tiny, q8_file):
    loaded = load_gguf(q8_file, "tiny-q8", device="cpu")
    source = tiny.tokenizer
    assert (loaded.tokenizer.eos_token_id, loaded.tokenizer.bos_token_id, loaded.tokenizer.pad_token_id) == (
        source.eos_token_id, source.bos_token_id, source.pad_token_id)
    assert loaded.metadata["tokenizer.ggml.eos_token_id"] == source.eos_token_id
    assert loaded.context_length == tiny.model.config.n_positions == 128
    assert loaded.weight_type == "q8_0"
    assert loaded.gguf_path == q8_file and loaded.source == str(q8_file)
    assert not loaded.model_built  # none of the above needed the torch model
    assert "tiny-q8" in repr(loaded) and not loaded.model_built


def write_rugpt35_like(path: Path) -> list[str]:
    """A GGUF whose vocabulary is laid out as ruGPT-3.5's: <pad> 0, <s> 2, </s> 3, no <|endoftext|>, padded rows."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tokens = [*specials, *pre_tokenizers.ByteLevel.alphabet(), "Ð¾", "Ð¾Ð¾", "[PAD0]", "[PAD1]"]
    types = [3] * 4 + [1] * (len(tokens) - 6) + [5, 5]  # control, normal, unused
    writer = gguf.GGUFWriter(path, arch="gpt2")
    writer.add_context_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ð ¾", "Ð¾ Ð¾"])
    for name, index in (("pad", 0), ("unk", 1), ("bos", 2), ("eos", 3)):
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_vocabulary_without_endoftext_gains_no_token(tmp_path):
    tokens = write_rugpt35_like(tmp_path / "rugpt35.gguf")
    loaded = load_gguf(tmp_path / "rugpt35.gguf", "rugpt35", device="cpu")
    tokenizer = loaded.tokenizer
    assert len(tokenizer) == len(tokens)  # transformers' GPT2Tokenizer would add <|endoftext|> as id len(tokens)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2, 3)
    assert tokenizer("оооо</s>", add_special_tokens=False)["input_ids"] == [tokens.index("Ð¾Ð¾")] * 2 + [3]
    assert max(tokenizer("<|endoftext|> ё", add_special_tokens=False)["input_ids"]) < len(tokens)
    assert loaded.sampleable_vocab == len(tokens) - 2  # the [PAD…] rows are never sampled
    assert loaded.context_length == 64


def test_generate_runs_the_file_on_llamacpp_and_never_builds_the_torch_model(tiny, f32_file, cache):
    pytest.importorskip("llama_cpp")
    from rugpt.generation import GenerationSettings, Generator

    settings = GenerationSettings.from_preset("greedy", max_new_tokens=10)
    loaded = load_gguf(f32_file, "tiny-f32", device="cpu")
    ours = Generator(loaded, engine="auto").generate_batch(["Мороз и солнце", "Ночь"], settings)
    theirs = Generator(tiny, engine="llamacpp-f32").generate_batch(["Мороз и солнце", "Ночь"], settings)
    assert [r.completions[0].token_ids for r in ours] == [r.completions[0].token_ids for r in theirs]
    assert all(len(r.completions[0].token_ids) == 10 for r in ours)
    assert ours[0].engine == "llamacpp-f32"
    assert not loaded.model_built


def test_llamacpp_types_run_the_file_as_it_is(f32_file, caplog):
    pytest.importorskip("llama_cpp")
    loaded = load_gguf(f32_file, "tiny-f32", device="cpu")
    same = create_engine(loaded, "llamacpp-f32", max_rows=2)
    with caplog.at_level("WARNING", logger="rugpt.engines.llamacpp"):
        other = create_engine(loaded, "llamacpp-q8", max_rows=2)
    assert same.name == other.name == "llamacpp-f32"
    assert "holds f32 weights" in caplog.text and "not as q8_0" in caplog.text
    ids = loaded.tokenizer("Мороз и солнце")["input_ids"]
    torch.testing.assert_close(other.prefill(ids)[1], same.prefill(ids)[1])
    assert not loaded.model_built


def test_torch_engines_and_scoring_dequantize_on_demand(tiny, f32_file):
    from rugpt.scoring import score

    loaded = load_gguf(f32_file, "tiny-f32", device="cpu")
    engine = create_engine(loaded, "transformers")
    assert loaded.model_built and engine.name == "transformers"
    ids = torch.tensor([tiny.tokenizer(RUSSIAN[1])["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(ids).logits, tiny.model(ids).logits, atol=1e-5, rtol=1e-5)
    ours, theirs = score(RUSSIAN[0], model=loaded), score(RUSSIAN[0], model=tiny)
    assert ours.num_tokens == theirs.num_tokens
    assert ours.log_likelihood == pytest.approx(theirs.log_likelihood, rel=1e-5)


def test_q8_file_dequantizes_close_to_the_source(tiny, q8_file):
    loaded = load_gguf(q8_file, "tiny-q8", device="cpu")
    ids = torch.tensor([tiny.tokenizer(RUSSIAN[2])["input_ids"]])
    with torch.inference_mode():
        got, expected = loaded.model(ids).logits, tiny.model(ids).logits
    assert (got - expected).abs().max() / expected.abs().max() < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


def test_missing_llama_cpp_says_how_to_install(f32_file, monkeypatch):
    loaded = load_gguf(f32_file, "tiny-f32", device="cpu")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(UsageError, match=r"pip install 'rugpt\[llamacpp\]'"):
        create_engine(loaded, "auto")
    assert not loaded.model_built  # no silent fallback to dequantizing the whole file


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"PK\x03\x04 not a gguf at all" + data[:100], "not a GGUF file"),
    (lambda data: data[:60], "cannot be read"),
    (lambda data: data[:-100], "truncated"),  # inside the last tensor
    (lambda data: b"", "not a GGUF file"),
])
def test_broken_files_give_one_sentence(q8_file, tmp_path, damage, message):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(damage(q8_file.read_bytes()))
    with pytest.raises(ModelNotFound, match=message) as error:
        load_gguf(broken, "broken", device="cpu")
    assert str(broken) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_other_architectures_are_refused(tmp_path):
    import gguf
    import numpy as np

    with pytest.raises(ModelNotFound, match="does not exist"):
        load_gguf(tmp_path / "absent.gguf", "absent")
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", arch="llama")
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UsageError, match="holds a 'llama' model"):
        load_gguf(tmp_path / "llama.gguf", "llama")
