"""The bundled model's recipe: `rugpt train-tokenizer`, `rugpt pretrain`, `rugpt export-bundled`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from rugpt.cli.app import command, out, setting_help
from rugpt.cli.options import FromSettings, Opt

RECIPE = "rugpt.training.pretrain:PretrainSettings"
TOKENIZER = FromSettings(RECIPE, only=("corpus", "tokenizer", "vocab_size", "fortunes", "heldout_fraction"),
                         opts={"tokenizer": Opt("--out")})
PRETRAIN = FromSettings(RECIPE, exclude=("vocab_size",), opts={"out": Opt("--out")})


def _pre_help(name: str) -> str:
    from rugpt.training.pretrain import PretrainSettings

    return setting_help(PretrainSettings, name)


@command
def train_tokenizer(given: Annotated[dict, TOKENIZER]) -> None:
    """Train the bundled model's byte-level BPE on the training split of the corpus."""
    from rugpt.training.pretrain import PretrainSettings, train_recipe_tokenizer

    settings = PretrainSettings(**given)
    size, chars_per_token = train_recipe_tokenizer(settings)
    out.print(f"tokenizer with {size} tokens in {settings.tokenizer}; held-out: {chars_per_token:.2f} chars/token")


@command
def pretrain(given: Annotated[dict, PRETRAIN]) -> None:
    """Pre-train the bundled model (from scratch, or on from --init-from); run it again on the same folder to resume."""
    from rugpt.training.pretrain import PretrainSettings
    from rugpt.training.pretrain import pretrain as run

    logging.getLogger("rugpt").setLevel(logging.INFO)
    out.print(run(PretrainSettings(**given)))


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
