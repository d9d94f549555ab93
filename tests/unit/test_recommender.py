import json

import pytest
from typer.testing import CliRunner

from rugpt.apps.recommender import (
    Catalogue,
    CatalogueItem,
    Recommender,
    RecommenderSettings,
    extract_names,
    normalize_name,
    read_users,
    recommend,
)
from rugpt.cli import app
from rugpt.errors import DataError, UsageError
from rugpt.generation import Completion, GenerationResult

runner = CliRunner()


class ScriptedGenerator:
    """Returns fixed continuations (chosen by a function of the prompt) and records what it was asked."""

    def __init__(self, script):
        self.script = script if callable(script) else (lambda prompt: script)
        self.calls = []

    def generate(self, prompt, settings=None):
        self.calls.append((prompt, settings))
        completions = [Completion(text, [], "stop") for text in self.script(prompt)]
        return GenerationResult(prompt, completions, 0, False, "scripted")


CATALOGUE = Catalogue([CatalogueItem("Брат", 1997), CatalogueItem("Брат 2", 2000), CatalogueItem("Ёлки", 2010),
                       CatalogueItem("Кин-дза-дза!", 1986), CatalogueItem("Белое солнце пустыни", 1969)])


def test_seed_lists_liked_items_in_quotes_and_opens_one():
    settings = RecommenderSettings(domain="книги")
    assert settings.build_seed(["Мастер и Маргарита", " Идиот "]) == (
        "Категория: книги.\nМне понравились: «Мастер и Маргарита», «Идиот».\nСоветую также: «")
    straight = RecommenderSettings(quotes='""', seed_template="Люблю {domain}: {items}. И ещё ")
    assert straight.build_seed(["Брат"]) == 'Люблю фильмы: "Брат". И ещё "'


def test_names_are_normalised_for_comparison():
    assert normalize_name("  «Ёлки-Палки»  ") == "елки палки"
    assert normalize_name('"Белое   солнце\tпустыни".') == "белое солнце пустыни"
    assert normalize_name("Кин-дза-дза!") == normalize_name("кин дза дза") == "кин дза дза"


def test_extract_names_finds_quoted_and_listed_items_and_skips_unclosed_ones():
    text = '«Брат», "Бумер" и “Жмурки”, а также «Недописанн'
    assert extract_names(text) == ["Брат", "Бумер", "Жмурки"]
    assert extract_names("- Остров\n2. Елена;\n* «Дурак» — да") == ["Дурак", "Остров", "Елена"]
    assert extract_names("«" + "очень длинно " * 10 + "»") == []


def test_votes_count_once_per_sample_merge_spellings_and_drop_liked():
    samples = [
        "Белое солнце пустыни», «Ёлки», «Ёлки», «Ёлки»",  # a stuck sample still votes once for Ёлки
        "елки», «Брат», «белое  солнце пустыни»",
        "Ёлки!», «Мимино»",
        "Мимино», «брат»",
    ]
    generator = ScriptedGenerator(samples)
    result = Recommender(generator).recommend(["Брат"], RecommenderSettings(samples=4, top=10, seed=3))
    assert [(r.title, r.votes) for r in result.items] == [("Ёлки", 3), ("Белое солнце пустыни", 2), ("Мимино", 2)]
    assert result.samples[0].startswith("«Белое") and result.seed.endswith("«")
    prompt, settings = generator.calls[0]
    assert prompt == result.seed
    assert (settings.num_return_sequences, settings.seed, settings.stop, settings.repetition_penalty) == (
        4, 3, ("\n",), 1.0)
    top_one = Recommender(ScriptedGenerator(samples)).recommend(["Брат"], RecommenderSettings(top=1))
    assert [r.title for r in top_one.items] == ["Ёлки"]


def test_a_catalogue_keeps_known_items_matched_fuzzily_with_their_year():
    samples = ["Кин дза дза», «Неизвестный фильм», «Брат-2»", "Белое солнце пустини», «Брат 2»"]  # a typo
    result = Recommender(ScriptedGenerator(samples), CATALOGUE).recommend(["брат"])
    assert [(r.title, r.year, r.votes) for r in result.items] == [("Брат 2", 2000, 2), ("Кин-дза-дза!", 1986, 1),
                                                                  ("Белое солнце пустыни", 1969, 1)]
    strict = Recommender(ScriptedGenerator(samples), CATALOGUE).recommend(["брат"], RecommenderSettings(
        min_similarity=1.0))
    assert [r.title for r in strict.items] == ["Брат 2", "Кин-дза-дза!"]


