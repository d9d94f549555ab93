"""Plan a fine-tuning run to fit a memory budget, before the model loads (`rugpt finetune --max-memory`, `--plan`).

The planner keeps what the user fixed (micro-batch, checkpointing, optimizer) and searches the rest, the
fastest plan first: for each optimizer (AdamW, then the lighter ones: the loss curve changes least), without
then with gradient checkpointing (a third more compute), the largest micro-batch that divides the batch and
does not pass what saturates the device (CPU: one block of 1024 tokens; GPU: 8192 tokens), down to 1. The
first plan whose estimate (training/memory.py) fits is the plan. When none fits, one sentence says what would:
LoRA, an int8 base, or a shorter block.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from rugpt.errors import UsageError
from rugpt.training.memory import Activations, MemoryEstimate, ModelShape, RunShape, estimate, measure_activations
from rugpt.training.model_prep import LoraSpec, default_lora_targets
from rugpt.training.optimizers import unavailable
from rugpt.training.schedule import BatchPlan, plan_batches
from rugpt.training.settings import FinetuneSettings, Method, Optimizer, Precision, parse_size

log = logging.getLogger(__name__)

# Tokens per forward pass past which a bigger micro-batch no longer runs faster: a CPU's matrix products are
# saturated by one block, a GPU's by a few thousand tokens.
SATURATING_TOKENS = {"cpu": 1024, "cuda": 8192}
BUDGET_SHARE = 0.9  # of the free memory, when no --max-memory is given
CUDA_CONTEXT = 600 * 2**20  # CUDA context and the caching allocator's slack, outside max_memory_allocated


@dataclass(frozen=True)
class TrainingPlan:
    """What a run will do to fit the budget, and what it is estimated to take."""

    batch: BatchPlan
    gradient_checkpointing: bool
    optimizer: Optimizer
    block_size: int
    estimate: MemoryEstimate
    baseline: int  # what the process holds before the model loads (CPU: its resident memory now)
    budget: int

    @property
    def peak(self) -> int:
        return self.baseline + self.estimate.total

    def describe(self) -> str:
        """The plan in a few lines, for the CLI and the log."""
        b = self.batch
        lines = [f"plan: micro-batch {b.micro} × {b.accumulation} accumulated × {b.processes} "
                 f"process{'es' if b.processes > 1 else ''} of {self.block_size} tokens, "
                 f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                 f"{self.optimizer.value}, loss in chunks",
                 f"estimated peak {gb(self.peak)} of {gb(self.budget)} allowed:"]
        rows = [("runtime (process before loading)", self.baseline), *self.estimate.rows()]
        lines += [f"  {name:34s} {gb(size):>9s}" for name, size in rows if size]
        return "\n".join(lines)


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def plan_finetune(settings: FinetuneSettings, processes: int = 1, device_type: str | None = None,
                  pinned_optimizer: Optimizer | None = None, budget: int | None = None) -> TrainingPlan:
    """The plan for `settings` on this machine: reads the model's config only (no weights). `budget` (bytes)
    overrides --max-memory; `pinned_optimizer` is a resumed run's."""
    import torch

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = ModelShape.from_config(model_config(settings.model))
    from rugpt.training.data import resolve_block_size

    block = resolve_block_size(settings.block_size, shape.context)
    run = RunShape(block=block, lora=lora_spec(settings, shape.config.model_type),
                   quantize_base=settings.quantize_base, device_type=device_type,
                   autocast=_autocast_dtype(settings.precision, device_type))
    if budget is None:
        budget = parse_size(settings.max_memory) if settings.max_memory else default_budget(device_type)
    return choose_plan(settings, processes, shape, run, budget, _baseline(device_type), pinned_optimizer)


def model_config(model: str | None):
    """The model's config, from its folder or the Hugging Face cache (fetching config.json alone if needed)."""
    from transformers import AutoConfig

    from rugpt.architectures import register
    from rugpt.models import BUNDLED_DIR, resolve

    register()
    source = resolve(model)
    if source == "bundled":
        source = str(BUNDLED_DIR)
    if source.endswith(".gguf"):  # the shape is in the file's metadata; no weights are read for a plan
        from pathlib import Path

        from rugpt.gguf_checkpoint import gpt2_config, load_gguf

        return gpt2_config(load_gguf(Path(source), str(model)))
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the config of model={model!r} to plan memory: {str(exc).splitlines()[0]}") \
            from None


def lora_spec(settings: FinetuneSettings, model_type: str) -> LoraSpec | None:
    if settings.method != Method.lora:
        return None
    return LoraSpec(tuple(settings.lora_targets) or default_lora_targets(model_type), settings.lora_r,
                    settings.lora_alpha, settings.lora_dropout)


