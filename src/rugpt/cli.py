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
from rich.table import Table

from rugpt.errors import RugptError, UsageError

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
) -> None:
    """Continue a Russian text with the bundled model or any GPT-2-architecture checkpoint."""
    from rugpt.generation import Generator

    settings = _settings_from_cli(
        preset, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams, num_return_sequences=num_return_sequences, seed=seed, stop=stop,
    )
    text = read_text_arg(prompt, file)
    generator = Generator(model)
    can_stream = stream and not as_json and settings.num_beams == 1 and settings.num_return_sequences == 1
    if can_stream:
        generator.encode_prompt(text, settings.max_new_tokens)  # validate before echoing the prompt
        out.print(text, end="", style="bold")
        for piece in generator.stream(text, settings):
            out.print(piece, end="")
        out.print()
        return
    result = generator.generate(text, settings)
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


def main() -> None:
    app()
