"""What each optimizer step takes: how the global batch is split, which blocks, what learning rate, which
dropout seed. All of it is a function of the settings and the step number, so a resumed run, or the same run
on another number of processes, takes exactly the same steps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from rugpt.errors import UsageError
from rugpt.training.settings import FinetuneSettings, Schedule


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: micro-batches per process, and how many of them make one step."""

    micro: int
    accumulation: int
    processes: int


def plan_batches(settings: FinetuneSettings, processes: int, micro: int | None = None) -> BatchPlan:
    """Split `batch_size` sequences per step into micro-batches (`micro`, else the settings', else the whole
    per-process batch) per process and accumulation steps."""
    micro = micro or settings.micro_batch_size or max(1, settings.batch_size // processes)
    if settings.batch_size % (micro * processes):
        raise UsageError(f"batch_size={settings.batch_size} must be a multiple of micro_batch_size × processes "
                         f"= {micro} × {processes}; change --batch-size or --micro-batch-size")
    return BatchPlan(micro, settings.batch_size // (micro * processes), processes)


def scheduled_lr(peak: float, step: int, warmup: int, progress: float, shape: Schedule,
                 floor: float = 0.0) -> float:
    """The learning-rate schedule of every rugpt trainer: linear warm-up to `peak` over the first `warmup`
    steps, then `shape` (cosine, linear or constant) from `peak` down to `floor` as `progress` goes 0 → 1.

    Warm-up counts from 1/warmup, not 0, so the first step already learns (transformers' get_scheduler starts
    at 0). `progress` is the caller's: share of the steps after warm-up (fine-tuning) or of the wall-clock
    budget (pre-training). A function of its arguments only, so a resumed run needs no scheduler state.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(max(progress, 0.0), 1.0)
    if shape == Schedule.cosine:
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if shape == Schedule.linear:
        return floor + (peak - floor) * (1 - progress)
    return peak


def learning_rate(settings: FinetuneSettings, step: int, total: int, warmup: int) -> float:
    """Fine-tuning's rate at `step` of `total`: the schedule decays towards 0 at the last step."""
    return scheduled_lr(settings.lr, step, warmup, (step - warmup) / max(1, total - warmup), settings.schedule)


class DataOrder:
    """Which training blocks step s uses: seeded permutations, one per epoch, read as one endless stream.

    The order is a function of (seed, step) alone, so a resumed run takes exactly the blocks it would have.
    """

    def __init__(self, blocks: int, batch_size: int, seed: int):
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def rows(self, step: int) -> torch.Tensor:
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, index = divmod(position, self.blocks)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.blocks, generator=generator)
            out.append(int(self._perm[index]))
        return torch.tensor(out, dtype=torch.long)


def dropout_seed(seed: int, step: int, chunk: int) -> int:
    """The random seed of one micro-batch. Dropout then depends on what is computed, not on which process
    computes it or what ran before: N processes match one, and a resumed run matches an uninterrupted one."""
    digest = hashlib.sha256(f"{seed}:{step}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
