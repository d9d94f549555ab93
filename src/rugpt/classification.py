"""Zero- and few-shot classification by label likelihood: the label whose text the model finds likeliest wins.

Two ways to pose a task:
  * one template with `{text}` plus a label set: the label is scored as the continuation, at `{label}`
    or, when the template has none, after a space at its end ("Отзыв: {text}\\nОценка: {label}");
  * one whole template per label ("Весёлый твит: {text} )))" / "Грустный твит: {text} ((("): every
    filled template is scored in full.
Calibration follows "Calibrate Before Use" (Zhao et al., 2021): label probabilities for a content-free
input such as "N/A" measure the prompt's own bias, which is divided out of every prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from rugpt.errors import DataError, UsageError
from rugpt.jsonl import iter_jsonl, string_field
from rugpt.models import LoadedModel
from rugpt.scoring import Scorer, ScoreSettings
from rugpt.templates import Template


class Normalization(str, Enum):
    """How a label's token log-probs become one score."""

    sum = "sum"  # total log-prob: the probability of the whole label text; favours short labels
    mean = "mean"  # per-token average: fairer between labels of very different lengths


@dataclass(frozen=True)
class LabeledText:
    """A text with its gold label: a few-shot example or an evaluation item."""

    text: str
    label: str


@dataclass
class ClassifierSettings:
    """The task (template and labels, or a template per label) and how to decide."""

    labels: tuple[str, ...] = field(default=(), metadata={"help": "the label set, used with `template`"})
    template: str | None = field(
        default=None, metadata={"help": "prompt with {text}; the label goes at {label}, else after a space at the end"}
    )
    templates: dict[str, str] = field(
        default_factory=dict, metadata={"help": "instead of template + labels: label → whole template with {text}"}
    )
    normalize: Normalization = field(
        default=Normalization.sum, metadata={"help": "sum (total log-prob) or mean (per token) of the label's tokens"}
    )
    calibrate: str | None = field(
        default=None, metadata={"help": "content-free input, e.g. 'N/A', whose label bias is divided out"}
    )
    examples: tuple[LabeledText, ...] = field(default=(), metadata={"help": "few-shot examples put before the text"})
    separator: str = field(default="\n", metadata={"help": "what goes between few-shot examples and the text"})
    batch_size: int = field(default=8, metadata={"help": "sequences scored together in one forward pass"})

    def __post_init__(self) -> None:
        self.labels, self.examples, self.templates = tuple(self.labels), tuple(self.examples), dict(self.templates)
        try:
            self.normalize = Normalization(self.normalize)
        except ValueError:
            allowed = ", ".join(n.value for n in Normalization)
            raise UsageError(f"normalize={self.normalize!r} is unknown; use one of {allowed}") from None
        self._check_task()
        if self.calibrate is not None and not self.calibrate.strip():
            raise UsageError("calibrate='' is empty: give a content-free input such as 'N/A'")
        if self.batch_size < 1:
            raise UsageError(f"batch_size={self.batch_size} must be >= 1")
        for example in self.examples:
            if example.label not in self.label_names:
                raise UsageError(f"few-shot example label {example.label!r} is not one of {list(self.label_names)}")

    def _check_task(self) -> None:
        if self.templates:
            if self.template is not None or self.labels:
                raise UsageError("give either templates (one per label) or template + labels, not both")
            if len(self.templates) < 2:
                raise UsageError(f"templates has {len(self.templates)} label(s); classification needs at least 2")
            for label, template in self.templates.items():
                _check_label(label)
                try:
                    Template(template).require({"text"}, {"text"})
                except UsageError as exc:
                    raise UsageError(f"template of label {label!r}: {exc}") from None
            return
        if self.template is None:
            raise UsageError("no template: give template (with {text}) and labels, or one template per label")
        fields = Template(self.template).require({"text"}, {"text", "label"}).fields
        if fields.count("label") > 1:
            raise UsageError(f"template has {{label}} more than once: {self.template!r}")
        if len(self.labels) < 2:
            raise UsageError(f"labels={list(self.labels)}: classification needs at least 2 labels")
        if len(set(self.labels)) != len(self.labels):
            raise UsageError(f"labels={list(self.labels)} has duplicates")
        for label in self.labels:
            _check_label(label)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.templates) or self.labels

    def candidates(self, text: str) -> list[tuple[str, str]]:
        """One (context, target) per label: the target's log-prob is the label's score."""
        shots = "".join(self.render(example) + self.separator for example in self.examples)
        if self.templates:
            return [(shots, Template(template).fill({"text": text})) for template in self.templates.values()]
        context, after = _split_at_label(self.template, text)
        # The space before the label belongs to the label, as in training text: " хорошо" is one word-token.
        gap = context[len(context.rstrip(" ")):]
        return [(shots + context.rstrip(" "), gap + label + after) for label in self.labels]

    def render(self, example: LabeledText) -> str:
        """A labelled example as the model sees it in the few-shot block."""
        if self.templates:
            return Template(self.templates[example.label]).fill({"text": example.text})
        before, after = _split_at_label(self.template, example.text)
        return before + example.label + after


