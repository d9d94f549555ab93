"""JSON held to a schema while decoding (rugpt.grammar, llguidance): valid output, clear errors, and rows without a
grammar untouched by the rows with one in their batch."""

import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from rugpt.decoding import RowSettings, advance, start_row  # noqa: E402
from rugpt.engines import create_engine  # noqa: E402
from rugpt.grammar import GrammarError, JsonGrammar  # noqa: E402
from rugpt.sampling import SamplingParams  # noqa: E402

# Every property required and no others: the grammar fixes the keys, the model picks the values.
MOOD = {"type": "object", "additionalProperties": False, "required": ["mood", "level", "sure", "tags"],
        "properties": {"mood": {"enum": ["рад", "грустен", "зол"]},
                       "level": {"type": "integer", "minimum": 0, "maximum": 9},
                       "sure": {"type": "boolean"},
                       "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}}}}
PROMPT = "Настроение в JSON:"


def decode(engine, tokenizer, rows: list[tuple[RowSettings, int]]) -> list:
    """Decode rows (settings, seed) together on `engine` until all finish; the rows, in order."""
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    started = [start_row(engine, tokenizer, ids, settings, seed) for settings, seed in rows]
    active = list(started)
    while active:
        for outcome in advance(engine, active):
            assert not isinstance(outcome, Exception), outcome
        active = [row for row in active if row.finish_reason is None]
    for row in started:
        engine.release(row.engine_row)
    return started


@pytest.fixture(scope="module")
def mood(tiny):
    return JsonGrammar(tiny.tokenizer, MOOD, strict=True)


@pytest.mark.parametrize("seed", range(4))
def test_output_finished_by_the_grammar_parses_and_validates(tiny, mood, seed):
    engine = create_engine(tiny, "fast", max_rows=1)
    settings = RowSettings(SamplingParams(temperature=1.5), max_new_tokens=60, grammar=mood)
    [row] = decode(engine, tiny.tokenizer, [(settings, seed)])
    assert row.finish_reason == "stop", row.text
    jsonschema.validate(json.loads(row.text), MOOD)


def test_running_out_of_tokens_is_length_with_the_json_cut_short(tiny, mood):
    engine = create_engine(tiny, "fast", max_rows=1)
    [row] = decode(engine, tiny.tokenizer, [(RowSettings(SamplingParams(), max_new_tokens=3, grammar=mood), 0)])
    assert row.finish_reason == "length" and len(row.ids) == 3 and row.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(row.text)


def test_any_json_object_for_json_object_mode(tiny):
    grammar = JsonGrammar.from_response_format(tiny.tokenizer, "json_object")
    engine = create_engine(tiny, "fast", max_rows=1)
    [row] = decode(engine, tiny.tokenizer, [(RowSettings(SamplingParams(), max_new_tokens=8, grammar=grammar), 1)])
    assert row.text.startswith("{")


def test_rows_without_a_grammar_decode_as_alone_beside_rows_with_one(tiny, mood):
    sampled = RowSettings(SamplingParams(temperature=1.2), max_new_tokens=20)
    constrained = RowSettings(SamplingParams(temperature=1.2), max_new_tokens=20, grammar=mood)
    alone = decode(create_engine(tiny, "fast", max_rows=4), tiny.tokenizer, [(sampled, 1), (sampled, 2)])
    mixed = decode(create_engine(tiny, "fast", max_rows=4), tiny.tokenizer,
                   [(constrained, 11), (sampled, 1), (constrained, 12), (sampled, 2)])
    assert [mixed[1].ids, mixed[3].ids] == [alone[0].ids, alone[1].ids]
    assert mixed[1].text == alone[0].text and mixed[3].text == alone[1].text
    assert all(mixed[i].text.startswith('{"mood":') for i in (0, 2))


@pytest.mark.parametrize("schema, strict, reason", [
    ({"type": "objectx"}, False, "objectx"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, False, "/nowhere"),
    ({"type": "array", "uniqueItems": True}, True, "uniqueItems"),
    ({"type": "string", "pattern": "(?=a)"}, False, "look-around"),
])
def test_a_schema_that_cannot_be_enforced_names_why(tiny, schema, strict, reason):
    with pytest.raises(GrammarError, match="JSON schema") as error:
        JsonGrammar(tiny.tokenizer, schema, strict)
    assert reason in str(error.value)


def test_outside_strict_mode_unimplemented_keywords_are_skipped(tiny):
    JsonGrammar(tiny.tokenizer, {"type": "array", "uniqueItems": True}, strict=False)
