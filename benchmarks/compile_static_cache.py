"""torch.compile as a decode engine candidate: transformers `generate` with a static KV cache, eager against
compiled (inductor, weights frozen), in one run. Random GPT-2 of ruGPT-3 small's shape (decode_speed.py's
model), greedy, 64-token prompt, 128 new tokens, batch 1, 2 threads. Compare with `fast` in decode_speed.json.

    python benchmarks/compile_static_cache.py    # writes benchmarks/results/compile_static_cache.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from decode_speed import NEW_TOKENS, SMALL, build_model, cpu_name, prompts
from transformers import AutoModelForCausalLM

OUT = Path(__file__).resolve().parent / "results" / "compile_static_cache.json"


def tokens_per_s(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=0, cache_implementation="static")
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(build_model(Path("/tmp/rugpt-bench-small"), SMALL)).eval()
    ids = torch.tensor(prompts(1))
    tokens_per_s(model, ids, 4)
    eager = [tokens_per_s(model, ids) for _ in range(2)]
    inductor_config.freezing = True  # constant weights: lets inductor prepack them for oneDNN
    model.forward = torch.compile(model.forward, fullgraph=True)
    start = time.perf_counter()
    tokens_per_s(model, ids, 4)
    compile_s = time.perf_counter() - start
    tokens_per_s(model, ids, 8)
    compiled = [tokens_per_s(model, ids) for _ in range(2)]
    report = {"machine": {"cpu": cpu_name(), "threads": 2, "torch": torch.__version__}, "model": SMALL,
              "new_tokens": NEW_TOKENS, "eager_static_cache_tokens_per_s": [round(r, 1) for r in eager],
              "compiled_static_cache_tokens_per_s": [round(r, 1) for r in compiled],
              "compile_and_first_call_s": round(compile_s, 1)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
