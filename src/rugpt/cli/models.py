"""`rugpt models` and `rugpt tokenize`: what checkpoints there are, and how a tokenizer splits a text."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from rugpt.cli.app import ModelOpt, command, out, read_text_arg


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
