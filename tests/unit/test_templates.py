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
