"""The `rugpt` command: one thin command per capability; each parses, calls one library function, prints."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rugpt.errors import RugptError, UsageError
from rugpt.training.settings import LossOn, Method, Precision, Schedule

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Russian GPT models (ruGPT-3 family) at work.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def command(func):
    """Register a command whose user errors print as one line on stderr and exit with code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RugptError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True)
            raise typer.Exit(2) from None

    return app.command(name=func.__name__.replace("_", "-"))(wrapper)


def _help(settings_cls, name: str) -> str:
    """A setting's help text, written once where the setting is defined."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(settings_cls) if f.name == name)


def read_text_arg(text: str | None, file: Path | None, what: str = "prompt") -> str:
    """Text from an argument, a file, or stdin ('-' or nothing while stdin is piped)."""
    if file is not None:
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {what} file {str(file)!r}: {exc}") from None
    if text in (None, "-"):
        if sys.stdin.isatty():
            raise UsageError(f"no {what}: give it as an argument, with --file, or on stdin")
        return sys.stdin.read()
    return text


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what happens")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="alias, hub id or folder (default: bundled)")]


@command
def models(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List known checkpoints and where each is available locally."""
    from rugpt.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    table = Table("alias", "hub id", "layers × width × heads", "params", "context", "local", "notes")
    table.columns[1].no_wrap = True
    for row in rows:
        table.add_row(row["alias"], row["hub_id"], row["shape"], row["params"], str(row["context"]),
                      row["available"], row["notes"])
    out.print(table)


@command
def tokenize(
    text: Annotated[Optional[str], typer.Argument(help="text to split ('-' for stdin)")] = None,
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show how a model's tokenizer splits a text: readable tokens and their ids."""
    from transformers import AutoTokenizer

    from rugpt.models import resolve
    from rugpt.tokenizer import describe_tokens

    source = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError:
        from rugpt.models import load

        tokenizer = load(model).tokenizer  # raises the one-sentence ModelNotFound
    views = describe_tokens(tokenizer, read_text_arg(text, None, "text"))
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(v) for v in views], ensure_ascii=False))
        return
    table = Table("#", "id", "token", "symbol")
    for i, v in enumerate(views):
        table.add_row(str(i), str(v.id), repr(v.text)[1:-1], v.symbol)
    out.print(table)
    out.print(f"{len(views)} tokens, {len(text or '')} characters")


def _settings_from_cli(preset, **fields):
    from rugpt.generation import GenerationSettings

    fields["stop"] = tuple(fields["stop"]) if fields.get("stop") else None
    return GenerationSettings.from_preset(preset, **fields)


def _gen_help(name: str) -> str:
    from rugpt.generation import GenerationSettings

    return _help(GenerationSettings, name)


