import json
from contextlib import contextmanager

import pytest
import torch
from typer.testing import CliRunner

from rugpt.classification import (
    Classifier,
    ClassifierSettings,
    LabeledText,
    evaluation_metrics,
    read_labeled,
    softmax,
)
from rugpt.cli import app
from rugpt.errors import DataError, UsageError
from rugpt.scoring import Scorer

TEMPLATE = "Вопрос: {text}\nОтвет:"
TEXTS = ["Снег белый?", "Трава синяя?", "Мороз и солнце?"]
runner = CliRunner()


@contextmanager
def favour(loaded, word: str, amount: float = 30.0):
    """Add `amount` to the logit of `word`'s (single) token at every position, so that label must win."""
    (token,) = loaded.tokenizer(word, add_special_tokens=False)["input_ids"]
    bias = torch.zeros(loaded.model.config.vocab_size)
    bias[token] = amount
    handle = loaded.model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    try:
        yield
    finally:
        handle.remove()


def manual_sum(loaded, context: str, target: str) -> float:
    tokenizer = loaded.tokenizer
    context_ids = [tokenizer.eos_token_id, *tokenizer(context, add_special_tokens=False)["input_ids"]]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = context_ids + target_ids
    with torch.no_grad():
        logprobs = loaded.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[p - 1, ids[p]]) for p in range(len(context_ids), len(ids)))


def yes_no(**overrides) -> ClassifierSettings:
    return ClassifierSettings(**({"labels": ("да", "нет"), "template": TEMPLATE} | overrides))


@pytest.mark.parametrize("winner", ["да", "нет"])
def test_a_biased_lm_head_decides_the_label(tiny, winner):
    classifier = Classifier(tiny, yes_no())
    with favour(tiny, " " + winner):
        predictions = classifier.classify(TEXTS)
    assert [p.label for p in predictions] == [winner] * len(TEXTS)
    assert all(p.probabilities[winner] > 0.99 for p in predictions)


def test_scores_are_label_log_likelihoods_and_probabilities_their_softmax(tiny):
    prediction = Classifier(tiny, yes_no()).classify(TEXTS[:1])[0]
    context = TEMPLATE.replace("{text}", TEXTS[0])
    for label in ("да", "нет"):
        assert prediction.scores[label] == pytest.approx(manual_sum(tiny, context, " " + label), abs=1e-4)
    expected = softmax(list(prediction.scores.values()))
    assert list(prediction.probabilities.values()) == pytest.approx(expected)
    assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)


def test_mean_normalisation_divides_by_the_label_length(tiny):
    labels = ("хорошее", "плохое")  # one token and two tokens
    lengths = {label: len(tiny.tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in labels}
    assert lengths == {"хорошее": 1, "плохое": 2}
    total = Classifier(tiny, yes_no(labels=labels)).classify(TEXTS[:1])[0]
    mean = Classifier(tiny, yes_no(labels=labels, normalize="mean")).classify(TEXTS[:1])[0]
    for label in labels:
        assert mean.scores[label] == pytest.approx(total.scores[label] / lengths[label])


def test_one_template_per_label_scores_each_whole_filled_template(tiny):
    templates = {"весёлый": "Весёлый твит: {text} )))", "грустный": "Грустный твит: {text}((("}
    prediction = Classifier(tiny, ClassifierSettings(templates=templates)).classify(["Иду гулять"])[0]
    scorer = Scorer(tiny)
    for label, template in templates.items():
        full = scorer.score([template.replace("{text}", "Иду гулять")])[0]
        assert prediction.scores[label] == pytest.approx(full.log_likelihood, abs=1e-4)


def test_calibration_divides_out_the_content_free_bias(tiny):
    calibrated = Classifier(tiny, yes_no(calibrate="N/A"))
    assert calibrated.classify(["N/A"])[0].probabilities == pytest.approx({"да": 0.5, "нет": 0.5})
    plain = Classifier(tiny, yes_no())
    content_free = plain.classify(["N/A"])[0].scores
    text = plain.classify(TEXTS[:1])[0].scores
    expected = softmax([text[k] - content_free[k] for k in ("да", "нет")])
    assert list(calibrated.classify(TEXTS[:1])[0].probabilities.values()) == pytest.approx(expected)


def test_candidates_put_the_space_with_the_label_and_prepend_few_shot_examples():
    settings = ClassifierSettings(labels=("хорошо", "плохо"), template="Отзыв: {text}\nОценка: {label}.",
                                  examples=(LabeledText("Супер", "хорошо"), LabeledText("Скука", "плохо")))
    shots = "Отзыв: Супер\nОценка: хорошо.\nОтзыв: Скука\nОценка: плохо.\n"
    assert settings.candidates("Ну такое") == [
        (shots + "Отзыв: Ну такое\nОценка:", " хорошо."),
        (shots + "Отзыв: Ну такое\nОценка:", " плохо."),
    ]
    no_placeholder = ClassifierSettings(labels=("да", "нет"), template="{text}\nОтвет:")
    assert no_placeholder.candidates("Вопрос")[0] == ("Вопрос\nОтвет:", " да")
    after_newline = ClassifierSettings(labels=("да", "нет"), template="{text}\n")
    assert after_newline.candidates("Вопрос")[1] == ("Вопрос\n", "нет")
    per_label = ClassifierSettings(templates={"а": "А: {text}", "б": "Б: {text}"}, examples=(LabeledText("x", "б"),))
    assert per_label.candidates("y") == [("Б: x\n", "А: y"), ("Б: x\n", "Б: y")]


def test_evaluation_metrics_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "b", "a", "b", "b", "a"]
    report = evaluation_metrics(gold, predicted, ("a", "b", "c"))
    assert report.accuracy == pytest.approx(4 / 6) and report.count == 6
    assert report.confusion == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    a, b, c = (report.per_label[k] for k in "abc")
    assert (a.precision, a.recall, a.support) == pytest.approx((2 / 3, 2 / 3, 3))
    assert (b.precision, b.recall, b.f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 1)
    with pytest.raises(UsageError, match=r"gold label\(s\) \['d'\]"):
        evaluation_metrics(["d"], ["a"], ("a", "b"))


