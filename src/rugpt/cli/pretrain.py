"""The bundled model's recipe: `rugpt train-tokenizer`, `rugpt pretrain`, `rugpt export-bundled`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from rugpt.cli.app import command, out, setting_help


def _pre_help(name: str) -> str:
    from rugpt.training.pretrain import PretrainSettings

    return setting_help(PretrainSettings, name)


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
    init_from: Annotated[Optional[Path], typer.Option(help=_pre_help("init_from"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_pre_help("lr"))] = None,
    min_lr: Annotated[Optional[float], typer.Option(help=_pre_help("min_lr"))] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help=_pre_help("warmup_steps"))] = None,
    short_until: Annotated[Optional[float], typer.Option(help=_pre_help("short_until"))] = None,
) -> None:
    """Pre-train the bundled model (from scratch, or on from --init-from); run it again on the same folder to resume."""
    from rugpt.training.pretrain import PretrainSettings
    from rugpt.training.pretrain import pretrain as run

    logging.getLogger("rugpt").setLevel(logging.INFO)
    given = {"out": out_dir, "tokenizer": tokenizer, "corpus": corpus, "minutes": minutes, "max_steps": max_steps,
             "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "threads": threads, "init_from": init_from,
             "lr": lr, "min_lr": min_lr, "warmup_steps": warmup_steps, "short_until": short_until}
    out.print(run(PretrainSettings(**{k: v for k, v in given.items() if v is not None})))


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