@command
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="text to continue ('-' for stdin)")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="read the prompt from this file")] = None,
    model: ModelOpt = None,
    preset: Annotated[Optional[str], typer.Option(help="precise | greedy | balanced | creative")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_gen_help("max_new_tokens"))] = None,
    do_sample: Annotated[Optional[bool], typer.Option("--sample/--no-sample", help=_gen_help("do_sample"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_gen_help("temperature"))] = None,
    top_k: Annotated[Optional[int], typer.Option(help=_gen_help("top_k"))] = None,
    top_p: Annotated[Optional[float], typer.Option(help=_gen_help("top_p"))] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help=_gen_help("repetition_penalty"))] = None,
    no_repeat_ngram_size: Annotated[Optional[int], typer.Option(help=_gen_help("no_repeat_ngram_size"))] = None,
    num_beams: Annotated[Optional[int], typer.Option(help=_gen_help("num_beams"))] = None,
    num_return_sequences: Annotated[Optional[int], typer.Option("--n", help=_gen_help("num_return_sequences"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_gen_help("seed"))] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help=_gen_help("stop") + " (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (no streaming)")] = False,
    stream: Annotated[bool, typer.Option(help="print tokens as they are produced")] = True,
    prompt_tuned: Annotated[Optional[str], typer.Option(
        help="trained prompt (folder or hub id) to apply; a format with several fields takes the text as JSON")] = None,
    engine: Annotated[str, typer.Option(help="auto | transformers | fast | fast-bf16 | fast-int8 | llamacpp-q8 ...")]
    = "auto",
) -> None:
    """Continue a Russian text with the bundled model or any GPT-2-architecture checkpoint."""
    from rugpt.generation import Generator

    settings = _settings_from_cli(
        preset, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams, num_return_sequences=num_return_sequences, seed=seed, stop=stop,
    )
    text = read_text_arg(prompt, file)
    tuned = None
    if prompt_tuned is not None:
        from rugpt.prompts.prompt import Prompt

        tuned = Prompt.from_pretrained(prompt_tuned)
        model = model or tuned.config.pretrained_model_name  # the model the prompt was trained for
    generator = Generator(model, engine=engine)
    model_text = text if tuned is None else tuned.patch(generator.loaded.model, generator.loaded.tokenizer).render(text)
    can_stream = stream and not as_json and settings.num_beams == 1 and settings.num_return_sequences == 1
    if can_stream:
        generator.encode_prompt(model_text, settings.max_new_tokens)  # validate before echoing the prompt
        out.print(text, end="", style="bold")
        for piece in generator.stream(model_text, settings):
            out.print(piece, end="")
        out.print()
        return
    result = generator.generate(model_text, settings)
    if as_json:
        payload = {
            "model": generator.loaded.name, "engine": result.engine, "prompt": result.prompt,
            "prompt_tokens": result.prompt_tokens, "prompt_truncated": result.prompt_truncated,
            "settings": dataclasses.asdict(settings),
            "completions": [dataclasses.asdict(c) for c in result.completions],
        }
        print(json.dumps(payload, ensure_ascii=False))
        return
    for i, completion in enumerate(result.completions):
        if len(result.completions) > 1:
            out.rule(f"{i + 1}")
        out.print(text, end="", style="bold")
        out.print(completion.text)


def _pre_help(name: str) -> str:
    from rugpt.training.pretrain import PretrainSettings

    return _help(PretrainSettings, name)


@command
def train_tokenizer(
    corpus: Annotated[Optional[Path], typer.Option(help=_pre_help("corpus"))] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help=_pre_help("tokenizer"))] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help=_pre_help("vocab_size"))] = None,
    fortunes: Annotated[Optional[bool], typer.Option("--fortunes/--no-fortunes", help=_pre_help("fortunes"))] = None,
) -> None:
    """Train the bundled model's byte-level BPE on the training split of the corpus."""
    from rugpt.training.pretrain import PretrainSettings, train_recipe_tokenizer

    given = {"corpus": corpus, "tokenizer": out_dir, "vocab_size": vocab_size, "fortunes": fortunes}
    settings = PretrainSettings(**{k: v for k, v in given.items() if v is not None})
    size, chars_per_token = train_recipe_tokenizer(settings)
    out.print(f"tokenizer with {size} tokens in {settings.tokenizer}; held-out: {chars_per_token:.2f} chars/token")


