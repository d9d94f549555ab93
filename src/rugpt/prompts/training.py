"""Prompt tuning: train a prompt's provider on a frozen model (text2text or classification).

The jobs of ruPrompts' `ruprompts-train` (a Hydra command) in one function and `rugpt prompt-tune`: the
same format syntax, provider kinds and settings, text2text data with target and truncation fields, data
as JSONL, CSV or TSV with an optional validation file, AdamW with a linear, constant or cosine-restarts
schedule (docs/prompt_tuning.md maps each of its config options to a setting here).

Only the provider's parameters are given to the optimizer and only they require gradients, so the
model's weights stay bit-identical. Each epoch ends with held-out metrics; the best epoch's prompt is
kept, training stops early after `patience` epochs without improvement, and the folder gets the prompt,
history.json and a loss plot.

The loss, the optimizer, the learning-rate schedule and the loss plot are those of every rugpt trainer
(rugpt.training: loss, optimizers, schedule, report); only the loop and its per-epoch bookkeeping are here.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch

from rugpt.atomic import atomic_write_text
from rugpt.errors import DataError, RugptError, UsageError
from rugpt.models import LoadedModel, load
from rugpt.prompts.losses import EvalMetrics, classification_loss, evaluate, text2text_loss
from rugpt.prompts.preprocessing import ClassificationPreprocessor, Text2TextPreprocessor, pad_right, pad_token_id
from rugpt.prompts.prompt import Prompt
from rugpt.prompts.prompt_format import PromptFormat
from rugpt.prompts.prompt_provider import PROVIDERS, BasePromptProvider, ProviderInit
from rugpt.prompts.storage import SavedPrompt
from rugpt.training.optimizers import make_optimizer
from rugpt.training.report import plot_losses
from rugpt.training.schedule import scheduled_lr
from rugpt.training.settings import Optimizer, Schedule

log = logging.getLogger(__name__)


class TaskKind(str, Enum):
    text2text = "text2text"  # generate the target field's text after the formatted row
    classification = "classification"  # pick one of the label words


ProviderKind = Literal["tensor", "lstm", "mlp"]
SchedulerKind = Literal["linear", "constant", "cosine_restarts"]
SCHEDULERS = ("linear", "constant", "cosine_restarts")
# Tensor rows move freely at a large rate; the networks of LSTM/MLP providers need the usual small one.
DEFAULT_LEARNING_RATE: dict[str, float] = {"tensor": 3e-2, "lstm": 1e-3, "mlp": 1e-3}


@dataclass
class PromptTuningSettings:
    """How to tune a prompt. Each field's help text is also the CLI's --help."""

    format: str = field(metadata={"help": "prompt format, e.g. '<P*8>{question}<P*4>': <P>, <P*N>, <P>text</P>, "
                                          "{field}"})
    target_field: str = field(default="target", metadata={"help": "the field with the answer (or the label word)"})
    task: TaskKind = field(default=TaskKind.text2text, metadata={
        "help": "text2text generates the target field, classification picks a label word"})
    labels: tuple[str, ...] = field(default=(), metadata={
        "help": "classification: the label words, e.g. «Да» and «Нет» (default: the values seen in the data)"})
    provider: ProviderKind = field(default="tensor", metadata={
        "help": "what holds the prompt: a tensor of vectors, or an LSTM or MLP that makes them"})
    init: str = field(default="vocab", metadata={"help": "tensor provider: where rows start: vocab (random "
                                                         "vocabulary embeddings) | random (N(0, 1)) | random_scaled"})
    init_text: str | None = field(default=None, metadata={"help": "tensor provider: start from this text's "
                                                                   "embeddings (repeated)"})
    hidden_dim: int = field(default=-1, metadata={"help": "lstm / mlp provider: hidden size (-1: the model's)"})
    input_dim: int = field(default=-1, metadata={"help": "lstm / mlp provider: input size (-1: the model's)"})
    num_lstm_layers: int = field(default=2, metadata={"help": "lstm provider: number of LSTM layers"})
    max_tokens: int | None = field(default=None, metadata={"help": "longest sequence in tokens (default: the "
                                                                    "model's context)"})
    truncation_field: str | None = field(default=None, metadata={"help": "field cut at its end to fit max_tokens"})
    epochs: int = field(default=5, metadata={"help": "passes over the training rows"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "rows per batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    learning_rate: float | None = field(default=None, metadata={
        "help": "AdamW learning rate (default: 0.03 for tensor, 0.001 for lstm and mlp)"})
    warmup_steps: int = field(default=10, metadata={"help": "steps of linear warm-up (at most a tenth of the run)"})
    scheduler: SchedulerKind = field(default="linear", metadata={
        "help": "after warm-up: linear (decay to 0), constant or cosine_restarts"})
    restart_steps: int | None = field(default=None, metadata={
        "help": "cosine_restarts: steps of the first cycle, each next one twice as long (default: the whole run)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of rows held out when no eval data is given"})
    patience: int | None = field(default=2, metadata={"help": "stop after this many epochs without a better "
                                                               "held-out loss; 0 never stops early"})
    seed: int = field(default=0, metadata={"help": "random seed for start values, split and order"})

    def __post_init__(self) -> None:
        self.task = TaskKind(self.task) if self.task in {t.value for t in TaskKind} else self.task
        self.labels = tuple(self.labels)
        checks = [
            (isinstance(self.task, TaskKind), f"task={self.task!r} must be one of {', '.join(TaskKind)}"),
            (self.provider in PROVIDERS, f"provider={self.provider!r} must be one of {', '.join(PROVIDERS)}"),
            (self.init in {i.value for i in ProviderInit} - {"text"},
             f"init={self.init!r} must be one of vocab, random, random_scaled (or give init_text)"),
            (self.init == "vocab" or self.provider == "tensor", f"init={self.init!r} needs provider='tensor'"),
            (self.scheduler in SCHEDULERS, f"scheduler={self.scheduler!r} must be one of {', '.join(SCHEDULERS)}"),
            (self.restart_steps is None or self.restart_steps >= 1, f"restart_steps={self.restart_steps} must be >= 1"),
            (self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps={self.gradient_accumulation_steps} must be >= 1"),
            (self.epochs >= 1, f"epochs={self.epochs} must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.learning_rate is None or self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0"),
            (0 <= self.eval_fraction < 1, f"eval_fraction={self.eval_fraction} must be in [0, 1)"),
            (self.patience is None or self.patience >= 0, f"patience={self.patience} must be >= 0"),
            (self.init_text is None or self.provider == "tensor", "init_text needs provider='tensor'"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        PromptFormat(self.format)  # a malformed format fails here, before the model loads

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATE[self.provider]

    def make_provider(self) -> BasePromptProvider:
        if self.provider == "tensor":
            return PROVIDERS["tensor"](init=self.init, init_text=self.init_text)
        if self.provider == "lstm":
            return PROVIDERS["lstm"](self.hidden_dim, self.input_dim, self.num_lstm_layers)
        return PROVIDERS[self.provider](self.hidden_dim, self.input_dim)


@dataclass
class EpochReport:
    epoch: int
    steps: int
    train_loss: float
    eval: dict[str, Any] | None
    seconds: float


@dataclass
class PromptTuningResult:
    """The trained prompt (patched onto the model), per-epoch metrics and where things were saved."""

    prompt: Prompt
    epochs: list[EpochReport]
    step_losses: list[float]
    best_epoch: int
    stopped_early: bool
    initial_eval: dict[str, Any] | None = None  # held-out metrics of the untrained prompt
    saved: SavedPrompt | None = None
    plot: Path | None = None

    def heldout_losses(self) -> list[tuple[int, float]]:
        """(step, held-out loss): before training (step 0), then after each epoch."""
        before = [(0, self.initial_eval["loss"])] if self.initial_eval else []
        return before + [(e.steps, e.eval["loss"]) for e in self.epochs if e.eval]

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "stopped_early": self.stopped_early, "initial_eval": self.initial_eval,
                "epochs": [asdict(e) for e in self.epochs], "step_losses": self.step_losses,
                "saved": str(self.saved.path) if self.saved else None,
                "size_bytes": self.saved.size_bytes if self.saved else None}


@dataclass
class StepInfo:
    """What the progress callback gets after every optimizer step."""

    step: int
    total_steps: int
    epoch: int
    loss: float


def prompt_tune(data: str | Path | list[dict], settings: PromptTuningSettings,
                model: LoadedModel | str | None = None, eval_data: str | Path | list[dict] | None = None,
                out: str | Path | None = None, on_step: Callable[[StepInfo], None] | None = None,
                on_epoch: Callable[[EpochReport], None] | None = None) -> PromptTuningResult:
    """Train a prompt on `data` (a JSONL, CSV or TSV path, or a list of dicts) with a frozen `model`; save it
    to `out`.

    The model's weights never change; it stays patched with the trained prompt (the best epoch's), so it
    generates with it at once. Rows lacking a field raise DataError naming the row (its index in the file).
    """
    rows = _rows(data, "data")
    eval_rows = None if eval_data is None else _rows(eval_data, "eval data")
    loaded = model if isinstance(model, LoadedModel) else load(model)
    torch.manual_seed(settings.seed)
    prompt = Prompt(PromptFormat(settings.format), settings.make_provider())
    prompt.patch(loaded.model, loaded.tokenizer)
    preprocessor = _preprocessor(prompt, loaded, settings, rows)
    processed = _preprocess(preprocessor, rows, _name(data, "data"))
    given = None if eval_rows is None else _preprocess(preprocessor, eval_rows, _name(eval_data, "eval data"))
    train, held_out = _split(processed, given, settings)
    with _only_prompt_trains(loaded.model, prompt):
        result = _train_loop(loaded.model, prompt, train, held_out, _collate(preprocessor), settings, on_step,
                             on_epoch)
    if out is not None:
        result.saved = prompt.save_pretrained(out)
        atomic_write_text(Path(out) / "history.json", json.dumps(result.summary(), ensure_ascii=False, indent=1))
        result.plot = plot_losses(Path(out) / "loss.png", list(enumerate(result.step_losses, start=1)),
                                  result.heldout_losses(), x_label="step")
    return result


def _train_loop(model, prompt: Prompt, train: list, held_out: list, collate, settings: PromptTuningSettings,
                on_step, on_epoch) -> PromptTuningResult:
    classification = settings.task is TaskKind.classification
    loss_fn = classification_loss if classification else text2text_loss
    accumulate = settings.gradient_accumulation_steps
    batches_per_epoch = math.ceil(len(train) / settings.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
    total = min(settings.max_steps or steps_per_epoch * settings.epochs, steps_per_epoch * settings.epochs)
    optimizer = make_optimizer(prompt.provider, Optimizer.adamw, settings.lr, weight_decay=0.0)
    warmup = min(settings.warmup_steps, total // 10)  # a short run must not spend itself warming up
    factor = lr_factor(settings.scheduler, warmup, total, settings.restart_steps)
    order = torch.Generator().manual_seed(settings.seed)
    epochs, step_losses, step = [], [], 0
    best_loss, best_epoch, best_state, stale = float("inf"), 0, None, 0
    stopped_early = False
    initial = _evaluate(model, held_out, collate, settings.batch_size, classification)
    for epoch in range(1, settings.epochs + 1):
        started, epoch_losses = time.perf_counter(), []
        batches = torch.randperm(len(train), generator=order).split(settings.batch_size)
        for first in range(0, len(batches), accumulate):
            group = batches[first : first + accumulate]
            optimizer.zero_grad(set_to_none=True)
            value = 0.0
            for index in group:  # the step's loss: the mean over its batches of each batch's mean loss
                loss_sum, count = loss_fn(model, collate([train[i] for i in index.tolist()]))
                loss = loss_sum / max(count, 1) / len(group)
                loss.backward()
                value += loss.detach().item()
            torch.nn.utils.clip_grad_norm_(list(prompt.parameters()), 1.0)
            for param_group in optimizer.param_groups:
                param_group["lr"] = settings.lr * factor(step)
            optimizer.step()
            step += 1
            step_losses.append(value)
            epoch_losses.append(value)
            if on_step:
                on_step(StepInfo(step, total, epoch, value))
            if step >= total:
                break
        metrics = _evaluate(model, held_out, collate, settings.batch_size, classification)
        report = EpochReport(epoch, step, sum(epoch_losses) / len(epoch_losses),
                             metrics.as_dict() if metrics else None, time.perf_counter() - started)
        epochs.append(report)
        log.info("epoch %d: train loss %.4f, eval %s", epoch, report.train_loss, report.eval)
        if on_epoch:
            on_epoch(report)
        score = metrics.loss if metrics else report.train_loss
        if score < best_loss:
            best_loss, best_epoch, best_state, stale = score, epoch, copy.deepcopy(prompt.provider.state_dict()), 0
        else:
            stale += 1
        if step >= total:
            break
        if metrics and settings.patience and stale >= settings.patience:
            stopped_early = True
            break
    if best_state is not None:
        prompt.provider.load_state_dict(best_state)
    return PromptTuningResult(prompt, epochs, step_losses, best_epoch, stopped_early,
                              initial.as_dict() if initial else None)


def _evaluate(model, rows: list, collate, batch_size: int, classification: bool) -> EvalMetrics | None:
    if not rows:
        return None
    batches = (collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))
    return evaluate(model, batches, classification)


def lr_factor(kind: str, warmup: int, total: int, restart_steps: int | None = None) -> Callable[[int], float]:
    """The learning rate's multiplier at each step, by rugpt's one schedule (`scheduled_lr`): linear warm-up,
    then linear decay to 0 (transformers' get_linear_schedule_with_warmup), constant
    (get_constant_schedule_with_warmup), or cosine cycles of `restart_steps`, each twice the previous (torch's
    CosineAnnealingWarmRestarts with T_mult=2).

    As in ruPrompts and transformers, the peak comes at step `warmup`, after `warmup` rising steps; scheduled_lr
    counts the peak step as the last of its warm-up, hence `warmup + 1` (and the first step already learns).
    """
    shape = Schedule.cosine if kind == "cosine_restarts" else Schedule(kind)
    cycle = restart_steps or max(1, total - warmup)

    def progress(step: int) -> float:
        if kind != "cosine_restarts":
            return (step - warmup) / max(1, total - warmup)
        t, length = step - warmup, cycle
        while t >= length:
            t, length = t - length, length * 2
        return t / length

    return lambda step: scheduled_lr(1.0, step, warmup + 1, progress(step), shape)


def _collate(preprocessor) -> Callable[[list], dict[str, torch.Tensor]]:
    """Right-padded batches: rugpt's loss reads labels, so no position ids are needed for left padding."""
    if isinstance(preprocessor, ClassificationPreprocessor):
        return preprocessor.collate_fn()
    pad = pad_token_id(preprocessor.tokenizer)
    return lambda rows: pad_right(rows, pad)


@contextmanager
def _only_prompt_trains(model, prompt: Prompt) -> Iterator[None]:
    """Within the block only the prompt's parameters require gradients; the model's flags come back after."""
    own = {id(p) for p in prompt.parameters()}
    saved = [(p, p.requires_grad) for p in model.parameters() if id(p) not in own]
    was_training = model.training
    for p, _ in saved:
        p.requires_grad_(False)
    prompt.provider.requires_grad_(True)
    model.eval()  # dropout off: the frozen model adds no useful noise, and held-out losses stay comparable
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


def _rows(data: str | Path | list[dict], what: str) -> list[dict]:
    rows = read_rows(data) if isinstance(data, str | Path) else list(data)
    if not rows:
        raise DataError(f"{what} has no rows: give a JSONL file with one JSON object per line, or a CSV / TSV "
                        f"file with a header row")
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a data file by its suffix: .jsonl / .json (one JSON object per line), .csv, .tsv (a header row
    names the fields) — the files of ruPrompts' from_jsonl, from_csv and from_tsv datasets."""
    import csv

    from rugpt.jsonl import read_jsonl

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return read_jsonl(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [dict(row) for row in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {str(path)!r} as {suffix[1:].upper()}: {exc}") from None


def _name(data: str | Path | list[dict], default: str) -> str:
    return str(data) if isinstance(data, str | Path) else default


def _split(rows: list, eval_rows: list | None, settings: PromptTuningSettings) -> tuple[list, list]:
    """(train, held-out): the given eval rows, else a seeded `eval_fraction` of the rows (none when too few)."""
    if eval_rows is not None:
        return rows, eval_rows
    n_eval = round(len(rows) * settings.eval_fraction)
    if n_eval == 0 or n_eval == len(rows):
        log.warning("no held-out rows (%d rows, eval_fraction=%s): early stopping is off", len(rows),
                    settings.eval_fraction)
        return rows, []
    order = list(range(len(rows)))
    random.Random(settings.seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _preprocessor(prompt: Prompt, loaded: LoadedModel, settings: PromptTuningSettings, rows: list[dict]):
    max_tokens = settings.max_tokens or loaded.context_length
    if max_tokens > loaded.context_length:
        raise UsageError(f"max_tokens={max_tokens} exceeds the model's context of {loaded.context_length} tokens")
    if settings.task is TaskKind.text2text:
        return Text2TextPreprocessor(prompt.format, loaded.tokenizer, settings.target_field, max_tokens,
                                     settings.truncation_field)
    labels = settings.labels or tuple(sorted({str(r[settings.target_field]) for r in rows
                                              if r.get(settings.target_field) is not None}))
    return ClassificationPreprocessor(prompt.format, loaded.tokenizer, settings.target_field, labels, max_tokens,
                                      settings.truncation_field)


def _preprocess(preprocessor, rows: list[dict], what: str) -> list:
    processed = []
    for number, row in enumerate(rows, start=1):
        try:
            processed.append(preprocessor(row))
        except (RugptError, KeyError) as exc:
            raise DataError(f"{what}: row {number}: {exc}") from None
    return processed
