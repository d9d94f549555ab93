"""The Typer app and what every command shares: one-line errors with exit code 2, text readers, option types.

Options that are settings come from the settings classes (cli/options.py); only a command's own inputs
(texts, files, output format) are declared in its signature.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rugpt.cli.options import lazy_command
from rugpt.errors import RugptError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Russian GPT models (ruGPT-3 family) at work.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def command(func):
    """Register a command whose user errors print as one line on stderr and exit with code 2.

    Its parameters are built when the command is first used (cli/options.py): a parameter annotated
    `Annotated[dict, FromSettings(...)]` becomes one option per field of that settings class.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RugptError as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None

    lazy_command(app, wrapper, func.__name__.replace("_", "-"))
    return wrapper


def print_error(message: str) -> None:
    """One line on stderr; the message is text, never Rich markup (an install hint like [cluster] stays)."""
    err.print(f"[red]error:[/red] {escape(message)}", markup=True)


def setting_help(settings_cls, name: str) -> str:
    """A setting's help text, written once where the setting is defined (for an option that is not generated)."""
    import dataclasses

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


def unescape(text: str | None) -> str | None:
    """Shells pass \\n and \\t literally; templates and personas need real newlines and tabs."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")
