"""Fine-tuning memory and speed: rugpt's planned loop against a plain transformers `Trainer` at the same effective
batch, on random ruGPT-3-small, -medium and -large shapes at block 1024, plus a 13B LoRA-over-int8 figure.

Randomly initialised GPT-2s (speed and memory do not depend on weight values), trained on the same packed blocks
with the same batch, block size, learning rate, cosine schedule, clipping and precision. rugpt plans its own
micro-batch, checkpointing and optimizer (training/plan.py; `--max-memory` where a case sets it); the Trainer runs
its usual configuration (micro-batch 4, AdamW) or, for the large shape, its lightest (micro-batch 1, gradient
checkpointing). Each case runs in its own process; peak memory is the process's (GPU: max allocated; CPU: VmHWM
after writing 5 to /proc/self/clear_refs once the imports are done, as load_memory.py does). For rugpt the planner's
estimate is recorded beside it. Throughput is measured between the ends of the first and the last optimizer step.

The 13B figure: LoRA over an int8 base at ruGPT-3.5-13B's width (5120, 40 heads, its vocabulary), block 1024,
with 1 and with 2 layers; the difference is one layer's memory, and 40 layers are extrapolated from it and set
against the planner's estimate for the real config.

    python benchmarks/finetune_speed.py            # every case (hours on a CPU), writes results/finetune_speed.json
    python benchmarks/finetune_speed.py --only small:rugpt:full small:trainer:full   # some cases, keep the others
    python benchmarks/finetune_speed.py --quick    # tiny shapes: checks the script in a minute (writes to /tmp)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SHAPES = {
    "small": dict(vocab_size=50264, n_layer=12, n_embd=768, n_head=12, n_positions=2048),
    "medium": dict(vocab_size=50257, n_layer=24, n_embd=1024, n_head=16, n_positions=2048),
    "large": dict(vocab_size=50257, n_layer=24, n_embd=1536, n_head=16, n_positions=2048),
    "13b-1layer": dict(vocab_size=50272, n_layer=1, n_embd=5120, n_head=40, n_positions=2048),
    "13b-2layers": dict(vocab_size=50272, n_layer=2, n_embd=5120, n_head=40, n_positions=2048),
}
QUICK_SHAPES = {
    "small": dict(vocab_size=8000, n_layer=2, n_embd=64, n_head=2, n_positions=128),
    "medium": dict(vocab_size=8000, n_layer=3, n_embd=64, n_head=2, n_positions=128),
    "large": dict(vocab_size=8000, n_layer=3, n_embd=96, n_head=2, n_positions=128),
    "13b-1layer": dict(vocab_size=8000, n_layer=1, n_embd=128, n_head=2, n_positions=128),
    "13b-2layers": dict(vocab_size=8000, n_layer=2, n_embd=128, n_head=2, n_positions=128),
}
THIRTEEN_B = dict(vocab_size=50272, n_layer=40, n_embd=5120, n_head=40, n_positions=2048)
FULL_RUN = dict(block_size=1024, batch_size=8, steps=4)
QUICK_RUN = dict(block_size=64, batch_size=4, steps=3)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn"])
SHORT = {"steps": 2, "batch_size": 2}
# (shape, kind, method, options): rugpt's options are FinetuneSettings fields; the Trainer's its micro-batch and
# whether it checkpoints.
CASES = [
    ("small", "rugpt", "full", {}),
    ("small", "trainer", "full", {"micro_batch_size": 4}),
    ("small", "rugpt", "lora", {}),
    ("small", "trainer", "lora", {"micro_batch_size": 4}),
    # The bigger shapes run 2 steps of 2 blocks: on a CPU the planner picks micro-batch 1, so the peak is that of
    # one block whatever the accumulation, and 4 blocks of large take ~8 minutes.
    ("medium", "rugpt", "full", SHORT),
    ("large", "rugpt", "full", {"max_memory": "16GB"} | SHORT),
    ("large", "trainer", "full", {"micro_batch_size": 1, "gradient_checkpointing": True} | SHORT),
    ("13b-1layer", "rugpt", "lora", {"quantize_base": True, "gradient_checkpointing": True} | SHORT),
    ("13b-2layers", "rugpt", "lora", {"quantize_base": True, "gradient_checkpointing": True} | SHORT),
]
WORDS = ("мороз солнце день чудесный еще ты дремлешь друг прелестный пора красавица проснись открой сомкнуты "
         "негой взоры навстречу северной авроры звездою севера явись вечор ты помнишь вьюга злилась на мутном "
         "небе мгла носилась луна как бледное пятно сквозь тучи мрачные желтела").split()


def build_model(folder: Path, shape: dict) -> Path:
    """Random GPT-2 of `shape`, saved with the bundled tokenizer (its ids are a subset of the vocabulary)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rugpt.models import BUNDLED_DIR

    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(BUNDLED_DIR).save_pretrained(folder)
    return folder