def test_evaluate_with_a_biased_model(tiny):
    items = [LabeledText(t, label) for t, label in zip(TEXTS, ["да", "нет", "да"], strict=True)]
    with favour(tiny, " да"):
        report = Classifier(tiny, yes_no()).evaluate(items)
    assert report.accuracy == pytest.approx(2 / 3)
    assert report.confusion == [[2, 0], [1, 0]]
    assert report.per_label["да"].recall == 1.0 and report.per_label["нет"].recall == 0.0


@pytest.mark.parametrize("settings, needle", [
    (dict(labels=(), template=TEMPLATE), "needs at least 2 labels"),
    (dict(labels=("да",), template=TEMPLATE), "needs at least 2 labels"),
    (dict(labels=("да", "да"), template=TEMPLATE), "duplicates"),
    (dict(labels=("да", " "), template=TEMPLATE), "is empty"),
    (dict(labels=("да", "нет"), template="Вопрос без места для текста"), "lacks {text}"),
    (dict(labels=("да", "нет"), template="{text} {label} {label}"), "more than once"),
    (dict(labels=("да", "нет")), "no template"),
    (dict(templates={"а": "{text}", "б": "{text}!"}, template=TEMPLATE), "not both"),
    (dict(templates={"а": "{text}", "б": "без текста"}), "template of label 'б': template .* lacks {text}"),
    (dict(templates={"а": "{text}"}), "needs at least 2"),
    (dict(labels=("да", "нет"), template=TEMPLATE, normalize="max"), "normalize='max'"),
    (dict(labels=("да", "нет"), template=TEMPLATE, calibrate=" "), "calibrate"),
    (dict(labels=("да", "нет"), template=TEMPLATE, examples=(LabeledText("x", "может"),)), "'может' is not one of"),
])
def test_invalid_settings_are_usage_errors(settings, needle):
    with pytest.raises(UsageError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        ClassifierSettings(**settings)


def test_empty_text_is_an_error(tiny):
    with pytest.raises(UsageError, match="text #2 is empty"):
        Classifier(tiny, yes_no()).classify(["Да?", ""])


def test_read_labeled_names_the_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "а", "label": "да"}\n{"text": "б", "label": "может"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"eval.jsonl:2: label 'может' is not one of \['да', 'нет'\]"):
        read_labeled(path, ("да", "нет"))
    path.write_text('{"text": "а", "label": "да"}\n\n{"text": "б"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="eval.jsonl:3: no field 'label'"):
        read_labeled(path, ("да", "нет"))


def run(*args: str):
    return runner.invoke(app, list(args))


def test_cli_classify_json_and_eval(tiny_model_dir, tmp_path):
    model = ("--model", str(tiny_model_dir))
    task = ("-t", "Вопрос: {text}\\nОтвет:", "-l", "да", "-l", "нет")
    result = run("classify", *TEXTS[:2], *task, *model, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["text"] for r in rows] == TEXTS[:2]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0) for r in rows)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n"
                            for t, label in zip(TEXTS, ["да", "нет", "да"], strict=True)), encoding="utf-8")
    report = run("classify", "--eval", str(data), *task, *model, "--examples", str(data), "--json")
    assert report.exit_code == 0, report.output
    payload = json.loads(report.stdout)
    assert payload["count"] == 3 and sum(map(sum, payload["confusion"])) == 3
    table = run("classify", "--eval", str(data), *task, *model, "--calibrate", "N/A")
    assert table.exit_code == 0 and "accuracy" in table.stdout and "gold \\ predicted" in table.stdout


@pytest.mark.parametrize("args, needle", [
    (("Текст", "-t", "{text} ответ:"), "needs at least 2 labels"),
    (("Текст", "-t", "Без места", "-l", "да", "-l", "нет"), "lacks {text}"),
    (("Текст", "--label-template", "плохо"), "must look like LABEL=TEMPLATE"),
    (("", "-t", "{text}", "-l", "да", "-l", "нет"), "text #1 is empty"),
    (("Текст", "-t", "{text}", "-l", "да", "-l", "нет", "--examples", "/nonexistent.jsonl"), "cannot read"),
    (("-t", "{text}", "-l", "да", "-l", "нет", "--eval", "{bad}"), "bad.jsonl:2: invalid JSON"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, args, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "а", "label": "да"}\n{"text": "б", label}\n', encoding="utf-8")
    args = tuple(str(bad) if a == "{bad}" else a for a in args)
    result = run("classify", *args, "--model", str(tiny_model_dir))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
