"""Fine-tune a GPT-2-architecture model on your own texts: full or LoRA, resumable, on one process or many.

One loop for every case: accelerate's `Accelerator` wraps model and optimizer, so the same code runs as
`rugpt finetune` on one device and under `accelerate launch` / `torchrun` with data parallelism (DeepSpeed
or FSDP through an accelerate config). The global batch is set by the settings, not by the number of
processes: step s takes the same blocks on 1 or N processes, and the loss is divided by the global count of
target tokens, so N processes make the same update as one, up to the order of floating-point sums.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rugpt.errors import UsageError
from rugpt.training.checkpoints import TrainerState, load_training_state, load_weights, save_checkpoint
from rugpt.training.data import Blocks, FinetuneData, load_data
from rugpt.training.loss import IGNORE_INDEX, NextTokenLoss
from rugpt.training.memory import return_freed_memory
from rugpt.training.model_prep import prepare_for_training
from rugpt.training.optimizers import make_optimizer
from rugpt.training.plan import TrainingPlan, lora_spec, plan_finetune
from rugpt.training.report import DataSummary, perplexity, write_report
from rugpt.training.run_folder import (
    check_out_folder,
    check_same_run,
    recorded_plan,
    start_run_folder,
    write_final_model,
    write_metrics,
)
from rugpt.training.schedule import BatchPlan, DataOrder, dropout_seed, learning_rate
from rugpt.training.settings import FinetuneSettings, Method, Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingEvent:
    """What the loop reports to a progress display: kind is 'plan', 'start', 'step', 'eval' or 'checkpoint'."""

    kind: str
    step: int
    total_steps: int
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    tokens_per_second: float | None = None
    path: Path | None = None
    plan: TrainingPlan | None = None


@dataclass
class FinetuneResult:
    """How a run ended. `stopped` is 'finished', 'early stopping' or 'interrupted' (a checkpoint was saved)."""

    out: Path
    steps: int
    total_steps: int
    stopped: str
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    tokens_per_second: float
    is_main_process: bool = True

    @property
    def perplexity_before(self) -> float | None:
        return perplexity(self.eval_loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return perplexity(self.eval_loss_after)


def finetune(data: str | Path, out: str | Path, model: str | None = None, *,
             on_event: Callable[[TrainingEvent], None] | None = None, **options) -> FinetuneResult:
    """Fine-tune `model` on `data` into the run folder `out`; `options` are `FinetuneSettings` fields.

    Same as `rugpt finetune DATA --model M --out DIR`; under `accelerate launch` every process calls it.
    """
    return run_finetune(_settings(data, out, model, options), on_event)


def plan(data: str | Path, out: str | Path, model: str | None = None, **options) -> TrainingPlan:
    """What `finetune` with these arguments would do to fit memory, and its estimate; loads no weights.

    Same as `rugpt finetune DATA --model M --out DIR --plan`; raises UsageError when nothing fits.
    """
    settings = _settings(data, out, model, options)
    checkpoint = check_out_folder(settings) if settings.resume else None
    return plan_finetune(settings, pinned_optimizer=recorded_plan(settings.out) if checkpoint else None)


def _settings(data, out, model, options: dict) -> FinetuneSettings:
    names = {f.name for f in dataclasses.fields(FinetuneSettings)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown fine-tuning setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return FinetuneSettings(data=data, out=out, model=model, **options)


def _mixed_precision(precision: Precision) -> str:
    if precision == Precision.auto:
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == Precision.fp16 and not torch.cuda.is_available():
        raise UsageError("precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on a CPU")
    return precision.value


def _load_base(settings: FinetuneSettings):
    """The model to start from, on the CPU (accelerate moves it), and its source for the records: fp32, or with
    int8 block weights read straight from the files under --quantize-base."""
    from transformers.utils import logging as hf_logging

    from rugpt.models import load, resolve

    hf_logging.disable_progress_bar()
    source = resolve(settings.model)
    if Path(source).is_dir():
        source = str(Path(source).resolve())  # adapters record their base: it must load from anywhere
    if settings.quantize_base:
        from rugpt.training.quantized import load_int8_base

        return load_int8_base(source), source
    return load(source, device="cpu", dtype="float32"), source


def _prepare_model(model, settings: FinetuneSettings, plan: TrainingPlan):
    """Gradient checkpointing as planned, the int8 base and LoRA adapters as asked (training/model_prep.py)."""
    return prepare_for_training(model, lora=lora_spec(settings, model.config.model_type),
                                quantize_base=settings.quantize_base,
                                gradient_checkpointing=plan.gradient_checkpointing)


def _token_loss_sum(loss_model, blocks: Blocks, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the target tokens of `rows`, and how many there are (no GPU sync).

    `loss_model` is a `NextTokenLoss` (as prepared by accelerate): the logits are never materialised whole."""
    tokens = blocks.tokens[rows].long().to(device)
    targets = blocks.targets[rows].to(device)
    loss = loss_model(input_ids=tokens, labels=tokens.masked_fill(~targets, IGNORE_INDEX))
    return loss, targets[:, 1:].sum()


