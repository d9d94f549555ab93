"""`rugpt models`, `rugpt download` and `rugpt tokenize`: what checkpoints there are, fetching one, and how a
tokenizer splits a text."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from rugpt.cli.app import ModelOpt, command, out, read_text_arg


@command
def models(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List known checkpoints: download size, special-token ids and where each is cached."""
    from rugpt.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    # One block per model rather than a table: nine columns and a cache path do not fit a terminal.
    for row in rows:
        out.print("\n".join(_describe(row)))


def _describe(row: dict) -> list[str]:
    ids = row["special_ids"]
    size = f"≈{row['download_gb']:g} GB download (published size)" if row["download_gb"] else "ships with rugpt"
    facts = [f"{row['shape']} (layers × width × heads)", f"{row['params']} parameters", f"context {row['context']}",
             size, f"pad/bos/eos {ids['pad']}/{ids['bos']}/{ids['eos']}" if ids else "pad/bos/eos unknown",
             f"cached: {row['path'] or 'no'}"]
    return [f"[bold]{row['alias']}[/bold]  {row['hub_id']}", "    " + ", ".join(facts), f"    {row['notes']}"]


@command
def download(
    name: Annotated[str, typer.Argument(help="alias (small, medium, large, xl, gpt2-large, 13b) or hub id")],
    revision: Annotated[Optional[str], typer.Option(help="branch, tag or commit (default: main)")] = None,
    token: Annotated[Optional[str], typer.Option(help="Hugging Face token for gated or private repos "
                                                      "(default: the one `hf auth login` saved)")] = None,
) -> None:
    """Fetch a model's config, tokenizer and weights into the Hugging Face cache (resumable; skips other formats)."""
    from rugpt.download import download as fetch

    folder = fetch(name, revision=revision, token=token)
    out.print(f"{name}: files in {folder}")


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
    text = read_text_arg(text, None, "text")
    views = describe_tokens(tokenizer, text)
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(v) for v in views], ensure_ascii=False))
        return
    table = Table("#", "id", "token", "symbol")
    for i, v in enumerate(views):
        table.add_row(str(i), str(v.id), repr(v.text)[1:-1], v.symbol)
    out.print(table)
    out.print(f"{len(views)} tokens, {len(text)} characters")
