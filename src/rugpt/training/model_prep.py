"""Turn a loaded causal LM into the module a trainer runs: memory-light GELU, gradient checkpointing, an int8
base and LoRA adapters. The memory planner's probe runs the same function, so what it measures is what trains.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from rugpt.errors import UsageError

# The attention's input projections of each architecture rugpt loads (PEFT's own table lacks ruGPT-3 XL).
DEFAULT_LORA_TARGETS = {"gpt2": ("c_attn",), "rugpt3xl": ("q_proj", "k_proj", "v_proj")}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters: which linear layers, rank, scaling alpha and dropout."""

    targets: tuple[str, ...]
    rank: int
    alpha: float = 16
    dropout: float = 0.05


def default_lora_targets(model_type: str) -> tuple[str, ...]:
    if model_type not in DEFAULT_LORA_TARGETS:
        raise UsageError(f"no default LoRA targets for model type {model_type!r}; name the layers with --lora-targets")
    return DEFAULT_LORA_TARGETS[model_type]


def use_fused_gelu(model: torch.nn.Module) -> int:
    """Swap transformers' `gelu_new` (tanh GELU written as five tensor ops, four of them saved for backward)
    for torch's fused tanh GELU: the same function (within 2e-7), one saved tensor. Returns how many."""
    from transformers.activations import ACT2FN, NewGELUActivation

    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, NewGELUActivation)]
    for name, _ in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ACT2FN["gelu_pytorch_tanh"])
    return len(swaps)


def prepare_for_training(model, *, lora: LoraSpec | None, quantize_base: bool, gradient_checkpointing: bool):
    """The module to train (a PEFT model under LoRA), in train mode, caching off."""
    model.config.use_cache = False
    use_fused_gelu(model)
    if quantize_base:
        from rugpt.training.quantized import quantize_linears

        quantize_linears(model)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if lora is not None:
        model = _with_lora(model, lora, quantize_base)
    model.train()
    return model


def _with_lora(model, lora: LoraSpec, quantize_base: bool):
    from peft import LoraConfig, get_peft_model

    # GPT-2's Conv1D layers store weights as (in, out): LoRA must know to transpose. An int8 base is nn.Linear.
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), task_type="CAUSAL_LM",
                        fan_in_fan_out=model.config.model_type == "gpt2" and not quantize_base)
    try:
        with warnings.catch_warnings():  # peft still calls transformers' renamed checkpointing query
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise UsageError(f"lora_targets={list(lora.targets)} do not fit the model: {exc}") from None
    if quantize_base and model.config.model_type == "gpt2":
        # The saved adapter is for the float checkpoint, whose layers are Conv1D: say so in its config (the
        # layers made above keep their own flag; only what is saved changes).
        peft_model.peft_config["default"].fan_in_fan_out = True
    return peft_model