def build_data(path: Path, words: int) -> Path:
    """Synthetic Russian text, documents of 200 words separated by blank lines."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(200)) + "." for _ in range(max(1, words // 200))]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def precision_name() -> str:
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def steady_tokens_per_s(step_ends: list[float], tokens_per_step: int) -> float:
    """Tokens per second between the first and the last step's end (the first step carries warm-up costs)."""
    return (len(step_ends) - 1) * tokens_per_step / (step_ends[-1] - step_ends[0])


def run_rugpt(folder: Path, data: Path, method: str, run: dict, options: dict) -> tuple[list[float], dict]:
    from rugpt.training.finetune import finetune

    ends: list[float] = []
    planned: dict = {}

    def on_event(event) -> None:
        if event.kind == "step":
            ends.append(time.perf_counter())
        elif event.kind == "plan":
            p = event.plan
            planned.update(micro_batch_size=p.batch.micro, accumulation=p.batch.accumulation,
                           gradient_checkpointing=p.gradient_checkpointing, optimizer=p.optimizer.value,
                           estimated_peak_mb=round(p.peak / 2**20, 1),
                           estimated_terms_mb={k: round(v / 2**20, 1) for k, v in p.estimate.rows() if v})

    lora = {"lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": LORA["lora_dropout"],
            "lora_targets": tuple(LORA["target_modules"])} if method == "lora" else {}
    with tempfile.TemporaryDirectory() as out:
        finetune(data, Path(out) / "run", str(folder), on_event=on_event, method=method, max_steps=run["steps"],
                 block_size=run["block_size"], batch_size=run["batch_size"], eval_fraction=0, warmup_steps=0,
                 save_every=10**9, eval_every=10**9, **lora, **options)
    return ends, planned


def run_trainer(folder: Path, data: Path, method: str, run: dict, options: dict) -> tuple[list[float], dict]:
    """The same configuration through transformers' Trainer, on the blocks rugpt packs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from rugpt.training.data import pack_into_blocks, read_examples, tokenize
    from rugpt.training.settings import DEFAULT_LR, Method

    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = pack_into_blocks(tokenize(tokenizer, read_examples(data)), run["block_size"], tokenizer.eos_token_id)
    dataset = [{"input_ids": row.long(), "labels": row.long()} for row in blocks.tokens]
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.use_cache = False
    if options.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM", fan_in_fan_out=True))
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    precision, micro = precision_name(), options["micro_batch_size"]
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=run["batch_size"] // micro,
            max_steps=run["steps"], learning_rate=DEFAULT_LR[Method(method)], lr_scheduler_type="cosine",
            warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch", bf16=precision == "bf16",
            fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(), logging_steps=10**9,
            save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0, seed=42,
            disable_tqdm=True)
        Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[StepTimes()]).train()
    return ends, {"micro_batch_size": micro, "gradient_checkpointing": bool(options.get("gradient_checkpointing"))}


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    import accelerate  # noqa: F401  (imports are the runtime, not the case's memory)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import rugpt.training.finetune  # noqa: F401

    if not torch.cuda.is_available():
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the resident size now
    before = status_bytes("VmRSS")
    run, options = json.loads(args.run), json.loads(args.options)
    run = run | {key: options.pop(key) for key in ("steps", "batch_size") if key in options}
    runner = run_rugpt if args.kind == "rugpt" else run_trainer
    ends, planned = runner(Path(args.folder), Path(args.data), args.method, run, options)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = status_bytes("VmHWM")
    row = {"tokens_per_s": round(steady_tokens_per_s(ends, run["batch_size"] * run["block_size"]), 1),
           "seconds_per_step": round((ends[-1] - ends[0]) / (len(ends) - 1), 3),
           "peak_memory_mb": round(peak / 2**20, 1), "start_memory_mb": round(before / 2**20, 1), **planned}
    if "estimated_peak_mb" in row:
        row["estimate_error"] = round(row["estimated_peak_mb"] / row["peak_memory_mb"] - 1, 3)
    print(json.dumps(row))


def run_case(args, folder: Path, data: Path, kind: str, method: str, run: dict, options: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--data", str(data), "--kind", kind,
           "--method", method, "--run", json.dumps(run), "--options", json.dumps(options),
           "--threads", str(args.threads)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * 3600, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {done.returncode} (killed: out of memory?)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def thirteen_b(results: list[dict], quick: bool) -> dict | None:
    """40 layers at 13B's width from the measured 1- and 2-layer peaks, and the planner's estimate beside it."""
    rows = {r["shape"]: r for r in results if r["shape"].startswith("13b") and "peak_memory_mb" in r}
    if len(rows) < 2:
        return None
    one, two = rows["13b-1layer"], rows["13b-2layers"]
    per_layer = two["peak_memory_mb"] - one["peak_memory_mb"]
    layers = (QUICK_SHAPES if quick else SHAPES)["13b-1layer"]["n_layer"], THIRTEEN_B["n_layer"]
    figure = {"per_layer_mb": round(per_layer, 1),
              "extrapolated_40_layers_mb": round(one["peak_memory_mb"] + (layers[1] - layers[0]) * per_layer, 1)}
    if not quick:
        from transformers import GPT2Config

        from rugpt.training.memory import ModelShape, RunShape, estimate, measure_activations
        from rugpt.training.model_prep import LoraSpec
        from rugpt.training.settings import Optimizer

        shape = ModelShape.from_config(GPT2Config(**THIRTEEN_B))
        run = RunShape(block=1024, lora=LoraSpec(tuple(LORA["target_modules"]), LORA["r"]), quantize_base=True,
                       device_type="cuda" if torch.cuda.is_available() else "cpu", autocast=None)
        planned = estimate(shape, run, measure_activations(shape, run), 1, True, Optimizer.adamw)
        figure["planner_estimate_mb"] = round((planned.total + one["start_memory_mb"] * 2**20) / 2**20, 1)
    return figure


def summary(results: list[dict]) -> dict:
    """The issue's targets, read off the rows."""
    row = {(r["shape"], r["kind"], r["method"]): r for r in results if "peak_memory_mb" in r}
    out: dict = {}
    small, trainer = row.get(("small", "rugpt", "full")), row.get(("small", "trainer", "full"))
    if small and trainer:
        out["small_full_peak_over_trainer"] = round(small["peak_memory_mb"] / trainer["peak_memory_mb"], 3)
        out["small_full_speed_over_trainer"] = round(small["tokens_per_s"] / trainer["tokens_per_s"], 3)
    lora, lora_trainer = row.get(("small", "rugpt", "lora")), row.get(("small", "trainer", "lora"))
    if lora and lora_trainer:
        out["small_lora_peak_over_trainer"] = round(lora["peak_memory_mb"] / lora_trainer["peak_memory_mb"], 3)
        out["small_lora_speed_over_trainer"] = round(lora["tokens_per_s"] / lora_trainer["tokens_per_s"], 3)
    if ("large", "rugpt", "full") in row:
        out["large_full_peak_gb"] = round(row[("large", "rugpt", "full")]["peak_memory_mb"] * 2**20 / 1e9, 2)
    out["estimate_errors"] = {f"{s}:{k}:{m}": r["estimate_error"] for (s, k, m), r in row.items()
                              if "estimate_error" in r}
    return out


