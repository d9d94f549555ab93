"""Checkpoints of a fine-tuning run: written atomically, the last K kept, the latest found and restored exactly.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding
  model/            the weights (full model) or the adapter (LoRA), loadable with `from_pretrained`
  optimizer-R.pt    AdamW state: one file from process 0, or one per process when the optimizer is sharded
  state.json        step, losses, early-stopping counters, a hash of the data
The folder appears under its final name only when complete (`atomic_write_dir`), so a crash while writing
leaves the previous checkpoint as the latest. Data order and dropout need no saved random state: both are
functions of seed and step (see finetune.py), so a resumed run continues exactly.
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
    history: list[dict] = field(default_factory=list)  # one {"step", "loss", "lr"} per optimizer step
    evals: list[dict] = field(default_factory=list)  # one {"step", "eval_loss"} per evaluation

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


def save_checkpoint(accelerator, out: Path, model, optimizer, state: TrainerState, keep: int,
                    sharded_optimizer: bool) -> Path:
    """Write a checkpoint from every process (each adds its own part) and make it the latest atomically."""
    from accelerate.utils import broadcast_object_list

    target = Path(out) / CHECKPOINTS / f"step-{state.step:06d}"
    full_state = accelerator.get_state_dict(model)  # collective under FSDP / DeepSpeed: every process calls it
    rank = accelerator.process_index

    def write_parts(folder: Path) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(folder / "model", state_dict=full_state)
            (folder / "state.json").write_text(json.dumps(dataclasses.asdict(state)))
        if sharded_optimizer or accelerator.is_main_process:
            torch.save(optimizer.state_dict(), folder / f"optimizer-{rank}.pt")

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
    own = folder / f"optimizer-{accelerator.process_index}.pt"
    # security: weights_only refuses pickled code; these files hold tensors and numbers only.
    optimizer.load_state_dict(torch.load(own if own.exists() else folder / "optimizer-0.pt", weights_only=True))
    state = TrainerState.from_json(json.loads((folder / "state.json").read_text()))
    state.num_processes = accelerator.num_processes
    return state