@command
def pretrain(
    out_dir: Annotated[Optional[Path], typer.Option("--out", help=_pre_help("out"))] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help=_pre_help("tokenizer"))] = None,
    corpus: Annotated[Optional[Path], typer.Option(help=_pre_help("corpus"))] = None,
    minutes: Annotated[Optional[float], typer.Option(help=_pre_help("minutes"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help=_pre_help("max_steps"))] = None,
    n_layer: Annotated[Optional[int], typer.Option(help=_pre_help("n_layer"))] = None,
    n_embd: Annotated[Optional[int], typer.Option(help=_pre_help("n_embd"))] = None,
    n_head: Annotated[Optional[int], typer.Option(help=_pre_help("n_head"))] = None,
    threads: Annotated[Optional[int], typer.Option(help=_pre_help("threads"))] = None,
) -> None:
    """Pre-train the bundled model from scratch; run it again on the same folder to resume."""
    from rugpt.training.pretrain import PretrainSettings
    from rugpt.training.pretrain import pretrain as run

    logging.getLogger("rugpt").setLevel(logging.INFO)
    given = {"out": out_dir, "tokenizer": tokenizer, "corpus": corpus, "minutes": minutes, "max_steps": max_steps,
             "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "threads": threads}
    out.print(run(PretrainSettings(**{k: v for k, v in given.items() if v is not None})))


def _ft_help(name: str) -> str:
    from rugpt.training.settings import FinetuneSettings

    return _help(FinetuneSettings, name)


@command
def finetune(
    data: Annotated[Path, typer.Argument(help=_ft_help("data"))],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help=_ft_help("out"))],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=_ft_help("model"))] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help=_ft_help("eval_data"))] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(help=_ft_help("eval_fraction"))] = None,
    template: Annotated[Optional[str], typer.Option(help=_ft_help("template") + "; \\n and \\t stand for a "
                                                   "newline and a tab")] = None,
    loss_on: Annotated[Optional[LossOn], typer.Option(help=_ft_help("loss_on"))] = None,
    block_size: Annotated[Optional[int], typer.Option(help=_ft_help("block_size"))] = None,
    method: Annotated[Optional[Method], typer.Option(help=_ft_help("method"))] = None,
    lora_r: Annotated[Optional[int], typer.Option(help=_ft_help("lora_r"))] = None,
    lora_alpha: Annotated[Optional[int], typer.Option(help=_ft_help("lora_alpha"))] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help=_ft_help("lora_dropout"))] = None,
    lora_targets: Annotated[Optional[list[str]], typer.Option(help=_ft_help("lora_targets") + " (repeatable)")] = None,
    merge: Annotated[bool, typer.Option("--merge", help=_ft_help("merge"))] = False,
    epochs: Annotated[Optional[float], typer.Option(help=_ft_help("epochs"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help=_ft_help("max_steps"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_ft_help("lr"))] = None,
    schedule: Annotated[Optional[Schedule], typer.Option(help=_ft_help("schedule"))] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help=_ft_help("warmup_steps"))] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=_ft_help("weight_decay"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_ft_help("batch_size"))] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(help=_ft_help("micro_batch_size"))] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help=_ft_help("max_grad_norm"))] = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                         help=_ft_help("gradient_checkpointing"))] = False,
    precision: Annotated[Optional[Precision], typer.Option(help=_ft_help("precision"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_ft_help("seed"))] = None,
    eval_every: Annotated[Optional[int], typer.Option(help=_ft_help("eval_every"))] = None,
    max_eval_blocks: Annotated[Optional[int], typer.Option(help=_ft_help("max_eval_blocks"))] = None,
    patience: Annotated[Optional[int], typer.Option(help=_ft_help("patience"))] = None,
    save_every: Annotated[Optional[int], typer.Option(help=_ft_help("save_every"))] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help=_ft_help("keep_checkpoints"))] = None,
    resume: Annotated[bool, typer.Option("--resume", help=_ft_help("resume"))] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_ft_help("overwrite"))] = False,
) -> None:
    """Fine-tune a model on your texts (full or LoRA); resumable; runs under `accelerate launch` as well."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rugpt.training.finetune import finetune as run
    from rugpt.training.report import perplexity

    if template is not None:
        template = template.replace("\\n", "\n").replace("\\t", "\t")
    given = {"eval_data": eval_data, "eval_fraction": eval_fraction, "template": template, "loss_on": loss_on,
             "block_size": block_size, "method": method, "lora_r": lora_r, "lora_alpha": lora_alpha,
             "lora_dropout": lora_dropout, "lora_targets": tuple(lora_targets) if lora_targets else None,
             "merge": merge, "epochs": epochs, "max_steps": max_steps, "lr": lr, "schedule": schedule,
             "warmup_steps": warmup_steps, "weight_decay": weight_decay, "batch_size": batch_size,
             "micro_batch_size": micro_batch_size, "max_grad_norm": max_grad_norm,
             "gradient_checkpointing": gradient_checkpointing, "precision": precision, "seed": seed,
             "eval_every": eval_every, "max_eval_blocks": max_eval_blocks, "patience": patience,
             "save_every": save_every, "keep_checkpoints": keep_checkpoints, "resume": resume, "overwrite": overwrite}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=err)
    task = progress.add_task("fine-tuning", total=None)

    def on_event(event) -> None:  # called in the main process only
        if event.kind == "start":  # after every check has passed: errors never share the screen with a bar
            progress.update(task, total=event.total_steps, completed=event.step)
            progress.start()
        elif event.kind == "step":
            progress.update(task, completed=event.step,
                            description=f"loss {event.loss:.4f} · {event.tokens_per_second:,.0f} tok/s")
        elif event.kind == "eval":
            progress.console.print(f"step {event.step}: held-out loss {event.eval_loss:.4f}, "
                                   f"perplexity {perplexity(event.eval_loss):.2f}")

    try:
        result = run(data, out_dir, model, on_event=on_event, **{k: v for k, v in given.items() if v is not None})
    finally:
        progress.stop()
    if not result.is_main_process:
        return
    if result.stopped == "interrupted":
        err.print(f"interrupted at step {result.steps}/{result.total_steps}; a checkpoint is saved in "
                  f"{escape(str(out_dir))}/checkpoints — run the same command with --resume to continue")
        raise typer.Exit(130)
    if result.perplexity_before is not None and result.perplexity_after is not None:
        out.print(f"held-out perplexity: {result.perplexity_before:.2f} → {result.perplexity_after:.2f}")
    out.print(f"{result.steps} steps ({result.stopped}), final training loss {result.train_loss:.4f}; "
              f"model in {escape(str(out_dir))} (try: rugpt generate --model {escape(str(out_dir))})")


def _tune_help(name: str) -> str:
    from rugpt.prompts.training import PromptTuningSettings

    return _help(PromptTuningSettings, name)


@command
def prompt_tune(
    data: Annotated[Path, typer.Argument(help="training rows: JSONL, one JSON object per line")],
    template: Annotated[str, typer.Option("--format", help=_tune_help("format"))],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the prompt, history.json and loss.png")] = (
        Path("prompt")),
    model: ModelOpt = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="held-out rows (JSONL)")] = None,
    target_field: Annotated[Optional[str], typer.Option(help=_tune_help("target_field"))] = None,
    task: Annotated[Optional[str], typer.Option(help=_tune_help("task"))] = None,
    label: Annotated[Optional[list[str]], typer.Option(help=_tune_help("labels") + " (repeatable)")] = None,
    provider: Annotated[Optional[str], typer.Option(help=_tune_help("provider"))] = None,
    init_text: Annotated[Optional[str], typer.Option(help=_tune_help("init_text"))] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help=_tune_help("max_tokens"))] = None,
    truncation_field: Annotated[Optional[str], typer.Option(help=_tune_help("truncation_field"))] = None,
    epochs: Annotated[Optional[int], typer.Option(help=_tune_help("epochs"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help=_tune_help("max_steps"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_tune_help("batch_size"))] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", help=_tune_help("learning_rate"))] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(help=_tune_help("eval_fraction"))] = None,
    patience: Annotated[Optional[int], typer.Option(help=_tune_help("patience"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_tune_help("seed"))] = None,
) -> None:
    """Train a prompt (a few input vectors) on a frozen model: text2text or classification."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rugpt.prompts.training import PromptTuningSettings
    from rugpt.prompts.training import prompt_tune as run

    given = {"target_field": target_field, "task": task, "labels": tuple(label) if label else None,
             "provider": provider, "init_text": init_text, "max_tokens": max_tokens,
             "truncation_field": truncation_field, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
             "learning_rate": learning_rate, "eval_fraction": eval_fraction, "patience": patience, "seed": seed}
    settings = PromptTuningSettings(format=template, **{k: v for k, v in given.items() if v is not None})
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        bar = progress.add_task("prompt tuning", total=None)

        def on_step(info) -> None:
            progress.update(bar, total=info.total_steps, completed=info.step,
                            description=f"epoch {info.epoch} · loss {info.loss:.4f}")

        def on_epoch(report) -> None:
            held_out = report.eval or {}
            accuracy = f", accuracy {held_out['accuracy']:.3f}" if held_out.get("accuracy") is not None else ""
            shown = f"held-out loss {held_out['loss']:.4f}{accuracy}" if held_out else "no held-out rows"
            progress.console.print(f"epoch {report.epoch}: train loss {report.train_loss:.4f}, {shown}")

        result = run(data, settings, model, eval_data=eval_data, out=out_dir, on_step=on_step, on_epoch=on_epoch)
    stop = " (stopped early)" if result.stopped_early else ""
    best = result.epochs[result.best_epoch - 1].eval
    if result.initial_eval and best:
        out.print(f"held-out loss: {result.initial_eval['loss']:.4f} untrained → {best['loss']:.4f} trained")
    out.print(f"best epoch {result.best_epoch}{stop}; prompt saved to {result.saved}")
    if result.plot:
        out.print(f"loss plot: {result.plot}")
    out.print(f"try: rugpt generate --prompt-tuned {out_dir}" + (f" --model {model}" if model else ""))


