"""Checkpoints of a training run (fine-tuning and pre-training alike): written atomically, the last K kept,
the latest found and restored exactly.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding
  model/            the weights (full model) or the adapter (LoRA), loadable with `from_pretrained`
  optimizer-R.pt    optimizer state: one file from process 0, or one per process when the optimizer is sharded
  state.json        step, losses, early-stopping counters, a hash of the data
The folder appears under its final name only when complete (`atomic_write_dir`), so a crash while writing
leaves the previous checkpoint as the latest. Data order and dropout need no saved random state: both are
functions of seed and step (see schedule.py), so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rugpt.atomic import atomic_write_dir
from rugpt.training.loss import NextTokenLoss

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Progress of a run: everything besides weights, optimizer and random state needed to continue it."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    eval_loss_before: float | None = None
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    num_processes: int = 1
    data_fingerprint: str = ""
    history: list[dict] = field(default_factory=list)  # one {"step", "loss", "lr"} per optimizer step (or logged step)
    evals: list[dict] = field(default_factory=list)  # one {"step", "eval_loss", ...} per evaluation

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def remove_partial(out: Path) -> None:
    """Delete what a crash left behind: temp folders of unfinished writes and half-deleted old checkpoints."""
    root = Path(out) / CHECKPOINTS
    for leftover in root.glob(".*") if root.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)


def prune(out: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints. Each old one is renamed first, so a crash never leaves half of one
    under a checkpoint name."""
    for old in checkpoint_dirs(out)[:-keep]:
        doomed = old.with_name(f".deleting-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def step_folder(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def _write_parts(folder: Path, model, state_dict: dict | None, optimizer, state: TrainerState, rank: int,
                 main: bool, own_optimizer_file: bool) -> None:
    if main:
        model.save_pretrained(folder / "model", state_dict=state_dict)
        (folder / "state.json").write_text(json.dumps(dataclasses.asdict(state)))
    if own_optimizer_file or main:
        torch.save(optimizer.state_dict(), folder / f"optimizer-{rank}.pt")


def save_checkpoint(accelerator, out: Path, model, optimizer, state: TrainerState, keep: int,
                    sharded_optimizer: bool) -> Path:
    """Write a checkpoint from every process (each adds its own part) and make it the latest atomically.

    `model` is what accelerate prepared: the language model, or the `NextTokenLoss` wrapped around it."""
    from accelerate.utils import broadcast_object_list

    target = step_folder(out, state.step)
    language_model, full_state = unwrapped_model(accelerator, model)  # collective under FSDP / DeepSpeed
    rank = accelerator.process_index

    def write_parts(folder: Path) -> None:
        _write_parts(folder, language_model, full_state, optimizer, state, rank, accelerator.is_main_process,
                     sharded_optimizer)

    if accelerator.is_main_process:
        with atomic_write_dir(target) as tmp:
            if accelerator.num_processes > 1:
                broadcast_object_list([str(tmp)])
            write_parts(tmp)
            accelerator.wait_for_everyone()  # the others have written their parts into tmp
        prune(out, keep)
    else:
        shared = broadcast_object_list([None])
        write_parts(Path(shared[0]))
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()  # nobody goes on before the checkpoint has its final name
    return target


def save_local_checkpoint(out: Path, model, optimizer, state: TrainerState, keep: int) -> Path:
    """The same checkpoint from one process without accelerate (the pre-training recipe)."""
    target = step_folder(out, state.step)
    with atomic_write_dir(target) as tmp:
        _write_parts(tmp, model, None, optimizer, state, 0, main=True, own_optimizer_file=False)
    prune(out, keep)
    return target


def unwrapped_model(accelerator, prepared) -> tuple[object, dict]:
    """The language model inside what accelerate prepared, and its full state dict (keys of the language model;
    a collective call under FSDP / DeepSpeed, so every process makes it)."""
    state = accelerator.get_state_dict(prepared)
    inner = accelerator.unwrap_model(prepared)
    language_model = inner.model if isinstance(inner, NextTokenLoss) else inner
    if language_model is not inner and state is not None:
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return language_model, state


def load_weights(folder: Path, model, lora: bool) -> None:
    """Restore a checkpoint's weights (or adapter) into the not-yet-prepared model."""
    from safetensors.torch import load_file

    files = sorted((folder / "model").glob("*.safetensors"))
    weights = {k: v for f in files for k, v in load_file(f).items()}
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise RuntimeError(f"checkpoint {folder} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_training_state(folder: Path, accelerator, optimizer) -> TrainerState:
    """Restore the optimizer (call after `accelerator.prepare`) and return the progress."""
    state = load_optimizer_and_state(folder, optimizer, accelerator.process_index)
    state.num_processes = accelerator.num_processes
    return state


def load_optimizer_and_state(folder: Path, optimizer, rank: int = 0) -> TrainerState:
    """Restore this process's optimizer state (its own file, else process 0's) and return the progress."""
    own = folder / f"optimizer-{rank}.pt"
    # security: weights_only refuses pickled code; these files hold tensors and numbers only.
    optimizer.load_state_dict(torch.load(own if own.exists() else folder / "optimizer-0.pt", weights_only=True))
    return TrainerState.from_json(json.loads((folder / "state.json").read_text()))
