"""`rugpt prompt-tune`: train a prompt on a frozen model (the jobs of ruPrompts' `ruprompts-train`; the mapping of
its Hydra options to these flags is in docs/prompt_tuning.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rugpt.cli.app import ModelOpt, command, err, out, setting_help


def _tune_help(name: str) -> str:
    from rugpt.prompts.training import PromptTuningSettings

    return setting_help(PromptTuningSettings, name)


@command
def prompt_tune(
    data: Annotated[Path, typer.Argument(help="training rows: JSONL (one JSON object per line), or CSV / TSV with a "
                                              "header row")],
    template: Annotated[str, typer.Option("--format", help=_tune_help("format"))],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the prompt, history.json and loss.png")] = (
        Path("prompt")),
    model: ModelOpt = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="held-out rows (JSONL, CSV or TSV)")] = None,
    target_field: Annotated[Optional[str], typer.Option(help=_tune_help("target_field"))] = None,
    task: Annotated[Optional[str], typer.Option(help=_tune_help("task"))] = None,
    label: Annotated[Optional[list[str]], typer.Option(help=_tune_help("labels") + " (repeatable)")] = None,
    provider: Annotated[Optional[str], typer.Option(help=_tune_help("provider"))] = None,
    init: Annotated[Optional[str], typer.Option(help=_tune_help("init"))] = None,
    init_text: Annotated[Optional[str], typer.Option(help=_tune_help("init_text"))] = None,
    hidden_dim: Annotated[Optional[int], typer.Option(help=_tune_help("hidden_dim"))] = None,
    input_dim: Annotated[Optional[int], typer.Option(help=_tune_help("input_dim"))] = None,
    num_lstm_layers: Annotated[Optional[int], typer.Option(help=_tune_help("num_lstm_layers"))] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help=_tune_help("max_tokens"))] = None,
    truncation_field: Annotated[Optional[str], typer.Option(help=_tune_help("truncation_field"))] = None,
    epochs: Annotated[Optional[int], typer.Option(help=_tune_help("epochs"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help=_tune_help("max_steps"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_tune_help("batch_size"))] = None,
    gradient_accumulation_steps: Annotated[Optional[int], typer.Option(
        help=_tune_help("gradient_accumulation_steps"))] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", help=_tune_help("learning_rate"))] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help=_tune_help("warmup_steps"))] = None,
    scheduler: Annotated[Optional[str], typer.Option(help=_tune_help("scheduler"))] = None,
    restart_steps: Annotated[Optional[int], typer.Option(help=_tune_help("restart_steps"))] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(help=_tune_help("eval_fraction"))] = None,
    patience: Annotated[Optional[int], typer.Option(help=_tune_help("patience"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_tune_help("seed"))] = None,
) -> None:
    """Train a prompt (a few input vectors) on a frozen model: text2text or classification."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rugpt.prompts.training import PromptTuningSettings
    from rugpt.prompts.training import prompt_tune as run

    given = {"target_field": target_field, "task": task, "labels": tuple(label) if label else None,
             "provider": provider, "init": init, "init_text": init_text, "hidden_dim": hidden_dim,
             "input_dim": input_dim, "num_lstm_layers": num_lstm_layers, "max_tokens": max_tokens,
             "truncation_field": truncation_field, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
             "gradient_accumulation_steps": gradient_accumulation_steps, "learning_rate": learning_rate,
             "warmup_steps": warmup_steps, "scheduler": scheduler, "restart_steps": restart_steps,
             "eval_fraction": eval_fraction, "patience": patience, "seed": seed}
    settings = PromptTuningSettings(format=template, **{k: v for k, v in given.items() if v is not None})
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
