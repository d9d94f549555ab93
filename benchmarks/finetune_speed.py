"""Fine-tuning speed and memory: rugpt's loop against a plain transformers `Trainer`, full and LoRA, in one run.

A randomly initialised GPT-2 with ruGPT-3 small's shape (speed and memory do not depend on weight values),
trained on the same packed blocks with the same configuration: batch, micro-batch (so the same gradient
accumulation), block size, AdamW, cosine schedule, gradient clipping, precision and gradient checkpointing.
Each case runs in its own process so its peak memory is its own (GPU: max allocated; CPU: peak RSS).
Throughput is measured between the ends of the first and the last optimizer step, so start-up and the
final save are left out for both.

    python benchmarks/finetune_speed.py            # full run, writes benchmarks/results/finetune_speed.json
    python benchmarks/finetune_speed.py --quick    # tiny model, a smoke test of the script (writes to /tmp)
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
SMALL = dict(vocab_size=50264, n_layer=12, n_embd=768, n_head=12, n_positions=2048)
QUICK = dict(vocab_size=8000, n_layer=2, n_embd=64, n_head=2, n_positions=128)
FULL_RUN = dict(block_size=1024, batch_size=8, micro_batch_size=4, steps=5)
QUICK_RUN = dict(block_size=64, batch_size=4, micro_batch_size=2, steps=4)
CASES = [("rugpt", "full"), ("trainer", "full"), ("rugpt", "lora"), ("trainer", "lora")]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn"])
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


def run_rugpt(folder: Path, data: Path, method: str, run: dict, checkpointing: bool) -> list[float]:
    from rugpt.training.finetune import finetune

    ends: list[float] = []

    def on_event(event) -> None:
        if event.kind == "step":
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        finetune(data, Path(out) / "run", str(folder), on_event=on_event, method=method, max_steps=run["steps"],
                 block_size=run["block_size"], batch_size=run["batch_size"],
                 micro_batch_size=run["micro_batch_size"], eval_fraction=0, warmup_steps=0,
                 save_every=10**9, eval_every=10**9, gradient_checkpointing=checkpointing,
                 lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                 lora_targets=tuple(LORA["target_modules"]))
    return ends


def run_trainer(folder: Path, data: Path, method: str, run: dict, checkpointing: bool) -> list[float]:
    """The same configuration through transformers' Trainer, on the blocks rugpt packs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from rugpt.training.data import pack_into_blocks, read_examples, tokenize
    from rugpt.training.settings import DEFAULT_LR, Method

    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = pack_into_blocks(tokenize(tokenizer, read_examples(data)), run["block_size"], tokenizer.eos_token_id)
    dataset = [{"input_ids": row.long(), "labels": row.long()} for row in blocks.tokens]
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM", fan_in_fan_out=True))
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    precision = precision_name()
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=run["micro_batch_size"],
            gradient_accumulation_steps=run["batch_size"] // run["micro_batch_size"], max_steps=run["steps"],
            learning_rate=DEFAULT_LR[Method(method)], lr_scheduler_type="cosine", warmup_steps=0,
            max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch", bf16=precision == "bf16",
            fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(), logging_steps=10**9,
            save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0, seed=42,
            disable_tqdm=True)
        Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[StepTimes()]).train()
    return ends


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # unlike ru_maxrss, not inherited from the parent across exec
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = json.loads(args.run)
    runner = run_rugpt if args.kind == "rugpt" else run_trainer
    ends = runner(Path(args.folder), Path(args.data), args.method, run, args.gradient_checkpointing)
    tokens_per_step = run["batch_size"] * run["block_size"]
    print(json.dumps({"tokens_per_s": round(steady_tokens_per_s(ends, tokens_per_step), 1),
                      "seconds_per_step": round((ends[-1] - ends[0]) / (len(ends) - 1), 4),
                      "peak_memory_mb": round(peak_memory_mb(), 1)}))


def run_case(args, folder: Path, data: Path, kind: str, method: str, run: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--data", str(data), "--kind", kind,
           "--method", method, "--run", json.dumps(run), "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--quick", action="store_true", help="tiny model and steps: check that the script works")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case; 0 = torch's default")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in every case")
    parser.add_argument("--out", type=Path, help="results file; default results/finetune_speed.json "
                                                 "(with --quick: a temp folder, so real results are never replaced)")
    parser.add_argument("--only", nargs="*", help="re-run only these cases (kind:method, e.g. rugpt:full) and "
                                                   "keep the other rows of the results file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--folder", "--data", "--kind", "--method", "--run"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    shape, run = (QUICK, QUICK_RUN) if args.quick else (SMALL, FULL_RUN)
    work = Path(tempfile.gettempdir()) / ("rugpt-finetune-bench-quick" if args.quick else "rugpt-finetune-bench")
    work.mkdir(exist_ok=True)
    folder = build_model(work / "model", shape)
    data = build_data(work / "data.txt", words=20_000 if args.quick else 200_000)
    out = args.out or (work / "finetune_speed.json" if args.quick else ROOT / "results" / "finetune_speed.json")
    earlier = json.loads(out.read_text())["results"] if args.only and out.exists() else []
    results = []
    for kind, method in CASES:
        if args.only and f"{kind}:{method}" not in args.only:
            results += [r for r in earlier if (r["kind"], r["method"]) == (kind, method)]
            continue
        row = {"kind": kind, "method": method, "measured_at": time.strftime("%Y-%m-%d %H:%M")}
        row |= run_case(args, folder, data, kind, method, run)
        print(json.dumps(row), flush=True)
        results.append(row)
    speed = {(r["kind"], r["method"]): r.get("tokens_per_s") for r in results}
    report = {
        "machine": machine(), "model": shape, "precision": precision_name(),
        "config": run | {"gradient_checkpointing": args.gradient_checkpointing, "threads": args.threads,
                         "lora": LORA},
        "results": results,
        "rugpt_over_trainer_speed": {m: round(speed[("rugpt", m)] / speed[("trainer", m)], 3)
                                     for m in ("full", "lora") if speed[("rugpt", m)] and speed[("trainer", m)]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
