"""Peak memory of loading a sharded float32 `.bin` checkpoint (ruGPT-3.5-13B's layout) into bf16, fp16 and int8.

ruGPT-3.5-13B is published as six float32 `.bin` shards (~59 GB); the question is whether loading it ever
holds a full float32 copy. A scaled fixture in the same layout (six float32 `.bin` shards of GPT-2 with
gelu_new, width 1024, 20 layers, a small vocabulary padded to a multiple of 16 as 13B's is) is loaded in a
fresh process per case; each reports its peak resident memory (VmHWM, reset after the imports) above its
resident memory before loading, mapped file pages included while resident. Baseline in the same run:
transformers' own `from_pretrained` on the `.bin` folder.

    python benchmarks/load_memory.py            # ~1 GB of fp32 shards, about a minute
    python benchmarks/load_memory.py --quick    # a tiny fixture: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "load_memory.json"
CASES = {
    # name: (what runs in the child, the dtype whose bytes the weights end up in)
    "convert .bin -> safetensors (once)": ("convert", "float32"),
    "rugpt load, bfloat16": ("load:bfloat16", "bfloat16"),
    "rugpt load, float16": ("load:float16", "float16"),
    "rugpt load + fast-int8 engine": ("int8", "int8"),
    "rugpt load, float32 (mapped)": ("load:float32", "float32"),
    "transformers from_pretrained(.bin), bfloat16": ("hf:bfloat16", "bfloat16"),
}


def build_fixture(folder: Path, quick: bool) -> dict:
    """Six float32 `.bin` shards with an index, pad 0 / bos 2 / eos 3, in ruGPT-3.5's layout."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from layouts import build_13b_sharded

    n_embd, n_layer = (64, 2) if quick else (1024, 20)
    build_13b_sharded(folder, shards=6, n_embd=n_embd, n_layer=n_layer)
    config = json.loads((folder / "config.json").read_text())
    params = config["vocab_size"] * n_embd + config["n_positions"] * n_embd + n_layer * (12 * n_embd**2 + 13 * n_embd)
    shard_bytes = [p.stat().st_size for p in folder.glob("pytorch_model-*.bin")]
    return {"params": params, "n_embd": n_embd, "n_layer": n_layer, "vocab_rows": config["vocab_size"],
            "shard_mb": [round(b / 1e6, 1) for b in sorted(shard_bytes)], "fp32_mb": round(sum(shard_bytes) / 1e6, 1)}


CHILD = r"""
import json, os, sys, time
import torch
import transformers
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1e3 for line in f if line.startswith(field + ":"))
folder, what = sys.argv[1], sys.argv[2]
from rugpt.models import load
from rugpt.weights import weights_folder
import rugpt.generation, rugpt.engines.fast, rugpt.special_tokens  # imports are not the loading's memory
from transformers import GPT2LMHeadModel, GPT2Tokenizer
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size: imports do not count
before = status("VmRSS")
began = time.perf_counter()
if what == "convert":
    weights_folder(folder)
elif what.startswith("load:"):
    load(folder, device="cpu", dtype=what.split(":")[1])
elif what == "int8":
    from rugpt.generation import Generator
    gen = Generator(load(folder, device="cpu"), engine="fast-int8")
    gen.generate("Мороз и солнце", max_new_tokens=4, do_sample=False)
elif what.startswith("hf:"):
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, what.split(":")[1]), use_safetensors=False)
seconds = time.perf_counter() - began
print(json.dumps({"before_mb": before, "peak_mb": status("VmHWM"), "end_rss_mb": status("VmRSS"),
                  "seconds": seconds}))
"""


def run_case(folder: Path, what: str, cache: Path) -> dict:
    env = dict(os.environ, RUGPT_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), what], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny fixture, to check the script")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rugpt-load-memory-") as tmp:
        folder, cache = Path(tmp) / "ruGPT-3.5-sharded", Path(tmp) / "cache"
        fixture = build_fixture(folder, args.quick)
        bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
        rows = []
        for name, (what, dtype) in CASES.items():
            result = run_case(folder, what, cache)
            weights_mb = fixture["params"] * bytes_per[dtype] / 1e6
            grown = result["peak_mb"] - result["before_mb"]
            rows.append({"case": name, "weights_mb": round(weights_mb, 1), "peak_above_start_mb": round(grown, 1),
                         "peak_over_weights_mb": round(grown - weights_mb, 1), "seconds": round(result["seconds"], 2),
                         **{k: round(v, 1) for k, v in result.items() if k != "seconds"}})
            print(f"{name:48s} weights {weights_mb:8.1f} MB  peak above start {grown:8.1f} MB  "
                  f"({grown - weights_mb:+8.1f})  {result['seconds']:.1f} s", flush=True)
    report = {"fixture": fixture, "largest_shard_mb": max(fixture["shard_mb"]), "cases": rows,
              "when": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick}
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({"largest_shard_mb": report["largest_shard_mb"], "fp32_mb": fixture["fp32_mb"]}))


if __name__ == "__main__":
    main()
