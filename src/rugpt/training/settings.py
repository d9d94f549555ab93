"""Fine-tuning settings: one dataclass, every default and help text in one place (the CLI reuses the help).

Kept free of heavy imports: the CLI reads the help texts when it starts.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rugpt.errors import UsageError


class Method(str, Enum):
    """What fine-tuning changes in the model."""

    full = "full"  # every weight
    lora = "lora"  # low-rank adapters beside chosen layers (PEFT); the base weights stay frozen


class LossOn(str, Enum):
    """Which tokens the loss is computed on."""

    all = "all"  # every token: the model learns to write texts like these
    answer = "answer"  # only from the template's last field on: the model learns to answer, not to ask


class Schedule(str, Enum):
    """How the learning rate moves after warm-up."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Optimizer(str, Enum):
    """What updates the weights; the lighter ones keep less state per parameter (see training/optimizers.py)."""

    auto = "auto"  # AdamW, unless only a lighter optimizer fits --max-memory
    adamw = "adamw"  # torch's AdamW: 8 bytes of state per trained parameter
    adamw8bit = "adamw8bit"  # bitsandbytes' 8-bit AdamW (CUDA only): 2 bytes per parameter
    adafactor = "adafactor"  # transformers' Adafactor: factored second moments, no momentum; ~0 per matrix entry


class Precision(str, Enum):
    """Arithmetic of the forward and backward passes; weights and optimizer state stay fp32."""

    auto = "auto"  # bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


DEFAULT_LR = {Method.full: 5e-5, Method.lora: 2e-4}
MAX_BLOCK_SIZE = 1024
# Settings that define what a run computes: `--resume` refuses to continue a run whose values differ (data and
# model are compared by a hash of the tokens and by the resolved model source). The rest (how long, how often
# to evaluate or save, speed knobs) may change between sessions of a run.
RUN_DEFINING = ("eval_fraction", "template", "loss_on", "block_size", "method", "lora_r", "lora_alpha",
                "lora_dropout", "lora_targets", "quantize_base", "lr", "schedule", "warmup_steps", "weight_decay",
                "batch_size", "optimizer", "max_grad_norm", "seed")


def _opt(default, text: str):
    """A setting with its default and the help text that `rugpt finetune --help` shows."""
    return field(default=default, metadata={"help": text})