def machine() -> dict:
    import accelerate
    import peft
    import transformers

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and steps: check that the script works")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case; 0 = torch's default")
    parser.add_argument("--out", type=Path, help="results file; default results/finetune_speed.json "
                                                 "(with --quick: a temp folder, so real results are never replaced)")
    parser.add_argument("--only", nargs="*", help="re-run only these cases (shape:kind:method, e.g. "
                                                   "small:rugpt:full) and keep the other rows of the results file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--folder", "--data", "--kind", "--method", "--run", "--options"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    shapes, run = (QUICK_SHAPES, QUICK_RUN) if args.quick else (SHAPES, FULL_RUN)
    work = Path(tempfile.gettempdir()) / ("rugpt-finetune-bench-quick" if args.quick else "rugpt-finetune-bench")
    work.mkdir(exist_ok=True)
    data = build_data(work / "data.txt", words=20_000 if args.quick else 200_000)
    out = args.out or (work / "finetune_speed.json" if args.quick else ROOT / "results" / "finetune_speed.json")
    earlier = json.loads(out.read_text())["results"] if args.only and out.exists() else []
    results = []
    for shape, kind, method, options in CASES:
        name = f"{shape}:{kind}:{method}"
        if args.only and name not in args.only:
            results += [r for r in earlier if (r.get("shape"), r["kind"], r["method"]) == (shape, kind, method)]
            continue
        folder = build_model(work / f"model-{shape}", shapes[shape])
        row = {"shape": shape, "kind": kind, "method": method, "options": options,
               "measured_at": time.strftime("%Y-%m-%d %H:%M")}
        row |= run_case(args, folder, data, kind, method, run, options)
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {"machine": machine(), "shapes": shapes, "precision": precision_name(),
              "config": run | {"threads": args.threads, "lora": LORA}, "results": results,
              "summary": summary(results), "13b_lora_int8": thirteen_b(results, args.quick)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"] | {"13b_lora_int8": report["13b_lora_int8"]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
