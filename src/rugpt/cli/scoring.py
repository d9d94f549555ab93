"""Seed programming over texts: `rugpt score` and `rugpt classify`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from rugpt.cli.app import ModelOpt, command, out, read_text_arg, unescape
from rugpt.cli.options import FromSettings, Opt
from rugpt.errors import UsageError


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _read_texts(texts: list[str] | None, file: Path | None, jsonl: Path | None, field: str, lines: bool) -> list[str]:
    """Texts from arguments, a file or stdin (one text, or one per line with --lines), or a JSONL field."""
    from rugpt.jsonl import read_field

    if texts and texts != ["-"] and (file is not None or jsonl is not None):
        raise UsageError("give texts as arguments or with --file / --jsonl, not both")
    if jsonl is not None:
        return read_field(jsonl, field)
    if texts and texts != ["-"]:
        return texts
    raw = read_text_arg(None, file, "text")
    return [line for line in raw.splitlines() if line.strip()] if lines else [raw]


SCORE = FromSettings("rugpt.scoring:ScoreSettings", opts={
    "prepend_bos": Opt("--bos/--no-bos"), "token_details": Opt("--tokens/--no-tokens")})
CLASSIFIER = FromSettings("rugpt.classification:ClassifierSettings", exclude=("templates", "examples"), opts={
    "template": Opt("--template", "-t", help="; \\n stands for a newline", convert=unescape),
    "labels": Opt("--label", "-l"), "separator": Opt(help="; \\n stands for a newline", convert=unescape)})


TextsArg = Annotated[Optional[list[str]], typer.Argument(help="texts ('-' or none: read stdin)")]


FileOpt = Annotated[Optional[Path], typer.Option("--file", "-f", help="read one text from this file")]


LinesOpt = Annotated[bool, typer.Option("--lines", help="one text per non-empty line of the file or stdin")]


JsonlOpt = Annotated[Optional[Path], typer.Option("--jsonl", help="read texts from a JSON Lines file")]


FieldOpt = Annotated[str, typer.Option("--field", help="the JSONL field that holds the text")]


@command
def score(
    texts: TextsArg = None, file: FileOpt = None, lines: LinesOpt = False, jsonl: JsonlOpt = None,
    text_field: FieldOpt = "text", model: ModelOpt = None, given: Annotated[dict, SCORE] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Log-likelihood, mean token loss and perplexity of texts; long texts are scored with a sliding window."""
    from rugpt.scoring import Scorer, ScoreSettings

    settings = ScoreSettings(**given)
    inputs = _read_texts(texts, file, jsonl, text_field, lines)  # bad input fails before the model loads
    results = Scorer(model).score(inputs, settings)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], ensure_ascii=False))
        return
    table = Table("#", "tokens", "log-likelihood", "mean loss", "perplexity", "windows", "text")
    for i, r in enumerate(results, start=1):
        table.add_row(str(i), str(r.num_tokens), f"{r.log_likelihood:.2f}", f"{r.mean_loss:.4f}",
                      f"{r.perplexity:.2f}", str(r.windows), escape(_preview(r.text)))
    out.print(table)
    for i, r in enumerate(results, start=1):
        if r.tokens:
            per_token = Table("token", "id", "log-prob", title=f"text #{i}")
            for t in r.tokens:
                per_token.add_row(escape(repr(t.token)[1:-1]), str(t.id), f"{t.logprob:.3f}")
            out.print(per_token)


@command
def classify(
    texts: TextsArg = None, file: FileOpt = None, lines: LinesOpt = False, jsonl: JsonlOpt = None,
    text_field: FieldOpt = "text", model: ModelOpt = None,
    given: Annotated[dict, CLASSIFIER] = None,
    label_template: Annotated[Optional[list[str]], typer.Option(
        help="LABEL=TEMPLATE, one per label (repeatable), instead of --template and --label")] = None,
    examples: Annotated[Optional[Path], typer.Option(help="few-shot examples: JSONL with text and label")] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="JSONL with text and gold label: print "
                                                      "accuracy, per-label precision/recall, confusion matrix")] = None,
    label_field: Annotated[str, typer.Option(help="the JSONL field that holds the label")] = "label",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Zero/few-shot classification: the label whose text the model finds likeliest wins."""
    from rugpt.classification import Classifier, ClassifierSettings, read_labeled

    templates = {}
    for item in label_template or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--label-template {item!r} must look like LABEL=TEMPLATE")
        templates[name.strip()] = unescape(text)
    settings = ClassifierSettings(templates=templates, **given)
    if examples is not None:
        shots = read_labeled(examples, settings.label_names, text_field, label_field)
        settings = dataclasses.replace(settings, examples=tuple(shots))
    if eval_file is not None:
        if texts or file or jsonl:
            raise UsageError("--eval reads its texts from the evaluation file; give no other texts")
        items = read_labeled(eval_file, settings.label_names, text_field, label_field)
        _print_evaluation(Classifier(model, settings).evaluate(items), as_json)
        return
    inputs = _read_texts(texts, file, jsonl, text_field, lines)
    predictions = Classifier(model, settings).classify(inputs)
    if as_json:
        print(json.dumps([dataclasses.asdict(p) for p in predictions], ensure_ascii=False))
        return
    table = Table("text", "label", *settings.label_names)
    for p in predictions:
        table.add_row(escape(_preview(p.text)), escape(p.label), *(f"{v:.3f}" for v in p.probabilities.values()))
    out.print(table)


def _print_evaluation(report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    out.print(f"accuracy {report.accuracy:.3f} on {report.count} texts")
    metrics = Table("label", "precision", "recall", "F1", "support")
    for name, m in report.per_label.items():
        metrics.add_row(escape(name), f"{m.precision:.3f}", f"{m.recall:.3f}", f"{m.f1:.3f}", str(m.support))
    out.print(metrics)
    confusion = Table("gold \\ predicted", *map(escape, report.labels))
    for name, row in zip(report.labels, report.confusion, strict=True):
        confusion.add_row(escape(name), *map(str, row))
    out.print(confusion)
