import pytest
from transformers import AutoTokenizer

from rugpt.errors import UsageError
from rugpt.models import BUNDLED_DIR
from rugpt.tokenizer import describe_tokens, train_tokenizer

TEXTS = ["Мороз и солнце; день чудесный!", "Ещё ты дремлешь, друг прелестный.", "Пора, красавица, проснись."] * 20


def test_trained_tokenizer_round_trips_russian(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=400, out_dir=tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Ещё ты дремлешь, друг прелестный. Ёлка!"
    ids = reloaded(text)["input_ids"]
    assert reloaded.decode(ids) == text
    assert reloaded.eos_token == "<|endoftext|>" and reloaded.convert_tokens_to_ids("<|endoftext|>") == 0
    assert len(tokenizer) == len(reloaded) <= 400


def test_too_small_vocabulary_is_refused(tmp_path):
    with pytest.raises(UsageError, match="vocab_size=100"):
        train_tokenizer(TEXTS, vocab_size=100, out_dir=tmp_path)


def test_describe_tokens_shows_readable_text_and_ids():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    views = describe_tokens(tokenizer, "Привет, мир")
    assert "".join(v.text for v in views) == "Привет, мир"
    assert [v.id for v in views] == tokenizer("Привет, мир")["input_ids"]
    assert all("Ð" not in v.text for v in views)  # no raw byte-level symbols


def test_split_character_shows_bytes():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    views = describe_tokens(tokenizer, "𝔘")  # a 4-byte character the BPE never saw whole
    assert len(views) > 1
    assert "".join(v.text for v in views) == "".join(f"\\x{b:02x}" for b in "𝔘".encode())


def test_empty_text_is_an_error():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    with pytest.raises(UsageError, match="empty"):
        describe_tokens(tokenizer, "")
