"""The run folder (`--out`): refuse to clobber another run, check that a resumed run is the same run,
and write the final model, its metrics and report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rugpt.atomic import atomic_write_text
from rugpt.errors import UsageError
from rugpt.training.checkpoints import CHECKPOINTS, TrainerState, latest_checkpoint, remove_partial, unwrapped_model
from rugpt.training.settings import RUN_DEFINING, FinetuneSettings, Method, Optimizer

RUN_FILE = "finetune.json"  # what marks a folder as a rugpt fine-tuning run


def is_run(out: Path) -> bool:
    return (out / RUN_FILE).is_file() or (out / CHECKPOINTS).is_dir()


def check_out_folder(settings: FinetuneSettings) -> Path | None:
    """The checkpoint to resume from (None: start afresh), or a UsageError when `out` must not be touched.

    Only reads: nothing is deleted or written here, so an error leaves an earlier run whole.
    """
    out = settings.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={str(out)!r} is a file; give a folder for the run")
    holds_run = is_run(out)
    if out.is_dir() and any(out.iterdir()) and not holds_run:
        raise UsageError(f"out={str(out)!r} is not empty and holds no fine-tuning run; give a new or empty folder "
                         f"(rugpt deletes nothing that it did not write)")
    if settings.resume:
        return latest_checkpoint(out)
    if holds_run and not settings.overwrite:
        latest = latest_checkpoint(out)
        where = f"its latest checkpoint is {latest.name}" if latest else "it has no checkpoint yet"
        raise UsageError(f"out={str(out)!r} holds another run ({where}); pass --resume to continue it "
                         f"or --overwrite to replace it")
    return None


def check_same_run(settings: FinetuneSettings, base: str, fingerprint: str, state: TrainerState) -> None:
    """Refuse to resume with settings, model or data that differ from the run's: the result would be neither."""
    if not (settings.out / RUN_FILE).is_file():
        raise UsageError(f"cannot resume the run in {str(settings.out)!r}: its {RUN_FILE} is missing; "
                         f"use --overwrite to start over")
    recorded = json.loads((settings.out / RUN_FILE).read_text())
    now, defaults = settings.to_json(), _defaults()
    # A setting added after the run started is compared as its default
    was = {k: recorded["settings"].get(k, defaults.get(k)) for k in RUN_DEFINING}
    changed = [f"{k}: {was[k]!r} → {now[k]!r}" for k in RUN_DEFINING if was[k] != now[k]]
    if recorded.get("base_model") != base:
        changed.append(f"model: {recorded.get('base_model')!r} → {base!r}")
    if state.data_fingerprint != fingerprint:
        changed.append("data: the texts (or how they are split and tokenised) differ")
    if changed:
        raise UsageError(f"cannot resume the run in {str(settings.out)!r}: {'; '.join(changed)}; "
                         f"use the run's settings, or --overwrite to start over")


def _defaults() -> dict:
    return FinetuneSettings(data=Path("d"), out=Path("o")).to_json()


def recorded_plan(out: Path) -> Optimizer | None:
    """The optimizer a run in `out` was planned with (a resumed run keeps it: its state is in the checkpoint)."""
    try:
        return Optimizer(json.loads((Path(out) / RUN_FILE).read_text())["plan"]["optimizer"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def start_run_folder(settings: FinetuneSettings, base: str, plan, resuming: bool) -> None:
    """Make `out` ready (main process only, after every check has passed): clear a replaced run, record settings
    and the memory plan (a `TrainingPlan`)."""
    out = settings.out
    if settings.overwrite and is_run(out):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_partial(out)
    if not resuming:
        record = {"settings": settings.to_json(), "base_model": base,
                  "plan": {"micro_batch_size": plan.batch.micro, "accumulation": plan.batch.accumulation,
                           "gradient_checkpointing": plan.gradient_checkpointing,
                           "optimizer": plan.optimizer.value, "estimated_peak_bytes": plan.peak,
                           "budget_bytes": plan.budget}}
        atomic_write_text(out / RUN_FILE, json.dumps(record, ensure_ascii=False, indent=1))


def write_final_model(accelerator, model, tokenizer, settings: FinetuneSettings, base: str) -> None:
    """Save the result where `from_pretrained(out)` finds it: full weights, a merged model or a LoRA adapter."""
    unwrapped, state_dict = unwrapped_model(accelerator, model)  # collective under FSDP / DeepSpeed
    if not accelerator.is_main_process:
        return
    if settings.method == Method.lora and settings.merge and settings.quantize_base:
        _merge_onto_float_base(unwrapped, base).save_pretrained(settings.out)
    elif settings.method == Method.lora and settings.merge:
        unwrapped.merge_and_unload().save_pretrained(settings.out)
    else:
        unwrapped.save_pretrained(settings.out, state_dict=state_dict)
    tokenizer.save_pretrained(settings.out)


def _merge_onto_float_base(peft_model, base: str):
    """The adapter trained over an int8 base, merged into the original float weights (not the rounded ones):
    the float model is loaded for this, as plain PEFT would."""
    import tempfile

    from peft import PeftModel

    from rugpt.models import load

    with tempfile.TemporaryDirectory() as adapter:
        peft_model.save_pretrained(adapter)
        float_model = load(base, device="cpu", dtype="float32").model
        return PeftModel.from_pretrained(float_model, adapter).merge_and_unload()


def write_metrics(out: Path, metrics: dict) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=1))