@dataclass
class FinetuneSettings:
    """What to fine-tune on what, and how. `rugpt finetune --help` shows the same texts."""

    data: Path = field(metadata={"help": "training texts: a .txt file (documents separated by blank lines), a folder "
                                         "of .txt files (one document each), or a .jsonl file (one object per line, "
                                         "see --template)"})
    out: Path = field(metadata={"help": "run folder: the fine-tuned model, checkpoints, loss curve and model card"})
    model: str | None = _opt(None, "model to start from: alias, hub id or folder (default: the bundled model)")
    eval_data: Path | None = _opt(None, "held-out texts in the same format; default: a share of --data")
    eval_fraction: float = _opt(0.1, "share of documents held out for evaluation when no --eval-data; 0 = none")
    template: str | None = _opt(None, "how a .jsonl row becomes text, e.g. 'Q: {question}\\nA: {answer}'; "
                                      "default '{text}'")
    loss_on: LossOn = _opt(LossOn.all, "'all' tokens, or only the 'answer': the template's last field onwards")
    block_size: int | None = _opt(None, f"tokens per training sequence; default min(context, {MAX_BLOCK_SIZE})")
    method: Method = _opt(Method.full, "'full' fine-tuning or 'lora' adapters (PEFT)")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA scaling alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA path")
    lora_targets: tuple[str, ...] = _opt((), "module names that get LoRA adapters; default: the attention's input "
                                              "projections (GPT-2: c_attn; ruGPT-3 XL: q_proj, k_proj, v_proj)")
    quantize_base: bool = _opt(False, "LoRA: hold the frozen base's linear weights in int8 (a scale per output "
                                      "row), a quarter of fp32; the adapter still loads on the float model")
    merge: bool = _opt(False, "LoRA: merge the adapters into the weights and save a plain model")
    epochs: float = _opt(3.0, "passes over the training data (ignored when --max-steps is given)")
    max_steps: int = _opt(0, "optimizer steps to train; 0 = as many as --epochs takes")
    lr: float | None = _opt(None, "peak learning rate; default 5e-5 for full, 2e-4 for LoRA")
    schedule: Schedule = _opt(Schedule.cosine, "how the learning rate decays after warm-up")
    warmup_steps: int | None = _opt(None, "steps of linear warm-up; default 5% of the steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay on matrices")
    batch_size: int = _opt(8, "sequences per optimizer step, over all processes (the same on 1 or N processes)")
    micro_batch_size: int | None = _opt(None, "sequences per forward pass in each process; smaller values "
                                              "accumulate gradients; default: planned (see --max-memory)")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this; 0 = no clipping")
    gradient_checkpointing: bool | None = _opt(None, "recompute activations in the backward pass: less memory, "
                                                     "about a third slower; default: only when needed to fit")
    optimizer: Optimizer = _opt(Optimizer.auto, "adamw, adamw8bit (bitsandbytes, CUDA), adafactor, or auto: AdamW "
                                                "unless only a lighter one fits")
    max_memory: str | None = _opt(None, "memory one process may use, e.g. 16GB or 800MB; the plan (micro-batch, "
                                        "checkpointing, optimizer) is chosen to fit it; default: what the device has "
                                        "free, less 10%")
    precision: Precision = _opt(Precision.auto, "auto, no (fp32), bf16 or fp16 mixed precision")
    seed: int = _opt(42, "random seed: data order, initialisation of adapters, dropout")
    eval_every: int = _opt(100, "evaluate on the held-out texts every N steps (and always at the end)")
    max_eval_blocks: int = _opt(256, "evaluate on at most this many held-out blocks")
    patience: int = _opt(0, "early stopping: stop after N evaluations without a lower eval loss; 0 = off")
    save_every: int = _opt(100, "write a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _opt(2, "how many of the latest checkpoints to keep")
    resume: bool = _opt(False, "continue the run in --out from its latest checkpoint (or start it when there is none)")
    overwrite: bool = _opt(False, "replace the run already in --out")

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.eval_data = Path(self.eval_data) if self.eval_data is not None else None
        self.lora_targets = tuple(self.lora_targets)
        self.method = _choice(Method, "method", self.method)
        self.loss_on = _choice(LossOn, "loss_on", self.loss_on)
        self.schedule = _choice(Schedule, "schedule", self.schedule)
        self.precision = _choice(Precision, "precision", self.precision)
        self.optimizer = _choice(Optimizer, "optimizer", self.optimizer)
        self.lr = DEFAULT_LR[self.method] if self.lr is None else self.lr
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the first invalid setting and what is allowed."""
        checks = [
            (0 <= self.eval_fraction < 1, f"eval_fraction={self.eval_fraction} must be in [0, 1)"),
            (self.block_size is None or self.block_size >= 2, f"block_size={self.block_size} must be >= 2"),
            (self.lora_r >= 1, f"lora_r={self.lora_r} must be >= 1"),
            (self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0"),
            (0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)"),
            (all(self.lora_targets), "lora_targets must not contain empty names"),
            (not self.merge or self.method == Method.lora, "merge applies to --method lora only"),
            (not self.quantize_base or self.method == Method.lora, "quantize_base applies to --method lora only: "
                                                                  "full fine-tuning changes the base weights"),
            (self.max_memory is None or _valid_size(self.max_memory),
             f"max_memory={self.max_memory!r} is not a size; write e.g. 16GB, 12.5GiB or 800MB"),
            (self.epochs > 0 or self.max_steps > 0, f"epochs={self.epochs} must be > 0 (or give max_steps > 0)"),
            (self.max_steps >= 0, f"max_steps={self.max_steps} must be >= 0 (0 = use epochs)"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.micro_batch_size is None or self.micro_batch_size >= 1,
             f"micro_batch_size={self.micro_batch_size} must be >= 1"),
            (self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping)"),
            (self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1"),
            (self.max_eval_blocks >= 1, f"max_eval_blocks={self.max_eval_blocks} must be >= 1"),
            (self.patience >= 0, f"patience={self.patience} must be >= 0 (0 = no early stopping)"),
            (self.save_every >= 1, f"save_every={self.save_every} must be >= 1"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1"),
            (not (self.resume and self.overwrite), "give --resume or --overwrite, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_json(self) -> dict:
        """Plain JSON values (paths and choices as strings), for the run folder and resume checks."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_command(self) -> str:
        """The `rugpt finetune` command line that gives these settings (defaults left out)."""
        words = ["rugpt", "finetune", str(self.data), "--out", str(self.out)]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("data", "out", "resume", "overwrite") or value == _default(f):
                continue
            if f.name == "lr" and value == DEFAULT_LR[self.method]:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):  # a flag: on, or off against a default of "planned" (None)
                words.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, tuple):
                for item in value:
                    words += [flag, item]
            elif f.name == "template":  # as typed on the command line, where \n stands for a newline
                words += [flag, value.replace("\n", "\\n").replace("\t", "\\t")]
            else:
                words += [flag, str(_plain(value))]
        return shlex.join(words)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30,
          "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in a size such as '16GB' (10^9), '12.5GiB' or '16G' (2^30), '800MB'; a bare number is bytes."""
    match = _SIZE.match(str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise UsageError(f"max_memory={text!r} is not a size; write e.g. 16GB, 12.5GiB or 800MB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _valid_size(text: str) -> bool:
    try:
        return parse_size(text) > 0
    except UsageError:
        return False


def _choice(enum: type[Enum], name: str, value) -> Enum:
    try:
        return enum(value.value if isinstance(value, Enum) else value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise UsageError(f"{name}={value!r} is not allowed; use one of {allowed}") from None


def _plain(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
