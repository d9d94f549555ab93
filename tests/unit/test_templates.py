"""The one template rule: {name} fields, {{ and }} literal braces, for classify, recommend and fine-tune alike."""

import pytest

from rugpt.errors import UsageError
from rugpt.templates import Template


def test_fields_literal_braces_and_filling():
    template = Template("JSON: {{\"q\": \"{question}\"}} → {answer}")
    assert template.fields == ["question", "answer"]
    assert template.fill({"question": "Кто?", "answer": "Пушкин"}) == 'JSON: {"q": "Кто?"} → Пушкин'


@pytest.mark.parametrize("text, needle", [
    ("{", "malformed"), ("}", "malformed"), ("{0}", "plain names"), ("{text!r}", "plain names"),
    ("{text:>5}", "plain names"), ("{a b}", "plain names"),
])
def test_malformed_templates_are_refused_when_made(text, needle):
    with pytest.raises(UsageError, match=needle):
        Template(text)


def test_required_and_allowed_fields():
    Template("{text} {label}").require({"text"}, {"text", "label"})
    with pytest.raises(UsageError, match=r"lacks \{text\}"):
        Template("{label}").require({"text"})
    with pytest.raises(UsageError, match=r"unknown field\(s\) \{txt\}; allowed: \{label\}, \{text\}"):
        Template("{txt}").require(set(), {"text", "label"})


def test_a_missing_value_names_the_field_and_what_was_given():
    with pytest.raises(UsageError, match=r"row 3: no value for \{answer\}.*given: question"):
        Template("{question} {answer}").fill({"question": "?"}, where="row 3")


def test_split_at_a_field_fills_the_rest():
    assert Template("{text} — {label}. {{ok}}").split_at("label", {"text": "Мороз"}) == ("Мороз — ", ". {ok}")
    with pytest.raises(UsageError, match="more than once"):
        Template("{label} {label}").split_at("label", {})


def test_classify_and_recommend_follow_the_same_rule(tiny):
    from rugpt.apps.recommender import RecommenderSettings
    from rugpt.classification import ClassifierSettings

    settings = ClassifierSettings(template="{{{text}}} настроение: {label}", labels=("хорошее", "плохое"))
    context, target = settings.candidates("день")[0]
    assert context == "{день} настроение:" and target == " хорошее"
    seed = RecommenderSettings(seed_template="{domain} {{жанр}}: {items}").build_seed(["Брат"])
    assert seed == "фильмы {жанр}: «Брат»«"


def test_fine_tuning_data_follows_the_rule_classify_follows(tmp_path):
    import json

    from rugpt.classification import ClassifierSettings, LabeledText
    from rugpt.errors import DataError
    from rugpt.training.data import read_examples
    from rugpt.training.settings import LossOn

    def jsonl(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    def error_text(call, *args, **kwargs):
        with pytest.raises((UsageError, DataError)) as caught:
            call(*args, **kwargs)
        return str(caught.value)

    labels = ("хорошее", "плохое")
    template = "{{{text}}} настроение: {label}"  # literal braces around a field
    (example,) = read_examples(jsonl("one.jsonl", [{"text": "день", "label": "хорошее"}]), template, LossOn.answer)
    shot = ClassifierSettings(template=template, labels=labels).render(LabeledText("день", "хорошее"))
    assert example.text == shot == "{день} настроение: хорошее"
    assert example.answer_start == len("{день} настроение: ")

    # a value missing from one row: the one renderer's message, with the file and line in front
    rows = jsonl("rows.jsonl", [{"text": "день", "label": "хорошее"}, {"text": "ночь", "label": None}])
    missing = error_text(read_examples, rows, template)
    assert missing == error_text(Template(template).fill, {"text": "ночь"}, where=f"{rows}:2")
    assert missing == f"{rows}:2: no value for {{label}} in template {template!r} (given: text)"

    # a field nothing provides, and malformed fields: word for word what classify says
    for bad in ("{text} {mood}: {label}", "{text!r} {label}", "{0} {text} {label}", "{text} {label"):
        said = error_text(ClassifierSettings, template=bad, labels=labels)
        assert error_text(read_examples, rows, bad) == said
    assert said == "template '{text} {label' is malformed (expected '}' before end of string): " + SYNTAX_TEXT
    assert error_text(read_examples, rows, "{text} {mood}: {label}") == (
        "template '{text} {mood}: {label}' has unknown field(s) {mood}; allowed: {label}, {text}")


SYNTAX_TEXT = "write fields as {name} and literal braces as {{ and }}"