def default_budget(device_type: str) -> int:
    """What the device has free now, less 10%: CUDA's free memory, or MemAvailable plus this process's own."""
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * BUDGET_SHARE)
    return int((_meminfo("MemAvailable") + _own_resident()) * BUDGET_SHARE)


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _own_resident() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _baseline(device_type: str) -> int:
    return CUDA_CONTEXT if device_type == "cuda" else _own_resident()


def _autocast_dtype(precision: Precision, device_type: str):
    import torch

    if precision == Precision.auto:
        if device_type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {Precision.no: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision]


def _micro_batches(settings: FinetuneSettings, processes: int, block: int, device_type: str) -> list[int]:
    """Micro-batch sizes to try, largest first: the one given, or divisors of the per-process batch up to what
    saturates the device."""
    if settings.micro_batch_size:
        return [settings.micro_batch_size]
    per_process = max(1, settings.batch_size // processes)
    cap = max(1, SATURATING_TOKENS.get(device_type, 1024) // block)
    return [m for m in range(min(per_process, cap), 0, -1) if per_process % m == 0]


def _optimizers(settings: FinetuneSettings, device_type: str, pinned: Optimizer | None) -> list[Optimizer]:
    chosen = pinned or settings.optimizer
    if chosen != Optimizer.auto:
        reason = unavailable(chosen, device_type)
        if reason:
            raise UsageError(reason)
        return [chosen]
    lighter = [o for o in (Optimizer.adamw8bit, Optimizer.adafactor) if unavailable(o, device_type) is None]
    return [Optimizer.adamw, *lighter]


def choose_plan(settings: FinetuneSettings, processes: int, shape: ModelShape, run: RunShape, budget: int,
                baseline: int, pinned_optimizer: Optimizer | None = None,
                activations: Activations | None = None) -> TrainingPlan:
    """The fastest plan that fits `budget` (module docstring), or a UsageError saying what would fit."""
    activations = activations or measure_activations(shape, run)
    checkpointing = [settings.gradient_checkpointing] if settings.gradient_checkpointing is not None \
        else [False, True]
    candidates = [(o, c, m) for o in _optimizers(settings, run.device_type, pinned_optimizer) for c in checkpointing
                  for m in _micro_batches(settings, processes, run.block, run.device_type)]
    plans = [_plan(settings, processes, shape, run, activations, budget, baseline, *c) for c in candidates]
    for plan in plans:
        if plan.peak <= budget:
            log.info("%s", plan.describe())
            return plan
    smallest = min(plans, key=lambda p: p.peak)
    raise UsageError(_refusal(settings, smallest, shape, run, budget, baseline))


def _plan(settings, processes, shape, run, activations, budget, baseline, optimizer, checkpointing, micro):
    return TrainingPlan(batch=plan_batches(settings, processes, micro), gradient_checkpointing=checkpointing,
                        optimizer=optimizer, block_size=run.block, budget=budget, baseline=baseline,
                        estimate=estimate(shape, run, activations, micro, checkpointing, optimizer))


def _refusal(settings: FinetuneSettings, smallest: TrainingPlan, shape: ModelShape, run: RunShape, budget: int,
             baseline: int) -> str:
    """One sentence: the smallest plan's estimate against the budget, and the first change that fits."""
    head = (f"fine-tuning this model needs about {gb(smallest.peak)} even at micro-batch {smallest.batch.micro}"
            f"{' with gradient checkpointing' if smallest.gradient_checkpointing else ''} and "
            f"{smallest.optimizer.value}, over the {gb(budget)} allowed (--max-memory)")
    for flag, changed_settings, changed_run in _alternatives(settings, shape, run):
        try:
            plan = choose_plan(changed_settings, smallest.batch.processes, shape, changed_run, budget, baseline)
        except UsageError:
            continue
        return f"{head}; {flag} would fit (about {gb(plan.peak)})"
    return f"{head}; give a larger --max-memory or use a machine with more memory"


def _alternatives(settings: FinetuneSettings, shape: ModelShape, run: RunShape):
    """(flag, settings, run) to try, most faithful to the request first."""
    free = {"micro_batch_size": None, "gradient_checkpointing": None, "optimizer": Optimizer.auto}
    loose = replace(settings, **free)
    if any(getattr(settings, k) != v for k, v in free.items()):
        yield "leaving micro-batch, checkpointing and optimizer to the planner", loose, run
    lora, lora_run = loose, run
    if settings.method == Method.full:
        lora = replace(loose, method=Method.lora, lr=None)
        lora_run = replace(run, lora=lora_spec(lora, shape.config.model_type))
        yield "--method lora", lora, lora_run
    if not settings.quantize_base:
        yield ("--method lora --quantize-base", replace(lora, quantize_base=True),
               replace(lora_run, quantize_base=True))
    block = run.block // 2
    while block >= 64:
        yield f"--block-size {block}", replace(loose, block_size=block), replace(run, block=block)
        block //= 2
