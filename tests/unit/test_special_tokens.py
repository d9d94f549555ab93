"""Special ids from the model's own files, checked against its vocabulary; padded rows never sampled."""

import json
import logging

import torch

from layouts import build_old_finetune, build_tokenizer, gpt2_layout, write_json
from rugpt import special_tokens
from rugpt.generation import Generator
from rugpt.models import load
from rugpt.sampling import RowSampler, SamplingParams


def test_ids_past_the_vocabulary_are_never_picked_even_when_likeliest():
    logits = torch.zeros(12)
    logits[10] = 50.0  # a padded row that happens to score highest
    greedy = RowSampler(SamplingParams(do_sample=False), [], vocab_size=10)
    assert greedy.next_token(logits) != 10
    hot = RowSampler(SamplingParams(temperature=5.0, top_k=0, top_p=1.0), [], seed=0, vocab_size=10)
    assert all(hot.next_token(logits) < 10 for _ in range(200))


def test_old_config_warns_once_and_ends_at_the_trained_end_token(tmp_path, caplog):
    special_tokens._warned.clear()
    folder = build_old_finetune(tmp_path / "old")
    config_eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    with caplog.at_level(logging.WARNING, logger="rugpt.special_tokens"):
        first = load(str(folder))
        load(str(folder))
    warnings = [r.getMessage() for r in caplog.records if "eos_token_id" in r.getMessage()]
    assert len(warnings) == 1 and f"eos_token_id={config_eos}" in warnings[0] and "'</s>' (2)" in warnings[0]
    assert first.tokenizer.eos_token_id == 2 and first.model.generation_config.eos_token_id == 2
    # transformers invented '<|endoftext|>' at the end of the vocabulary: it is not sampleable
    invented = first.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert invented >= first.sampleable_vocab == first.tokenizer.vocab_size


def test_no_end_token_at_all_says_how_generation_stops(tmp_path, caplog):
    special_tokens._warned.clear()
    folder = gpt2_layout(tmp_path / "bare", specials=["<unk>"], special_map={"unk_token": "<unk>"}, padded_rows=0,
                         ids={"eos_token_id": None, "bos_token_id": None})
    with caplog.at_level(logging.WARNING, logger="rugpt.special_tokens"):
        loaded = load(str(folder))
    assert loaded.tokenizer.eos_token_id is None
    assert any("stops only at max_new_tokens or a stop string" in r.getMessage() for r in caplog.records)
    result = Generator(loaded, engine="transformers").generate("Мороз", max_new_tokens=5, do_sample=False)
    assert result.completions[0].finish_reason == "length" and len(result.completions[0].token_ids) == 5


def test_declared_added_tokens_stay_sampleable(tmp_path):
    folder = tmp_path / "added"
    vocab = build_tokenizer(folder, ["<pad>", "<s>", "</s>"])
    write_json(folder / "added_tokens.json", {"<bot>": vocab, "<user>": vocab + 1})
    assert special_tokens.declared_added_ids(folder) == {vocab, vocab + 1}
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")  # unreadable: ignored, not fatal
    assert special_tokens.declared_added_ids(folder) == {vocab, vocab + 1}
