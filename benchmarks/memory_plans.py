"""Which ruGPT models fit a 16 GB GPU and a 24 GB laptop, and how: the planner's estimates (no training, no
weights: the configs are built on the meta device), for the README's table.

GPU rows are planned for CUDA with bf16 autocast. Where no GPU is at hand the activation probe runs on the CPU with
attention dropout off, which saves what CUDA's fused attention saves (q, k, v, output, log-sum-exp; no attention
matrices); the rows say which. Laptop rows: a CPU, fp32, 24 GB of which 90% may be used, less the runtime.

    python benchmarks/memory_plans.py            # writes results/memory_plans.json and prints a Markdown table
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
GB = 10**9
RUNTIME_CPU = int(0.4 * GB)  # a CLI process after its imports


def configs() -> dict:
    from transformers import GPT2Config

    from rugpt.architectures.rugpt3xl import RuGPT3XLConfig

    gpt2 = dict(n_positions=2048, activation_function="gelu_new")
    return {
        "small (125M)": GPT2Config(vocab_size=50264, n_layer=12, n_embd=768, n_head=12, **gpt2),
        "medium (355M)": GPT2Config(vocab_size=50257, n_layer=24, n_embd=1024, n_head=16, **gpt2),
        "large (760M)": GPT2Config(vocab_size=50257, n_layer=24, n_embd=1536, n_head=16, **gpt2),
        "xl (1.3B)": RuGPT3XLConfig(),
        "13b (ruGPT-3.5)": GPT2Config(vocab_size=50272, n_layer=40, n_embd=5120, n_head=40, **gpt2),
    }


def plan_row(config, method: str, device: str, budget: int) -> str:
    from dataclasses import replace

    from rugpt.errors import UsageError
    from rugpt.training.memory import ModelShape, RunShape, measure_activations
    from rugpt.training.plan import CUDA_CONTEXT, choose_plan, lora_spec
    from rugpt.training.settings import FinetuneSettings

    probe_device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
    if probe_device != device:  # CUDA's fused attention saves no attention matrices, as the CPU's without dropout
        config = copy.deepcopy(config)
        for name in ("attn_pdrop", "attention_dropout"):
            if hasattr(config, name):
                setattr(config, name, 0.0)
    shape = ModelShape.from_config(config)
    lora, quantize = method.startswith("lora"), method == "lora-int8"
    settings = FinetuneSettings(data=Path("d"), out=Path("o"), method="lora" if lora else "full",
                                quantize_base=quantize, batch_size=8, block_size=1024)
    run = RunShape(block=1024, lora=lora_spec(settings, config.model_type), quantize_base=quantize,
                   device_type=probe_device, autocast=torch.bfloat16 if device == "cuda" else None)
    activations = measure_activations(shape, run)
    baseline = CUDA_CONTEXT if device == "cuda" else RUNTIME_CPU
    try:
        plan = choose_plan(settings, 1, shape, replace(run, device_type=device), budget, baseline,
                           activations=activations)
    except (UsageError, AssertionError):  # AssertionError: the refusal's alternatives probe CUDA, absent here
        return "does not fit"
    how = [f"micro {plan.batch.micro}"]
    if plan.gradient_checkpointing:
        how.append("checkpointing")
    if plan.optimizer.value != "adamw":
        how.append(plan.optimizer.value)
    return f"~{plan.peak / GB:.1f} GB ({', '.join(how)})"


def main() -> None:
    machines = {"16 GB GPU (bf16)": ("cuda", int(16 * GB * 0.9)),
                "24 GB laptop (CPU, fp32)": ("cpu", int(24 * GB * 0.9))}
    methods = {"full": "full", "LoRA": "lora", "LoRA, int8 base": "lora-int8"}
    table = {}
    for name, config in configs().items():
        for machine, (device, budget) in machines.items():
            for label, method in methods.items():
                table.setdefault(name, {})[f"{machine}: {label}"] = plan_row(config, method, device, budget)
                print(name, machine, label, table[name][f"{machine}: {label}"], flush=True)
    gpu_probe = "cuda" if torch.cuda.is_available() else "cpu, attention dropout off"
    report = {"estimates": table, "block_size": 1024, "batch_size": 8, "gpu_probe": gpu_probe}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "memory_plans.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    columns = list(next(iter(table.values())))
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(row[c] for c in columns) + " |")


if __name__ == "__main__":
    main()