@dataclass
class Prediction:
    """The likeliest label, every label's probability and its score before calibration."""

    text: str
    label: str
    probabilities: dict[str, float]
    scores: dict[str, float]


@dataclass
class LabelMetrics:
    """How one label fares: precision and recall of its predictions, their F1, and its gold count."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Evaluation:
    """Accuracy, per-label precision/recall and the confusion matrix (rows: gold, columns: predicted)."""

    labels: tuple[str, ...]
    accuracy: float
    per_label: dict[str, LabelMetrics]
    confusion: list[list[int]]
    count: int

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier:
    """Classifies texts by label likelihood with a loaded model; `rugpt.classify` is the one-call version."""

    def __init__(self, model: LoadedModel | str | None, settings: ClassifierSettings):
        self.settings = settings
        self.scorer = Scorer(model)
        self._bias: list[float] | None = None

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """The likeliest label of each text, with all label probabilities."""
        for number, text in enumerate(texts, start=1):
            if not text or not text.strip():
                raise UsageError(f"text #{number} is empty: nothing to classify")
        bias = self._calibration_bias()
        predictions = []
        for text, scores in zip(texts, self._label_scores(texts), strict=True):
            probabilities = softmax([s - b for s, b in zip(scores, bias, strict=True)])
            best = max(range(len(scores)), key=probabilities.__getitem__)
            names = self.settings.label_names
            predictions.append(Prediction(text, names[best], dict(zip(names, probabilities, strict=True)),
                                          dict(zip(names, scores, strict=True))))
        return predictions

    def evaluate(self, items: Sequence[LabeledText]) -> Evaluation:
        """Classify labelled items and measure the predictions against their gold labels."""
        if not items:
            raise UsageError("nothing to evaluate: the evaluation set is empty")
        predictions = self.classify([item.text for item in items])
        return evaluation_metrics([i.label for i in items], [p.label for p in predictions], self.settings.label_names)

    def _label_scores(self, texts: Sequence[str]) -> list[list[float]]:
        """[text][label] → the label's sum or mean token log-prob."""
        pairs = [pair for text in texts for pair in self.settings.candidates(text)]
        logprobs = self.scorer.target_logprobs(pairs, ScoreSettings(batch_size=self.settings.batch_size))
        reduce = sum if self.settings.normalize is Normalization.sum else (lambda lps: sum(lps) / len(lps))
        flat = [reduce(lps) for lps in logprobs]
        k = len(self.settings.label_names)
        return [flat[i : i + k] for i in range(0, len(flat), k)]

    def _calibration_bias(self) -> list[float]:
        """Log label probabilities on the content-free input (zeros without calibration); computed once."""
        if self._bias is None:
            if self.settings.calibrate is None:
                self._bias = [0.0] * len(self.settings.label_names)
            else:
                scores = self._label_scores([self.settings.calibrate])[0]
                self._bias = [math.log(p) for p in softmax(scores)]
        return self._bias


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def evaluation_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> Evaluation:
    """Accuracy, per-label precision/recall/F1 (0 where undefined) and the confusion matrix."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(gold) - set(index))
    if unknown:
        raise UsageError(f"gold label(s) {unknown} are not among the labels {list(labels)}")
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g]][index[p]] += 1
    per_label = {}
    for label, i in index.items():
        hits = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = hits / predicted_as if predicted_as else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = LabelMetrics(precision, recall, f1, support)
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return Evaluation(tuple(labels), correct / len(gold), per_label, confusion, len(gold))


def read_labeled(
    path: str | Path, labels: Sequence[str], text_field: str = "text", label_field: str = "label"
) -> list[LabeledText]:
    """Labelled texts from a JSON Lines file; a label outside `labels` is an error naming its line."""
    items = []
    for line, record in iter_jsonl(path):
        text = string_field(record, text_field, path, line)
        label = string_field(record, label_field, path, line)
        if label not in labels:
            raise DataError(f"{path}:{line}: label {label!r} is not one of {list(labels)}")
        items.append(LabeledText(text, label))
    if not items:
        raise DataError(f"{path}: no JSON objects in the file")
    return items


def classify(
    texts: str | Sequence[str], model: str | LoadedModel | None = None, **settings
) -> Prediction | list[Prediction]:
    """Classify one text (returns a Prediction) or several (a list); `settings` are ClassifierSettings fields."""
    single = isinstance(texts, str)
    predictions = Classifier(model, ClassifierSettings(**settings)).classify([texts] if single else list(texts))
    return predictions[0] if single else predictions


def _check_label(label: str) -> None:
    if not isinstance(label, str) or not label.strip():
        raise UsageError(f"label {label!r} is empty: every label needs some text")


def _split_at_label(template: str, text: str) -> tuple[str, str]:
    """The filled template before and after {label}; without one, the label goes after a space at the end."""
    parsed = Template(template)
    if "label" in parsed.fields:
        return parsed.split_at("label", {"text": text})
    filled = parsed.fill({"text": text})
    return (filled if filled.endswith((" ", "\n")) else filled + " "), ""