# Seed programming: scoring, classification, the recommender and chat.


def _set_only(**values) -> dict:
    """The options a user gave: None means 'use the default defined in the settings class'."""
    return {k: v for k, v in values.items() if v is not None}


def _unescape(text: str | None) -> str | None:
    """Shells pass \\n and \\t literally; templates and personas need real newlines and tabs."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


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


def _score_help(name: str) -> str:
    from rugpt.scoring import ScoreSettings

    return _help(ScoreSettings, name)


TextsArg = Annotated[Optional[list[str]], typer.Argument(help="texts ('-' or none: read stdin)")]
FileOpt = Annotated[Optional[Path], typer.Option("--file", "-f", help="read one text from this file")]
LinesOpt = Annotated[bool, typer.Option("--lines", help="one text per non-empty line of the file or stdin")]
JsonlOpt = Annotated[Optional[Path], typer.Option("--jsonl", help="read texts from a JSON Lines file")]
FieldOpt = Annotated[str, typer.Option("--field", help="the JSONL field that holds the text")]


@command
def score(
    texts: TextsArg = None, file: FileOpt = None, lines: LinesOpt = False, jsonl: JsonlOpt = None,
    text_field: FieldOpt = "text", model: ModelOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_score_help("batch_size"))] = None,
    window: Annotated[Optional[int], typer.Option(help=_score_help("window"))] = None,
    stride: Annotated[Optional[int], typer.Option(help=_score_help("stride"))] = None,
    bos: Annotated[Optional[bool], typer.Option("--bos/--no-bos", help=_score_help("prepend_bos"))] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="show each token's log-prob")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Log-likelihood, mean token loss and perplexity of texts; long texts are scored with a sliding window."""
    from rugpt.scoring import Scorer, ScoreSettings

    settings = ScoreSettings(token_details=tokens, **_set_only(
        batch_size=batch_size, window=window, stride=stride, prepend_bos=bos))
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


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _classifier_help(name: str) -> str:
    from rugpt.classification import ClassifierSettings

    return _help(ClassifierSettings, name)


