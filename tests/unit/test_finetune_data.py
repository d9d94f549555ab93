"""Reading, templating and packing of fine-tuning data, and the errors bad data gets."""

import json

import pytest
from _finetune_helpers import poems_txt, qa_jsonl
from transformers import AutoTokenizer

from rugpt.errors import DataError, UsageError
from rugpt.models import BUNDLED_DIR
from rugpt.training.data import Example, pack_into_blocks, read_examples, resolve_block_size, tokenize
from rugpt.training.settings import FinetuneSettings, LossOn


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUNDLED_DIR)


def test_packing_puts_end_of_text_between_documents_and_pads_the_last_block():
    docs = [([5, 6, 0], [True] * 3), ([7, 8, 9, 0], [True] * 4)]
    blocks = pack_into_blocks(docs, block_size=3, eot_id=0)
    assert blocks.tokens.tolist() == [[5, 6, 0], [7, 8, 9], [0, 0, 0]]
    assert blocks.targets.tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert (blocks.documents, blocks.token_count) == (2, 7)


def test_text_file_documents_are_tokenised_and_packed_exactly(tmp_path, tokenizer):
    path = tmp_path / "a.txt"
    path.write_text("Первый документ.\nВторая строка.\n\n  \n\nВторой документ.\n", encoding="utf-8")
    examples = read_examples(path)
    assert [e.text for e in examples] == ["Первый документ.\nВторая строка.", "Второй документ."]
    blocks = pack_into_blocks(tokenize(tokenizer, examples), 8, tokenizer.eos_token_id)
    eot = tokenizer.eos_token_id
    expected = [*tokenizer.encode(examples[0].text), eot, *tokenizer.encode(examples[1].text), eot]
    stream = blocks.tokens.flatten().tolist()
    assert stream[:len(expected)] == expected
    assert stream[len(expected):] == [eot] * (len(stream) - len(expected))
    assert blocks.targets.flatten().tolist() == [True] * len(expected) + [False] * (len(stream) - len(expected))


def test_loss_on_answer_masks_the_question(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "два плюс два", "answer": "четыре"}, ensure_ascii=False) + "\n")
    (example,) = read_examples(path, "Q: {question}\nA: {answer}", LossOn.answer)
    assert example == Example("Q: два плюс два\nA: четыре", len("Q: два плюс два\nA: "))
    ((ids, targets),) = tokenize(tokenizer, [example])
    learnt = [i for i, t in zip(ids, targets, strict=True) if t]
    assert tokenizer.decode(learnt).strip() == "четыре<|endoftext|>"
    assert not any(targets[:len(tokenizer.encode("Q: два плюс два\nA:"))])
    (everything,) = read_examples(path, "Q: {question}\nA: {answer}", LossOn.all)
    assert all(tokenize(tokenizer, [everything])[0][1])


def test_folder_of_text_files_is_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("Второй.\n\nС пустой строкой внутри.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Первый.", encoding="utf-8")
    (tmp_path / "notes.md").write_text("не текст корпуса", encoding="utf-8")
    assert [e.text for e in read_examples(tmp_path)] == ["Первый.", "Второй.\n\nС пустой строкой внутри."]


def test_missing_template_field_names_the_line(tmp_path):
    path = qa_jsonl(tmp_path / "qa.jsonl", rows=3)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"question": "без ответа"}, ensure_ascii=False) + "\n")
    with pytest.raises(DataError, match=r"qa\.jsonl:5: no value for \{answer\} in template .*\(given: question\)"):
        read_examples(path, "Q: {question}\nA: {answer}")
    with pytest.raises(UsageError, match=r"unknown field\(s\) \{answr\}; allowed: \{answer\}, \{question\}"):
        read_examples(path, "Q: {question}\nA: {answr}")  # a field no row has: the template's typo


def test_non_utf8_text_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "cp1251.txt"
    path.write_bytes("Привет".encode() + b"\n\n" + "Мир".encode("cp1251"))
    offset = len("Привет".encode()) + 2
    with pytest.raises(DataError, match=rf"cp1251\.txt: not UTF-8 text at byte offset {offset} \(byte 0xcc\)"):
        read_examples(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_data_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="holds no text"):
        read_examples(path)


def test_bad_templates_and_formats_are_usage_errors(tmp_path):
    qa = qa_jsonl(tmp_path / "qa.jsonl", rows=2)
    with pytest.raises(UsageError, match="has no field"):
        read_examples(qa, "no fields here")
    with pytest.raises(UsageError, match="malformed"):
        read_examples(qa, "Q: {question")
    with pytest.raises(UsageError, match="need a .jsonl file"):
        read_examples(poems_txt(tmp_path / "p.txt"), None, LossOn.answer)
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "missing.txt")


def test_block_size_is_checked_against_the_context():
    assert resolve_block_size(None, 2048) == 1024
    assert resolve_block_size(None, 512) == 512
    with pytest.raises(UsageError, match="block_size=100 is over the model's context of 64 tokens"):
        resolve_block_size(100, 64)


def test_settings_validate_and_rebuild_their_command(tmp_path):
    settings = FinetuneSettings(data=tmp_path / "d.txt", out=tmp_path / "o", method="lora", lora_targets=["c_attn"],
                                max_steps=5, merge=True)
    assert settings.lr == 2e-4
    command = settings.to_command()
    assert "--method lora" in command and "--merge" in command and "--lr" not in command
    for bad, needle in [({"method": "qlora"}, "method='qlora' is not allowed; use one of full, lora"),
                        ({"batch_size": 0}, "batch_size=0"), ({"merge": True}, "merge applies to --method lora"),
                        ({"resume": True, "overwrite": True}, "not both")]:
        with pytest.raises(UsageError, match=needle):
            FinetuneSettings(data=tmp_path / "d.txt", out=tmp_path / "o", **bad)