def test_evaluate_reports_hit_rate_and_catalogue_coverage():
    def script(prompt):  # the first user gets their hidden film back, the second does not
        return ["Брат 2», «Ёлки»"] if "«Брат»" in prompt else ["Ёлки»"]

    users = [["Брат", "Кин-дза-дза!", "Брат 2"], ["Белое солнце пустыни", "Кин-дза-дза!"]]
    report = Recommender(ScriptedGenerator(script), CATALOGUE).evaluate(users, RecommenderSettings(top=5))
    assert (report.users, report.k, report.hidden_per_user) == (2, 5, 1)
    assert report.hit_rate == 0.5
    assert report.distinct_recommended == 2 and report.coverage == pytest.approx(2 / 5)
    no_catalogue = Recommender(ScriptedGenerator(script)).evaluate(users, hide=1)
    assert no_catalogue.coverage is None and no_catalogue.hit_rate == 0.5
    with pytest.raises(UsageError, match="user #2 has 2 liked item"):
        Recommender(ScriptedGenerator(script)).evaluate(users, hide=2)


def test_shipped_catalogue_loads_by_name():
    films = Catalogue.load("films_ru")
    assert len(films) >= 100
    assert all(item.year and 1920 <= item.year <= 2025 for item in films.items)
    assert len({normalize_name(item.title) for item in films.items}) == len(films)
    assert films.match("Ирония судьбы или с легким паром", 0.85).year == 1975


def test_sampling_on_a_tiny_model_is_repeatable_with_a_seed(tiny):
    settings = RecommenderSettings(samples=3, max_new_tokens=8, seed=5)
    first = recommend(["Брат", "Бумер"], tiny, **vars(settings))
    second = recommend(["Брат", "Бумер"], tiny, **vars(settings))
    assert len(first.samples) == 3 and all(s.startswith("«") for s in first.samples)
    assert first == second


@pytest.mark.parametrize("settings, needle", [
    (dict(samples=0), "samples=0"), (dict(top=0), "top=0"), (dict(quotes="<>"), "quotes='<>'"),
    (dict(seed_template="без списка"), "lacks {items}"), (dict(temperature=0), "temperature=0"),
    (dict(domain=" "), "domain is empty"), (dict(min_similarity=0), "min_similarity=0"),
])
def test_invalid_settings_are_usage_errors(settings, needle):
    with pytest.raises(UsageError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        RecommenderSettings(**settings)


def test_bad_inputs(tmp_path):
    recommender = Recommender(ScriptedGenerator([]))
    with pytest.raises(UsageError, match="no liked items"):
        recommender.recommend([])
    with pytest.raises(UsageError, match="liked item #2 is empty"):
        recommender.recommend(["Брат", " "])
    with pytest.raises(DataError, match="cannot read catalogue 'nope'.*films_ru"):
        Catalogue.load("nope")
    csv = tmp_path / "c.csv"
    csv.write_text("name,year\nБрат,1997\n", encoding="utf-8")
    with pytest.raises(DataError, match="c.csv:1: the header must have a 'title'"):
        Catalogue.load(csv)
    csv.write_text("title,year\nБрат,1997\nБрат 2,двухтысячный\n", encoding="utf-8")
    with pytest.raises(DataError, match="c.csv:3: year 'двухтысячный'"):
        Catalogue.load(csv)
    users = tmp_path / "users.jsonl"
    users.write_text('{"liked": ["Брат"]}\n{"liked": "Брат"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="users.jsonl:2: field 'liked' must be a non-empty list"):
        read_users(users)


def test_cli_recommend(tiny_model_dir):
    args = ("recommend", "Брат", "Бумер", "--model", str(tiny_model_dir), "--samples", "2", "--max-new-tokens", "6",
            "--seed", "1", "--catalogue", "films_ru", "--json")
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["samples"]) == 2 and payload["seed"].endswith("«")
    missing = runner.invoke(app, ["recommend", "--model", str(tiny_model_dir)])
    assert missing.exit_code == 2 and "no liked items" in missing.stderr
    bad = runner.invoke(app, ["recommend", "Брат", "--catalogue", "/nonexistent.csv"])
    assert bad.exit_code == 2 and "cannot read catalogue" in bad.stderr
