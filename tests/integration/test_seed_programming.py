"""Seed programming on the bundled model, end to end. Its weights are an interim checkpoint, so these
tests check mechanics (shapes, exit codes, determinism, invariants), never the quality of the answers."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rugpt.apps.chat import Chat, ChatSettings
from rugpt.apps.recommender import Catalogue, normalize_name, recommend
from rugpt.classification import Classifier, ClassifierSettings, LabeledText
from rugpt.cli import app
from rugpt.generation import GenerationSettings
from rugpt.scoring import Scorer, ScoreSettings

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()
POEM = "Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный — пора, красавица, проснись."


def run(*args: str):
    return runner.invoke(app, list(args))


def test_score_long_text_with_windows_and_cli_agrees(bundled):
    scorer = Scorer(bundled)
    long_text = (POEM + " ") * 30
    n_tokens = len(bundled.tokenizer(long_text)["input_ids"])
    assert n_tokens + 1 > bundled.context_length
    result = scorer.score([long_text, POEM], ScoreSettings(batch_size=4))
    assert result[0].num_tokens == n_tokens and result[0].windows > 1
    alone = scorer.score([POEM], ScoreSettings(batch_size=1))[0]
    assert result[1].log_likelihood == pytest.approx(alone.log_likelihood, abs=1e-3)
    cli = run("score", POEM, "--json")
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)[0]["perplexity"] == pytest.approx(alone.perplexity, rel=1e-4)


def test_classify_eval_on_the_example_set():
    result = run("classify", "--eval", str(EXAMPLES / "sentiment_ru.jsonl"), "-t", "{text}\\nНастроение:",
                 "-l", "хорошее", "-l", "плохое", "--calibrate", "N/A", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["count"] == 10 and sum(map(sum, report["confusion"])) == 10
    assert [report["per_label"][k]["support"] for k in ("хорошее", "плохое")] == [5, 5]
    assert report["accuracy"] == pytest.approx(sum(report["confusion"][i][i] for i in range(2)) / 10)


def test_few_shot_and_calibrated_classification(bundled):
    templates = {"весёлый": "Весёлый твит: {text} )))", "грустный": "Грустный твит: {text}((("}
    shots = (LabeledText("Ура, каникулы!", "весёлый"), LabeledText("Опять дождь", "грустный"))
    classifier = Classifier(bundled, ClassifierSettings(templates=templates, examples=shots, calibrate="N/A"))
    predictions = classifier.classify(["Сегодня праздник", "N/A"])
    assert all(p.label in templates and sum(p.probabilities.values()) == pytest.approx(1) for p in predictions)
    assert predictions[1].probabilities == pytest.approx({"весёлый": 0.5, "грустный": 0.5})


def test_chat_is_repeatable_and_once_works():
    settings = ChatSettings(persona="Бот отвечает кратко.", generation=GenerationSettings(max_new_tokens=20, seed=0))
    replies = [Chat(None, settings).send("Привет! Что ты любишь читать?") for _ in range(2)]
    assert replies[0] == replies[1]
    assert "Пользователь:" not in replies[0] and "Бот:" not in replies[0]
    once = run("chat", "--once", "Привет! Что ты любишь читать?", "--persona", "Бот отвечает кратко.",
               "--max-new-tokens", "20", "--seed", "0", "--json")
    assert once.exit_code == 0, once.output
    assert json.loads(once.stdout)["reply"] == replies[0]


def test_recommender_on_the_shipped_catalogue(bundled):
    liked = ["Брат", "Бумер", "Брат 2"]
    first = recommend(liked, bundled, catalogue="films_ru", seed=0, samples=12, max_new_tokens=24)
    again = recommend(liked, bundled, catalogue="films_ru", seed=0, samples=12, max_new_tokens=24)
    assert first == again and len(first.samples) == 12
    titles = {normalize_name(item.title) for item in Catalogue.load("films_ru").items}
    votes = [item.votes for item in first.items]
    assert votes == sorted(votes, reverse=True) and all(1 <= v <= 12 for v in votes)
    assert all(normalize_name(i.title) in titles and i.title not in liked for i in first.items)
    report = run("recommend", "--eval", str(EXAMPLES / "users_films.jsonl"), "--catalogue", "films_ru",
                 "--samples", "4", "--max-new-tokens", "16", "--seed", "0", "--json")
    assert report.exit_code == 0, report.output
    payload = json.loads(report.stdout)
    assert payload["users"] == 8 and 0 <= payload["hit_rate"] <= 1 and 0 <= payload["coverage"] <= 1


@pytest.mark.parametrize("args, needle", [
    (("classify", "Текст", "-t", "{text}:"), "needs at least 2 labels"),
    (("classify", "Текст", "-t", "Без текста", "-l", "а", "-l", "б"), "lacks {text}"),
    (("classify", "-t", "{text}", "-l", "а", "-l", "б", "--eval", "/nonexistent/eval.jsonl"), "cannot read"),
    (("score", "--jsonl", "{bad}"), "bad.jsonl:3: invalid JSON"),
    (("score", " "), "text #1 is empty"),
    (("recommend", "Брат", "--catalogue", "{bad}"), "the header must have a 'title'"),
    (("chat", "--once", ""), "message is empty"),
])
def test_bad_input_exits_2_with_one_clear_line(tmp_path, args, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "раз"}\n\n{"text": два}\n', encoding="utf-8")
    result = run(*(str(bad) if a == "{bad}" else a for a in args))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
