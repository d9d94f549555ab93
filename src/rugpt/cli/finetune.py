"""`rugpt finetune`: full or LoRA fine-tuning on your texts, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from rugpt.cli.app import command, err, out, set_only, setting_help, unescape
from rugpt.training.settings import LossOn, Method, Optimizer, Precision, Schedule


def _ft_help(name: str) -> str:
    from rugpt.training.settings import FinetuneSettings

    return setting_help(FinetuneSettings, name)


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
    quantize_base: Annotated[bool, typer.Option("--quantize-base", help=_ft_help("quantize_base"))] = False,
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
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help=_ft_help("gradient_checkpointing"),
        show_default=False)] = None,
    optimizer: Annotated[Optional[Optimizer], typer.Option(help=_ft_help("optimizer"))] = None,
    max_memory: Annotated[Optional[str], typer.Option(help=_ft_help("max_memory"))] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=_ft_help("precision"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_ft_help("seed"))] = None,
    eval_every: Annotated[Optional[int], typer.Option(help=_ft_help("eval_every"))] = None,
    max_eval_blocks: Annotated[Optional[int], typer.Option(help=_ft_help("max_eval_blocks"))] = None,
    patience: Annotated[Optional[int], typer.Option(help=_ft_help("patience"))] = None,
    save_every: Annotated[Optional[int], typer.Option(help=_ft_help("save_every"))] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help=_ft_help("keep_checkpoints"))] = None,
    resume: Annotated[bool, typer.Option("--resume", help=_ft_help("resume"))] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_ft_help("overwrite"))] = False,
    plan: Annotated[bool, typer.Option("--plan", help="print the memory plan and its estimate, and exit without "
                                                     "loading the model")] = False,
) -> None:
    """Fine-tune a model on your texts (full or LoRA); resumable; runs under `accelerate launch` as well."""
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rugpt.training.finetune import finetune as run
    from rugpt.training.finetune import plan as plan_only
    from rugpt.training.report import perplexity
    from rugpt.training.settings import FinetuneSettings

    arguments = locals()  # the options, named as the settings' fields (a few take a shape of their own below)
    names = {f.name for f in dataclasses.fields(FinetuneSettings)} - {"data", "out", "model"}
    given = set_only(**{name: arguments[name] for name in names})
    given |= set_only(template=unescape(template), lora_targets=tuple(lora_targets) if lora_targets else None)
    if plan:
        out.print(plan_only(data, out_dir, model, **given).describe())
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
        result = run(data, out_dir, model, on_event=on_event, **given)
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