@torch.no_grad()
def evaluate(model, blocks: Blocks, accelerator, micro: int, limit: int) -> float:
    """Mean cross-entropy per target token over the first `limit` held-out blocks, shared among processes.

    Every process runs the same number of forward passes (sharded models need all of them in each one).
    """
    count, world, rank = min(limit, len(blocks)), accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, count, world))
    per_process = math.ceil(count / world)
    totals = torch.zeros(2, device=accelerator.device)
    model.eval()
    for start in range(0, per_process, micro):
        rows = mine[start:start + micro]
        loss, targets = _token_loss_sum(model, blocks, torch.tensor(rows or [0]), accelerator.device)
        if rows:
            totals += torch.stack([loss, targets.float()])
    model.train()
    if world > 1:
        totals = accelerator.reduce(totals, "sum")
    return float(totals[0] / totals[1].clamp(min=1))


class StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a request that the loop honours after the current step;
    a second Ctrl-C interrupts at once. A SIGTERM is passed on once the checkpoint is saved, so whoever sent
    it (a scheduler, `timeout`) still ends the process; after Ctrl-C the caller gets the result."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}
        self._received: int | None = None

    def _handle(self, signum, frame) -> None:
        self.requested, self._received = True, signum
        log.warning("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._received == signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)


def run_finetune(settings: FinetuneSettings,
                 on_event: Callable[[TrainingEvent], None] | None = None) -> FinetuneResult:
    """Fine-tune with ready-made settings; `finetune` is the keyword-argument version."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, set_seed

    # Launched as several processes without GPUs, accelerate must be told to use the CPU (gloo); otherwise each
    # process would train alone.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    launch = PartialState(cpu=cpu)
    checkpoint = check_out_folder(settings)
    # Sharded runs (FSDP, DeepSpeed) hold a share of the state in each process: the estimate, which assumes a
    # whole copy per process, is an upper bound there, so it plans but does not refuse.
    sharded_launch = launch.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    training_plan = plan_finetune(settings, launch.num_processes, launch.device.type,
                                  pinned_optimizer=recorded_plan(settings.out) if checkpoint else None,
                                  budget=2**62 if sharded_launch else None)
    plan = training_plan.batch
    if launch.device.type == "cpu":
        return_freed_memory()
    if launch.is_main_process and on_event:
        on_event(TrainingEvent("plan", 0, 0, plan=training_plan))
    loaded, base = _load_base(settings)
    data = load_data(settings, loaded.tokenizer, loaded.context_length)
    if settings.patience and data.heldout is None:
        raise UsageError(f"patience={settings.patience} needs held-out texts: give --eval-data or --eval-fraction > 0")
    if plan.processes == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # so a second run in the same Python session may use another precision
    accelerator = Accelerator(cpu=cpu, mixed_precision=_mixed_precision(settings.precision),
                              gradient_accumulation_steps=plan.accumulation)
    set_seed(settings.seed)  # the same adapter initialisation in every process
    model = _prepare_model(loaded.model, settings, training_plan)
    state = TrainerState(num_processes=plan.processes, data_fingerprint=data.train.fingerprint())
    if checkpoint is not None:
        check_same_run(settings, base, state.data_fingerprint, _read_state(checkpoint))
        load_weights(checkpoint, model, lora=settings.method == Method.lora)
    optimizer = make_optimizer(model, training_plan.optimizer, settings.lr, settings.weight_decay)
    model = NextTokenLoss(model)  # what accelerate wraps: the loss is computed inside the (sharded) forward
    accelerator.wait_for_everyone()  # every process has checked `out` before the first one writes there
    if accelerator.is_main_process:
        start_run_folder(settings, base, training_plan, resuming=checkpoint is not None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed sizes its buffers from the micro-batch, which accelerate otherwise reads from a dataloader.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = plan.micro
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.gradient_accumulation_steps != plan.accumulation:  # a DeepSpeed config can override it
        raise UsageError(f"the DeepSpeed config sets gradient_accumulation_steps="
                         f"{accelerator.gradient_accumulation_steps}, but batch_size / (micro_batch_size × processes)"
                         f" = {plan.accumulation}; leave it out of the accelerate config, or set it to that")
    if checkpoint is not None:
        state = load_training_state(checkpoint, accelerator, optimizer)
        log.info("resuming from %s", checkpoint)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    loop = _Loop(settings, accelerator, model, optimizer, data, plan, state, on_event, sharded)
    stopped = loop.run()
    if stopped != "interrupted":
        write_final_model(accelerator, model, loaded.tokenizer, settings, base)
        if accelerator.is_main_process:
            _write_outputs(settings, base, data, state, stopped, loop)
    accelerator.wait_for_everyone()
    return loop.result(stopped)


def _read_state(checkpoint: Path) -> TrainerState:
    return TrainerState.from_json(json.loads((checkpoint / "state.json").read_text()))


class _Loop:
    """The training loop and its bookkeeping; one instance per run."""

    def __init__(self, settings, accelerator, model, optimizer, data: FinetuneData, plan: BatchPlan,
                 state: TrainerState, on_event, sharded_optimizer: bool):
        self.settings, self.accelerator, self.model, self.optimizer = settings, accelerator, model, optimizer
        self.data, self.plan, self.state, self.sharded = data, plan, state, sharded_optimizer
        self.on_event = on_event if accelerator.is_main_process and on_event else (lambda event: None)
        self.global_batch = settings.batch_size
        blocks = len(data.train)
        self.total = settings.max_steps or math.ceil(settings.epochs * blocks / self.global_batch)
        self.warmup = settings.warmup_steps if settings.warmup_steps is not None else round(0.05 * self.total)
        self.order = DataOrder(blocks, self.global_batch, settings.seed)
        self.session_tokens, self.started = 0, time.monotonic()
        self.elapsed_before = state.elapsed
        self.saved_step = state.step if state.step else -1

    @property
    def tokens_per_second(self) -> float:
        return self.session_tokens / max(time.monotonic() - self.started, 1e-9)

    def run(self) -> str:
        settings, state = self.settings, self.state
        log.info("fine-tuning: %d steps of %d sequences × %d tokens (%d per forward pass, %d accumulated, "
                 "%d processes)", self.total, self.global_batch, self.data.block_size, self.plan.micro,
                 self.plan.accumulation, self.plan.processes)
        self.on_event(TrainingEvent("start", state.step, self.total))
        if self.data.heldout is not None and state.step == 0 and state.eval_loss_before is None:
            state.eval_loss_before = self._evaluate()
        stopped = "finished"
        with StopRequest() as stop:
            while state.step < self.total and stopped == "finished":
                if settings.patience and state.evals_without_improvement >= settings.patience:
                    stopped = "early stopping"
                    break
                loss, interrupted = self._step(stop)
                self.on_event(TrainingEvent("step", state.step, self.total, loss=loss, lr=state.history[-1]["lr"],
                                            tokens_per_second=self.tokens_per_second))
                if self.data.heldout is not None and (state.step % settings.eval_every == 0
                                                      or state.step == self.total):
                    self._record_eval(self._evaluate())
                if interrupted:
                    stopped = "interrupted"
                elif settings.patience and state.evals_without_improvement >= settings.patience:
                    stopped = "early stopping"
                if state.step % settings.save_every == 0 or stopped != "finished":
                    self._save()
        if self.saved_step != state.step:
            self._save()
        return stopped

    def _step(self, stop: StopRequest) -> tuple[float, bool]:
        """One optimizer step over the global batch; returns its mean loss and whether any process must stop."""
        settings, state, accelerator, plan = self.settings, self.state, self.accelerator, self.plan
        rows = self.order.rows(state.step)
        targets = int(self.data.train.targets[rows, 1:].sum())
        scale = plan.processes * plan.accumulation / max(targets, 1)  # see the module docstring
        lr = learning_rate(settings, state.step, self.total, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro_step in range(plan.accumulation):
            chunk = micro_step * plan.processes + accelerator.process_index  # its place in the global batch
            first = chunk * plan.micro
            torch.manual_seed(dropout_seed(settings.seed, state.step, chunk))
            with accelerator.accumulate(self.model):
                loss, _ = _token_loss_sum(self.model, self.data.train, rows[first:first + plan.micro],
                                          accelerator.device)
                accelerator.backward(loss * scale)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        report = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=loss_sum.device)])
        if plan.processes > 1:
            report = accelerator.reduce(report, "sum")
        mean_loss = float(report[0]) / max(targets, 1)
        state.step += 1
        tokens = self.global_batch * self.data.block_size
        state.tokens_seen += tokens
        self.session_tokens += tokens
        state.history.append({"step": state.step, "loss": round(mean_loss, 6), "lr": lr})
        return mean_loss, bool(report[1] > 0)

    def _evaluate(self) -> float:
        return evaluate(self.model, self.data.heldout, self.accelerator, self.plan.micro,
                        self.settings.max_eval_blocks)

    def _record_eval(self, loss: float) -> None:
        state = self.state
        state.evals.append({"step": state.step, "eval_loss": round(loss, 6)})
        if state.best_eval_loss is None or loss < state.best_eval_loss:
            state.best_eval_loss, state.evals_without_improvement = loss, 0
        else:
            state.evals_without_improvement += 1
        self.on_event(TrainingEvent("eval", state.step, self.total, eval_loss=loss))

    def _save(self) -> None:
        self.state.elapsed = self.elapsed_before + time.monotonic() - self.started
        path = save_checkpoint(self.accelerator, self.settings.out, self.model, self.optimizer, self.state,
                               self.settings.keep_checkpoints, self.sharded)
        self.saved_step = self.state.step
        self.on_event(TrainingEvent("checkpoint", self.state.step, self.total, path=path))

    def result(self, stopped: str) -> FinetuneResult:
        state = self.state
        return FinetuneResult(
            out=self.settings.out, steps=state.step, total_steps=self.total, stopped=stopped,
            train_loss=state.history[-1]["loss"] if state.history else None,
            eval_loss_before=state.eval_loss_before,
            eval_loss_after=state.evals[-1]["eval_loss"] if state.evals else None,
            tokens_per_second=self.tokens_per_second, is_main_process=self.accelerator.is_main_process)


def _write_outputs(settings: FinetuneSettings, base: str, data: FinetuneData, state: TrainerState, stopped: str,
                   loop: _Loop) -> None:
    heldout = data.heldout
    summary = DataSummary(data.train.documents, data.train.token_count, heldout.documents if heldout else 0,
                          heldout.token_count if heldout else 0, data.block_size)
    write_report(settings.out, settings, base, summary, state, stopped)
    result = loop.result(stopped)
    write_metrics(settings.out, {
        "stopped": stopped, "steps": state.step, "total_steps": loop.total, "train_loss": result.train_loss,
        "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
        "perplexity_before": result.perplexity_before, "perplexity_after": result.perplexity_after,
        "tokens_seen": state.tokens_seen, "tokens_per_second": round(result.tokens_per_second, 1),
        "data": dataclasses.asdict(summary), "history": state.history, "evals": state.evals,
    })
