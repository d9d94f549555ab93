"""What a training run leaves for people: a loss-curve PNG (every trainer's) and a short model card (README.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rugpt.atomic import atomic_write_bytes, atomic_write_text
from rugpt.training.checkpoints import TrainerState
from rugpt.training.settings import FinetuneSettings, Method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSummary:
    """Sizes of the data a run trained and evaluated on."""

    train_documents: int
    train_tokens: int
    heldout_documents: int
    heldout_tokens: int
    block_size: int


def perplexity(loss: float | None) -> float | None:
    """exp(mean cross-entropy in nats); None when there was no evaluation."""
    return None if loss is None else math.exp(min(loss, 700.0))


def plot_loss_curve(state: TrainerState, path: Path) -> Path | None:
    """A run's training loss per step and its held-out loss at each evaluation (fine-tuning, pre-training)."""
    evals = [{"step": 0, "eval_loss": state.eval_loss_before}] if state.eval_loss_before is not None else []
    return plot_losses(path, [(h["step"], h["loss"]) for h in state.history],
                       [(e["step"], e["eval_loss"]) for e in evals + state.evals])


def plot_losses(path: Path, train: Sequence[tuple[float, float]], heldout: Sequence[tuple[float, float]] = (),
                x_label: str = "optimizer step") -> Path | None:
    """The loss plot of every rugpt trainer: training loss (faint, with a moving average once there are many
    points) and held-out loss, as a PNG written atomically. None, with a warning, when matplotlib is missing."""
    import io

    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'rugpt[train]'): no loss plot")
        return None
    matplotlib.use("Agg")  # no display on servers; Agg renders straight to PNG
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, losses = [x for x, _ in train], [y for _, y in train]
    window = max(1, len(losses) // 20)
    if window > 1:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train (per step)")
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train (mean of {window} steps)")
    elif steps:
        ax.plot(steps, losses, color="tab:blue", linewidth=2, label="train")
    if heldout:
        ax.plot([x for x, _ in heldout], [y for _, y in heldout], "o-", color="tab:orange", label="held-out")
    ax.set_xlabel(x_label)
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def model_card(settings: FinetuneSettings, base: str, data: DataSummary, state: TrainerState, stopped: str) -> str:
    """A short README.md in the Hugging Face model-card shape (YAML header, then Markdown)."""
    adapter = settings.method == Method.lora and not settings.merge
    final_eval = state.evals[-1]["eval_loss"] if state.evals else None
    before, after = perplexity(state.eval_loss_before), perplexity(final_eval)
    final_train = state.history[-1]["loss"] if state.history else float("nan")
    method = "full fine-tuning" if settings.method == Method.full else (
        f"LoRA (rank {settings.lora_r}, alpha {settings.lora_alpha}, on {', '.join(settings.lora_targets)})"
        + (", merged into the weights" if settings.merge else ", saved as an adapter"))
    lines = [
        "---",
        "language: ru",
        f"library_name: {'peft' if adapter else 'transformers'}",
        f"base_model: {base}",
        "tags: [rugpt, gpt2, fine-tuned" + (", lora]" if settings.method == Method.lora else "]"),
        "---",
        "",
        f"# {settings.out.name}",
        "",
        f"Fine-tuned from `{base}` with rugpt: {method}.",
        "",
        "## Data",
        f"- training: {data.train_documents} documents, {data.train_tokens} tokens, "
        f"packed into blocks of {data.block_size}",
        f"- held-out: {data.heldout_documents} documents, {data.heldout_tokens} tokens" if data.heldout_documents
        else "- held-out: none",
        f"- loss on: {settings.loss_on.value} tokens" + (f"; template `{settings.template!r}`" if settings.template
                                                         else ""),
        "",
        "## Training",
        f"- {state.step} optimizer steps ({stopped}), {state.tokens_seen} tokens seen, "
        f"{state.elapsed / 60:.1f} minutes on {state.num_processes} "
        + ("process" if state.num_processes == 1 else "processes"),
        f"- batch {settings.batch_size} sequences, learning rate {settings.lr:g} ({settings.schedule.value}), "
        f"seed {settings.seed}",
        f"- final training loss {final_train:.4f}",
        "",
        "## Results",
        _perplexity_line(before, after),
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Command",
        "```",
        settings.to_command(),
        "```",
        "",
        "## Use",
        "```",
        f"rugpt generate --model {settings.out} \"Начало текста\"",
        "```",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained({str(settings.out)!r})"
        + ("  # needs `pip install peft`" if adapter else ""),
        f"tokenizer = AutoTokenizer.from_pretrained({str(settings.out)!r})",
        "```",
        "",
    ]
    return "\n".join(lines)


def _perplexity_line(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "- no held-out evaluation"
    return f"- held-out perplexity: {before:.2f} before → {after:.2f} after"


def write_report(out: Path, settings: FinetuneSettings, base: str, data: DataSummary, state: TrainerState,
                 stopped: str) -> None:
    """Write loss_curve.png and README.md into the run folder."""
    plot_loss_curve(state, out / "loss_curve.png")
    atomic_write_text(out / "README.md", model_card(settings, base, data, state, stopped))
