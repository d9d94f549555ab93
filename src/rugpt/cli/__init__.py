"""The `rugpt` command: one thin command per capability; each parses, calls one library function, prints.

Each module registers its commands on the shared app when imported; the order here is the order of
`rugpt --help`.
"""

from rugpt.cli import models, generate, pretrain, finetune, prompt_tune, scoring, apps, serve  # noqa: F401, I001
from rugpt.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
