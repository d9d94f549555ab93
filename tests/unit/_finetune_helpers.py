"""Shared by the test_finetune_* modules: a tiny GPT-2 and small Russian data sets, built in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rugpt.models import BUNDLED_DIR

POEM_LINES = ["Мороз и солнце; день чудесный!", "Еще ты дремлешь, друг прелестный —", "Пора, красавица, проснись:",
              "Открой сомкнуты негой взоры", "Навстречу северной Авроры,", "Звездою севера явись!"]


def tiny_gpt2(folder: Path, dropout: float = 0.0, n_positions: int = 64, seed: int = 0, n_embd: int = 32) -> Path:
    """A 2-layer GPT-2 (width 32 unless told) with the bundled tokenizer (default init, so losses start near
    ln(vocab))."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=2, n_head=2,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def poems_txt(path: Path, documents: int = 24) -> Path:
    """`documents` short poems separated by blank lines."""
    poems = ["\n".join(POEM_LINES[i % 6: i % 6 + 3] + [f"Строфа {i}."]) for i in range(documents)]
    path.write_text("\n\n".join(poems) + "\n", encoding="utf-8")
    return path


def qa_jsonl(path: Path, rows: int = 20) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"question": f"Сколько будет {i} плюс {i}?", "answer": f"{2 * i}."},
                               ensure_ascii=False) + "\n")
    return path


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


PEAK_CHILD = r"""
import json, sys, tempfile
import torch
import accelerate, peft, transformers  # imports are the process's runtime, not the run's memory
from rugpt.training import finetune as finetune_module, memory, plan  # noqa: F401
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
options = json.loads(sys.argv[1])
torch.set_num_threads(1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from what the process holds now
before, seen = status("VmRSS"), {}
with tempfile.TemporaryDirectory() as out:
    finetune_module.finetune(options.pop("data"), out + "/run", options.pop("model"),
                             on_event=lambda e: seen.setdefault(e.kind, e), **options)
print(json.dumps({"measured": status("VmHWM") - before, "estimated": seen["plan"].plan.estimate.total}))
"""


def measured_and_estimated_peak(model: Path, data: Path, **options) -> dict:
    """Fine-tune in a fresh process; its peak resident memory above what it held before (VmHWM after writing 5
    to clear_refs, as benchmarks/load_memory.py does) and the planner's estimate, in bytes."""
    import os
    import subprocess
    import sys

    arguments = {"data": str(data), "model": str(model), "eval_fraction": 0, "save_every": 10**9,
                 "eval_every": 10**9, **options}
    done = subprocess.run([sys.executable, "-c", PEAK_CHILD, json.dumps(arguments)], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
