"""`rugpt finetune`: full or LoRA fine-tuning on your texts, with a progress bar."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from rugpt.cli.app import command, err, out, unescape
from rugpt.cli.options import FromSettings, Opt

FINETUNE = FromSettings("rugpt.training.settings:FinetuneSettings", opts={
    "data": Opt(argument=True), "out": Opt("--out", "-o"), "model": Opt("--model", "-m"),
    "template": Opt(help="; \\n and \\t stand for a newline and a tab", convert=unescape)})


@command
def finetune(
    given: Annotated[dict, FINETUNE],
    plan: Annotated[bool, typer.Option("--plan", help="print the memory plan and its estimate, and exit without "
                                                     "loading the model")] = False,
) -> None:
    """Fine-tune a model on your texts (full or LoRA); resumable; runs under `accelerate launch` as well."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rugpt.training.finetune import finetune as run
    from rugpt.training.finetune import plan as plan_only
    from rugpt.training.report import perplexity

    if plan:
        out.print(plan_only(**given).describe())
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=err)
    task = progress.add_task("fine-tuning", total=None)

    planned = []

    def on_event(event) -> None:  # called in the main process only
        if event.kind == "plan":
            planned.append(event.plan)
        elif event.kind == "start":  # after every check has passed: errors never share the screen with a bar
            if planned:
                err.print(planned[0].describe())
            progress.update(task, total=event.total_steps, completed=event.step)
            progress.start()
        elif event.kind == "step":
            progress.update(task, completed=event.step,
                            description=f"loss {event.loss:.4f} · {event.tokens_per_second:,.0f} tok/s")
        elif event.kind == "eval":
            progress.console.print(f"step {event.step}: held-out loss {event.eval_loss:.4f}, "
                                   f"perplexity {perplexity(event.eval_loss):.2f}")

    try:
        result = run(on_event=on_event, **given)
    finally:
        progress.stop()
    if not result.is_main_process:
        return
    if result.stopped == "interrupted":
        err.print(f"interrupted at step {result.steps}/{result.total_steps}; a checkpoint is saved in "
                  f"{escape(str(given['out']))}/checkpoints — run the same command with --resume to continue")
        raise typer.Exit(130)
    if result.perplexity_before is not None and result.perplexity_after is not None:
        out.print(f"held-out perplexity: {result.perplexity_before:.2f} → {result.perplexity_after:.2f}")
    out.print(f"{result.steps} steps ({result.stopped}), final training loss {result.train_loss:.4f}; "
              f"model in {escape(str(given['out']))} (try: rugpt generate --model {escape(str(given['out']))})")
