import pytest
from transformers import AutoTokenizer

from rugpt.errors import UsageError
from rugpt.models import BUNDLED_DIR
from rugpt.prompts.prompt_format import PROMPT_TOKEN, MissingFieldError, PromptFormat

P = PROMPT_TOKEN


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    tok.add_tokens([P])
    return tok


def test_issue_example_formats_keyword_fields(tokenizer):
    f = PromptFormat("<P*4>{passage}<P*4>{question}<P*4>", tokenizer=tokenizer)
    text = f(passage="Земля круглая.", question="Круглая ли Земля?")
    assert text == P * 4 + "Земля круглая." + P * 4 + "Круглая ли Земля?" + P * 4
    assert f.prompt_length == 12
    assert f.fields == ("passage", "question")


def test_dict_batch_and_ranges_point_at_the_values(tokenizer):
    f = PromptFormat("<P>Вопрос: {question}\n<P*2>{answer}", tokenizer=tokenizer)
    items = [{"question": "Где?", "answer": "Там"}, {"question": "Кто {он}?", "answer": "Я"}]
    texts, ranges = f(items, return_ranges=True)
    assert texts[1] == P + "Вопрос: Кто {он}?\n" + P * 2 + "Я"
    for text, span, item in zip(texts, ranges, items, strict=True):
        assert text[span["question"]] == item["question"]
        assert text[span["answer"]] == item["answer"]
    assert f(items[0]) == texts[0]


def test_literal_braces_and_unicode_field_names(tokenizer):
    f = PromptFormat("{{json}} <P*2>{вопрос}", tokenizer=tokenizer)
    assert f(вопрос="да") == "{json} " + P * 2 + "да"


def test_text_slot_counts_tokens_and_records_their_ids(tokenizer):
    f = PromptFormat("<P>Ответь на вопрос:</P>{question}<P*2>")
    with pytest.raises(UsageError, match="initialize"):
        f(question="?")
    f.initialize(tokenizer)
    ids = tokenizer("Ответь на вопрос:", add_special_tokens=False)["input_ids"]
    assert f.prompt_length == len(ids) + 2
    assert f.init_tokens == dict(enumerate(ids))
    assert f(question="Где?") == P * len(ids) + "Где?" + P * 2


def test_missing_field_is_a_key_error_naming_it(tokenizer):
    f = PromptFormat("<P*2>{passage}<P>{question}", tokenizer=tokenizer)
    with pytest.raises(KeyError) as info:
        f(passage="текст")
    assert isinstance(info.value, MissingFieldError)
    assert "'question'" in str(info.value) and "passage" in str(info.value)
    with pytest.raises(MissingFieldError, match="item 1"):
        f([{"passage": "a", "question": "b"}, {"passage": "a"}])


@pytest.mark.parametrize(("template", "position"), [
    ("<P*0>{x}", 0), ("{x}<P*x>", 3), ("ab<P*3{x}", 2), ("{x}</P>", 3), ("<P></P>{x}", 0), ("<P>{1abc}", 3),
    ("<P>}", 3),
])
def test_malformed_slot_or_field_names_its_position(template, position):
    with pytest.raises(ValueError, match=f"position {position}"):
        PromptFormat(template)


@pytest.mark.parametrize("template", ["просто текст", ""])
def test_format_with_neither_slots_nor_fields_is_rejected(template):
    with pytest.raises(UsageError, match="neither trainable slots|non-empty"):
        PromptFormat(template)


def test_compiled_template_loads_back_to_the_same_format(tokenizer):
    f = PromptFormat("<P>Текст:</P> {text} {{x}}<P*3>", tokenizer=tokenizer)
    again = PromptFormat(**f.as_dict())
    assert again.prompt_length == f.prompt_length
    assert again(text="абв") == f(text="абв")


def test_field_value_holding_the_prompt_token_is_rejected(tokenizer):
    with pytest.raises(UsageError, match="prompt token"):
        PromptFormat("<P*2>{text}", tokenizer=tokenizer)(text=f"hi {P}")


def test_set_key_gives_the_prompt_its_own_token(tokenizer):
    f = PromptFormat("<P*2>{text}", tokenizer=tokenizer)
    f.set_key("qa")
    assert f(text="x") == "<|[qa]P|>" * 2 + "x"


def test_truncate_cuts_the_named_field_so_the_row_fits(tokenizer):
    f = PromptFormat("<P*3>{passage}<P*2>{question}", tokenizer=tokenizer)
    item = {"passage": "Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный. " * 4, "question": "Кто?"}
    full = len(tokenizer(f(item), add_special_tokens=False)["input_ids"])
    cut = f.truncate(item, tokenizer, max_tokens=full - 10, field="passage", reserve_tokens=2)
    assert len(tokenizer(f(cut), add_special_tokens=False)["input_ids"]) + 2 <= full - 10
    assert item["passage"].startswith(cut["passage"]) and len(cut["passage"]) < len(item["passage"])
    assert cut["question"] == "Кто?"
    with pytest.raises(UsageError, match="even with 'passage' empty"):
        f.truncate(item, tokenizer, max_tokens=4, field="passage")
    with pytest.raises(UsageError, match="not in the format"):
        f.truncate(item, tokenizer, max_tokens=50, field="answer")