@command
def classify(
    texts: TextsArg = None, file: FileOpt = None, lines: LinesOpt = False, jsonl: JsonlOpt = None,
    text_field: FieldOpt = "text", model: ModelOpt = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help=_classifier_help("template")
                                                   + "; \\n stands for a newline")] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", "-l", help="a label (repeatable)")] = None,
    label_template: Annotated[Optional[list[str]], typer.Option(
        help="LABEL=TEMPLATE, one per label (repeatable), instead of --template and --label")] = None,
    normalize: Annotated[Optional[str], typer.Option(help=_classifier_help("normalize"))] = None,
    calibrate: Annotated[Optional[str], typer.Option(help=_classifier_help("calibrate"))] = None,
    examples: Annotated[Optional[Path], typer.Option(help="few-shot examples: JSONL with text and label")] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="JSONL with text and gold label: print "
                                                      "accuracy, per-label precision/recall, confusion matrix")] = None,
    label_field: Annotated[str, typer.Option(help="the JSONL field that holds the label")] = "label",
    batch_size: Annotated[Optional[int], typer.Option(help=_classifier_help("batch_size"))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Zero/few-shot classification: the label whose text the model finds likeliest wins."""
    from rugpt.classification import Classifier, ClassifierSettings, read_labeled

    templates = {}
    for item in label_template or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--label-template {item!r} must look like LABEL=TEMPLATE")
        templates[name.strip()] = _unescape(text)
    settings = ClassifierSettings(labels=tuple(label or ()), templates=templates, **_set_only(
        template=_unescape(template), normalize=normalize, calibrate=calibrate, batch_size=batch_size))
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


def _rec_help(name: str) -> str:
    from rugpt.apps.recommender import RecommenderSettings

    return _help(RecommenderSettings, name)


@command
def recommend(
    liked: Annotated[Optional[list[str]], typer.Argument(help="items the user liked")] = None,
    model: ModelOpt = None,
    domain: Annotated[Optional[str], typer.Option(help=_rec_help("domain"))] = None,
    catalogue: Annotated[Optional[str], typer.Option(help="keep only items of this CSV catalogue (title, year); "
                                                     "'films_ru' is the shipped one")] = None,
    samples: Annotated[Optional[int], typer.Option(help=_rec_help("samples"))] = None,
    top: Annotated[Optional[int], typer.Option(help=_rec_help("top"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_rec_help("max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_rec_help("temperature"))] = None,
    top_p: Annotated[Optional[float], typer.Option(help=_rec_help("top_p"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_rec_help("seed"))] = None,
    quotes: Annotated[Optional[str], typer.Option(help=_rec_help("quotes"))] = None,
    min_similarity: Annotated[Optional[float], typer.Option(help=_rec_help("min_similarity"))] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help='users JSONL ({"liked": [...]} per line): '
                                                      "report hit-rate@top and catalogue coverage")] = None,
    hide: Annotated[Optional[int], typer.Option(help="with --eval: how many of each user's last items to hide "
                                                "(default 1)")] = None,
    show_samples: Annotated[bool, typer.Option("--show-samples", help="also print the sampled continuations")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Recommend by seed programming: list what a user liked, sample continuations, count the titles."""
    from rugpt.apps.recommender import Catalogue, Recommender, RecommenderSettings, read_users

    settings = RecommenderSettings(**_set_only(
        domain=domain, samples=samples, top=top, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, quotes=quotes, min_similarity=min_similarity))
    recommender = Recommender(model, Catalogue.load(catalogue) if catalogue else None)
    if eval_file is not None:
        report = recommender.evaluate(read_users(eval_file), settings, **_set_only(hide=hide))
        if as_json:
            print(json.dumps(report.to_dict(), ensure_ascii=False))
            return
        coverage = "—" if report.coverage is None else f"{report.coverage:.3f}"
        out.print(f"hit-rate@{report.k} {report.hit_rate:.3f} over {report.users} users "
                  f"({report.hidden_per_user} hidden each); "
                  f"catalogue coverage {coverage}; {report.distinct_recommended} distinct items recommended")
        return
    if not liked:
        raise UsageError("no liked items: give them as arguments, e.g. rugpt recommend 'Брат' 'Бумер'")
    result = recommender.recommend(liked, settings)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    table = Table("#", "title", "year", "votes")
    for i, item in enumerate(result.items, start=1):
        table.add_row(str(i), escape(item.title), str(item.year or ""), f"{item.votes}/{settings.samples}")
    out.print(table if result.items else "no names came back; try more --samples or another --seed")
    for sample in result.samples if show_samples else []:
        out.print(sample, markup=False)


@command
def chat(
    model: ModelOpt = None,
    once: Annotated[Optional[str], typer.Option(help="send this one message, print the reply and exit")] = None,
    user_tag: Annotated[Optional[str], typer.Option(help="the tag before your lines (default 'Пользователь:')")] = None,
    bot_tag: Annotated[Optional[str], typer.Option(help="the tag before the bot's lines (default 'Бот:')")] = None,
    persona: Annotated[Optional[str], typer.Option(help="who the bot is, put before the dialogue")] = None,
    seed_dialogue: Annotated[Optional[Path], typer.Option(help="a file of opening turns, each line starting with "
                                                          "a speaker tag")] = None,
    preset: Annotated[Optional[str], typer.Option(help="precise | greedy | balanced | creative")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_gen_help("max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_gen_help("temperature"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_gen_help("seed"))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="with --once: print the reply as JSON")] = False,
) -> None:
    """Talk to a model in the terminal; /reset starts over, /exit or Ctrl-D leaves."""
    from rugpt.apps.chat import Chat, ChatSettings, read_dialogue

    generation = _settings_from_cli(preset, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    settings = ChatSettings(generation=generation, **_set_only(
        user_tag=user_tag, bot_tag=bot_tag, persona=_unescape(persona)))
    if seed_dialogue is not None:
        turns = read_dialogue(seed_dialogue, settings.user_tag, settings.bot_tag)
        settings = dataclasses.replace(settings, seed_dialogue=turns)
    session = Chat(model, settings)
    if once is not None:
        reply = session.send(once)
        if as_json:
            print(json.dumps({"message": once, "reply": reply}, ensure_ascii=False))
        else:
            out.print(reply, markup=False)
        return
    err.print("/reset starts over, /exit or Ctrl-D leaves", style="dim")
    while True:
        try:
            message = out.input(f"{escape(settings.user_tag)} ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if message in ("/exit", "/выход"):
            break
        if message == "/reset":
            session.reset()
        elif message:
            out.print(f"{settings.bot_tag} {session.send(message)}", markup=False)


@command
def export_bundled(
    run: Annotated[Optional[Path], typer.Option(help=_pre_help("out"))] = None,
    dest: Annotated[Optional[Path], typer.Option(help="package folder to write (default: rugpt/bundled)")] = None,
) -> None:
    """Measure a pre-training run (held-out perplexity, real-word share) and ship it as the bundled model."""
    from rugpt.models import BUNDLED_DIR
    from rugpt.training.bundle import export_bundle
    from rugpt.training.pretrain import PretrainSettings

    metrics = export_bundle(run or PretrainSettings().out, dest or BUNDLED_DIR)
    h = metrics["heldout"]
    out.print(f"held-out perplexity {h['perplexity']:.1f} ({h['bits_per_character']:.3f} bits/char); "
              f"real words {metrics['real_words']['share']:.1%}; written to {dest or BUNDLED_DIR}")


@command
def play(
    scenario: Annotated[Optional[str], typer.Option("--scenario", "-s", help="fantasy | detective | space | "
                                                    "postapocalypse, or a scenario .yaml file")] = None,
    model: ModelOpt = None,
    db: Annotated[Optional[Path], typer.Option(help="SQLite file of saved adventures "
                                               "(default: ~/.local/share/rugpt/adventures.sqlite3)")] = None,
    resume: Annotated[Optional[int], typer.Option(help="id of a saved adventure to continue (see --list)")] = None,
    import_file: Annotated[Optional[Path], typer.Option("--import", help="continue an adventure exported as "
                                                        "JSON")] = None,
    list_only: Annotated[bool, typer.Option("--list", help="list scenarios and saved adventures")] = False,
) -> None:
    """A text adventure: type what you do («я открываю дверь»), the model tells what happens."""
    from rugpt.apps.adventure.terminal import play as run

    run(scenario, model=model, db=db, resume=resume, import_file=import_file, list_only=list_only, console=out)


def _serve_help(name: str) -> str:
    from rugpt.serve.settings import describe

    return describe(name)


@command
def serve(
    model: ModelOpt = None,
    host: Annotated[Optional[str], typer.Option(help=_serve_help("host"))] = None,
    port: Annotated[Optional[int], typer.Option(help=_serve_help("port"))] = None,
    engine: Annotated[Optional[str], typer.Option(help=_serve_help("engine"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_serve_help("device"))] = None,
    served_name: Annotated[Optional[str], typer.Option(help=_serve_help("served_name"))] = None,
    api_key: Annotated[Optional[list[str]], typer.Option(
        envvar="RUGPT_API_KEY", help=_serve_help("api_keys") + " (repeatable; or RUGPT_API_KEY, space-separated)",
        show_envvar=False)] = None,
    prompts_dir: Annotated[Optional[Path], typer.Option(help=_serve_help("prompts_dir"))] = None,
    max_batch: Annotated[Optional[int], typer.Option(help=_serve_help("max_batch"))] = None,
    max_waiting: Annotated[Optional[int], typer.Option(help=_serve_help("max_waiting"))] = None,
    max_queue_seconds: Annotated[Optional[float], typer.Option(help=_serve_help("max_queue_seconds"))] = None,
    max_inflight_per_key: Annotated[Optional[int], typer.Option(help=_serve_help("max_inflight_per_key"))] = None,
    request_timeout: Annotated[Optional[float], typer.Option(help=_serve_help("request_timeout"))] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(help=_serve_help("max_prompt_tokens"))] = None,
    max_tokens_limit: Annotated[Optional[int], typer.Option(help=_serve_help("max_tokens_limit"))] = None,
    default_max_tokens: Annotated[Optional[int], typer.Option(help=_serve_help("default_max_tokens"))] = None,
    max_n: Annotated[Optional[int], typer.Option(help=_serve_help("max_n"))] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option(help=_serve_help("max_body_bytes"))] = None,
    shutdown_grace: Annotated[Optional[float], typer.Option(help=_serve_help("shutdown_grace"))] = None,
    log_level: Annotated[Optional[str], typer.Option(help=_serve_help("log_level"))] = None,
    play_db: Annotated[Optional[Path], typer.Option(help="SQLite file of the /play text adventures "
                                                    "(default: ~/.local/share/rugpt/adventures.sqlite3)")] = None,
    play: Annotated[bool, typer.Option("--play/--no-play", help="serve the text adventure at /play")] = True,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with a batching queue and a web playground at /."""
    given = {name: value for name, value in locals().items()
             if value is not None and name not in ("api_key", "play_db", "play")}
    given["api_keys"] = list(api_key or [])
    from pydantic import ValidationError

    from rugpt.serve import ServerSettings, run_server

    try:
        settings = ServerSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        err.print(f"[yellow]warning:[/yellow] serving on {settings.host} without --api-key: anyone who can reach "
                  f"this address can use the model", markup=True)
    run_server(settings, routers=[_play_router(play_db)] if play else [])


def _play_router(db: Path | None):
    """The text adventure's /play pages, composed here so that the server never imports the apps."""
    from rugpt.apps.adventure.store import AdventureStore
    from rugpt.apps.adventure.web import create_play_router

    return create_play_router(AdventureStore(db))


def main() -> None:
    app()
