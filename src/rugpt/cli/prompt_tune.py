"""`rugpt prompt-tune`: train a prompt on a frozen model (the jobs of ruPrompts' `ruprompts-train`; the mapping of
its Hydra options to these flags is in docs/prompt_tuning.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rugpt.cli.app import ModelOpt, command, err, out
from rugpt.cli.options import FromSettings, Opt

TUNING = FromSettings("rugpt.prompts.training:PromptTuningSettings", opts={
    "format": Opt("--format"), "labels": Opt("--label"), "learning_rate": Opt("--lr")})


@command
def prompt_tune(
    data: Annotated[Path, typer.Argument(help="training rows: JSONL (one JSON object per line), or CSV / TSV with a "
                                              "header row")],
    given: Annotated[dict, TUNING],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the prompt, history.json and loss.png")] = (
        Path("prompt")),
    model: ModelOpt = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="held-out rows (JSONL, CSV or TSV)")] = None,
) -> None:
    """Train a prompt (a few input vectors) on a frozen model: text2text or classification."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rugpt.prompts.training import PromptTuningSettings
    from rugpt.prompts.training import prompt_tune as run

    settings = PromptTuningSettings(**given)
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
