"""The optimizers every rugpt trainer uses, and the one rule for which parameters get weight decay.

AdamW keeps two fp32 moments per trained parameter (8 bytes: for ruGPT-3 large, 6 GB on top of 3 GB of
weights and 3 GB of gradients). The lighter choices, picked by the planner when AdamW does not fit:
- `adamw8bit`: bitsandbytes' AdamW with block-wise 8-bit moments (2 bytes per parameter); CUDA only.
- `adafactor`: transformers' Adafactor without momentum: a row and a column of second moments per matrix,
  so almost nothing per matrix entry (Shazeer & Stern 2018). rugpt drives its learning rate like AdamW's
  (relative_step=False, scale_parameter=False), so --lr and the schedule mean the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rugpt.errors import UsageError
from rugpt.training.settings import Optimizer

# Position tables are looked up, not multiplied: decaying them pulls positions together (nanoGPT decays every
# matrix; GPT-2's and rugpt's own recipe leave the position table alone).
_POSITION_TABLES = ("wpe.", "embed_positions.", "position_embeddings.")


def decays(name: str, parameter: torch.Tensor) -> bool:
    """The weight-decay rule: matrices (linear weights, token embeddings) decay; biases, norms and position
    tables do not."""
    return parameter.dim() >= 2 and not any(table in name for table in _POSITION_TABLES)


def parameter_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: with `weight_decay` and without (empty groups left out)."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if not decays(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def unavailable(kind: Optimizer, device_type: str) -> str | None:
    """Why `kind` cannot run here (one sentence), or None when it can."""
    if kind != Optimizer.adamw8bit:
        return None
    if device_type != "cuda":
        return "8-bit AdamW (bitsandbytes) needs a CUDA GPU; use --optimizer adafactor on this machine"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "8-bit AdamW needs bitsandbytes: pip install bitsandbytes (or use --optimizer adafactor)"
    return None


def make_optimizer(model: torch.nn.Module, kind: Optimizer, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The optimizer `kind` (not auto) over the trainable parameters of `model`, grouped by `decays`."""
    groups = parameter_groups(model.named_parameters(), weight_decay)
    device_type = groups[0]["params"][0].device.type if groups else "cpu"
    reason = unavailable(kind, device_type)
    if reason:
        raise UsageError(reason)
    if kind == Optimizer.adamw:
        # fused: one kernel per step, no temporary the size of the parameters (CPU and CUDA, fp32 and half)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))
    if kind == Optimizer.adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if kind == Optimizer.adamw8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)
    raise UsageError(f"optimizer={kind.value!r} must be resolved by the planner before an optimizer is made")
