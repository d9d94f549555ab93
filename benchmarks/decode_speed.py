"""Decode speed: rugpt's generation path on each engine against transformers `generate`, in one run.

A randomly initialised GPT-2 with ruGPT-3 small's shape (speed does not depend on weight values),
greedy, a 64-token prompt, 128 new tokens, batch 1 and 8, 2 threads. Each case runs in its own
process so its peak memory (RSS) is its own. Also measures this machine's memory bandwidth, copying
(the issue's yardstick) and reading (a 2-thread sum over 1 GiB: what streaming weights needs), before
and after the cases, and the decode rate each allows (weights read per token / bandwidth).
CTranslate2 (`pip install ctranslate2`) and llama-cpp-python are compared when installed.

    python benchmarks/decode_speed.py            # full run, writes benchmarks/results/decode_speed.json
    python benchmarks/decode_speed.py --quick    # tiny model, a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent
SMALL = dict(vocab_size=50264, n_layer=12, n_embd=768, n_head=12, n_positions=2048)
QUICK = dict(vocab_size=8000, n_layer=2, n_embd=64, n_head=2, n_positions=512)
PROMPT_TOKENS, NEW_TOKENS = 64, 128
FORMAT_BYTES = {"fp32": 4, "16-bit": 2, "int8": 1}  # bytes per weight

CASES = [
    ("transformers-generate", "fp32", 1), ("transformers-generate", "fp32", 8), ("transformers-generate", "bf16", 1),
    ("rugpt", "transformers", 1),
    ("rugpt", "fast", 1), ("rugpt", "fast", 8),
    # the fast engine without its compiled step (RUGPT_NATIVE=0): torch ops over the same weights
    ("rugpt", "fast-torch-step", 1), ("rugpt", "fast-torch-step", 8),
    ("rugpt", "fast-bf16", 1), ("rugpt", "fast-bf16", 8),
    ("rugpt", "fast-fp16", 1), ("rugpt", "fast-fp16", 8),
    ("rugpt", "fast-int8", 1), ("rugpt", "fast-int8", 8),
    ("rugpt", "llamacpp-f32", 1), ("rugpt", "llamacpp-f32", 8),
    ("rugpt", "llamacpp-f16", 1), ("rugpt", "llamacpp-f16", 8),
    ("rugpt", "llamacpp-q8", 1), ("rugpt", "llamacpp-q8", 8),
    # llama-cpp-python's own high-level loop on the same GGUF files: llama.cpp without rugpt around it
    ("llama-cpp-python", "f32", 1), ("llama-cpp-python", "q8_0", 1),
    ("ctranslate2", "float32", 1), ("ctranslate2", "float32", 8),
    ("ctranslate2", "int8", 1), ("ctranslate2", "int8", 8),
]


def build_model(folder: Path, shape: dict) -> Path:
    """Random GPT-2 of `shape`, saved with the bundled tokenizer; the end-of-text row is zeroed so greedy
    decoding never stops early (its logit is 0 while the maximum of the others is positive)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rugpt.models import BUNDLED_DIR

    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        model.transformer.wte.weight[0].zero_()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(BUNDLED_DIR).save_pretrained(folder)
    return folder


def bandwidth_gb_s(megabytes: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Best observed rates over a large fp32 buffer: copying (bytes copied per second) and reading (a sum)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)

    def best(fn) -> float:
        fn()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return src.numel() * 4 / min(seconds) / 1e9

    return {"copy": best(lambda: dst.copy_(src)), "read": best(src.sum)}


def prompts(batch: int, length: int = PROMPT_TOKENS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 8000, (length,), generator=gen).tolist() for _ in range(batch)]


def run_transformers(folder: Path, dtype: str, batch: int) -> float:
    """Seconds for one `generate` call of NEW_TOKENS tokens (prefill included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    ids = torch.tensor(prompts(batch))

    def once(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=0)
        return time.perf_counter() - start

    once(4)
    return min(once(NEW_TOKENS) for _ in range(2))


def run_rugpt(folder: Path, engine: str, batch: int) -> float:
    if engine == "fast-torch-step":
        os.environ["RUGPT_NATIVE"] = "0"
        engine = "fast"
    return rugpt_generate_seconds(folder, engine, batch)


def rugpt_generate_seconds(model: Path, engine: str, batch: int) -> float:
    """Seconds for rugpt's generation path (Generator.decode: engine + sampler) on `batch` prompts, NEW_TOKENS
    each (best of 2 after a warm-up); `model` is a folder or a GGUF file."""
    from rugpt.generation import GenerationSettings, Generator

    generator = Generator(str(model), engine=engine)
    rows = prompts(batch)

    def once(new_tokens: int) -> float:
        settings = GenerationSettings.from_preset("greedy", no_repeat_ngram_size=0, max_new_tokens=new_tokens)
        start = time.perf_counter()
        produced = sum(1 for _, token, _ in generator.decode(rows, settings) if token is not None)
        assert produced == batch * new_tokens, produced
        return time.perf_counter() - start

    once(4)
    return min(once(NEW_TOKENS) for _ in range(2))


def run_llama_cpp(folder: Path, gguf_type: str, batch: int) -> float:
    from rugpt.engines.gguf_convert import convert

    assert batch == 1, "llama-cpp-python's high-level API decodes one sequence"
    return llama_generate_seconds(convert(folder, gguf_type))


def llama_generate_seconds(gguf: Path) -> float:
    """Seconds for llama-cpp-python's own `Llama.generate` loop (greedy, its own sampler) on one prompt,
    NEW_TOKENS tokens (best of 2 after a warm-up)."""
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    llm = Llama(model_path=str(gguf), n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_batch=PROMPT_TOKENS,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = prompts(1)[0]

    def once(new_tokens: int) -> float:
        start = time.perf_counter()
        for produced, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), start=1):
            if produced == new_tokens:
                break
        return time.perf_counter() - start

    once(4)
    return min(once(NEW_TOKENS) for _ in range(2))


def pad_ct2_vocabulary() -> None:
    """The benchmark model has ruGPT-3 small's 50264 rows but the bundled 8k tokenizer; CTranslate2's
    converter wants one vocabulary entry per row, so the missing ones get placeholder names."""
    from ctranslate2.converters import transformers as ct2

    listed = ct2.GPT2Loader.get_vocabulary

    def padded(self, model, tokenizer):
        tokens = listed(self, model, tokenizer)
        return tokens + [f"<unused{i}>" for i in range(len(tokens), model.config.vocab_size)]

    ct2.GPT2Loader.get_vocabulary = padded


def run_ctranslate2(folder: Path, compute_type: str, batch: int) -> float:
    """Seconds for CTranslate2's `generate_batch` (greedy) on `batch` prompts; converts the model once."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoTokenizer

    converted = folder.parent / f"{folder.name}-ct2"
    if not (converted / "model.bin").exists():
        pad_ct2_vocabulary()
        TransformersConverter(str(folder)).convert(str(converted), force=True)
    threads = torch.get_num_threads()
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type=compute_type, intra_threads=threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in prompts(batch)]

    def once(new_tokens: int) -> float:
        start = time.perf_counter()
        generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                 include_prompt_in_result=False)
        return time.perf_counter() - start

    once(4)
    return min(once(NEW_TOKENS) for _ in range(2))


RUNNERS = {"transformers-generate": run_transformers, "rugpt": run_rugpt, "llama-cpp-python": run_llama_cpp,
           "ctranslate2": run_ctranslate2}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    runner = RUNNERS[args.kind]
    seconds = runner(Path(args.folder), args.variant, args.batch)
    peak_mb = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "tokens_per_s": args.batch * NEW_TOKENS / seconds, "peak_rss_mb": peak_mb}))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not carry the parent's peak
    across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_case(folder: Path, kind: str, variant: str, batch: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--kind", kind, "--variant", variant,
           "--batch", str(batch), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(case: tuple, rows: list[dict]) -> dict:
    kind, variant, batch = case
    done = [r for r in rows if "error" not in r]
    if not done:
        return {"kind": kind, "variant": variant, "batch": batch, "error": rows[-1]["error"]}
    rates = sorted(r["tokens_per_s"] for r in done)
    return {"kind": kind, "variant": variant, "batch": batch, "tokens_per_s": statistics.median(rates),
            "runs_tokens_per_s": [round(rate, 1) for rate in rates],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model: check that the script works")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "decode_speed.json")
    parser.add_argument("--only", nargs="*", help="run only cases whose 'kind:variant' contains one of these")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every case; the median is reported")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else SMALL
    folder = build_model(Path("/tmp") / ("rugpt-bench-quick" if args.quick else "rugpt-bench-small"), shape)
    params = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    megabytes = 256 if args.quick else 1024
    cases = [c for c in CASES if not args.only or any(o in f"{c[0]}:{c[1]}" for o in args.only)]
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    measured = []
    # Rounds over all cases, not repeats of one case: a slow spell of this shared machine then hits
    # every case alike, and the median of each case is compared with the medians of the others.
    for round_number in range(args.rounds):
        measured.append(bandwidth_gb_s(megabytes))
        for case in cases:
            row = run_case(folder, *case, args.threads)
            print(json.dumps({"round": round_number, "case": case} | row), flush=True)
            runs[case].append(row)
    measured.append(bandwidth_gb_s(megabytes))
    results = [summarise(case, rows) for case, rows in runs.items()]
    # the best measurement: the stricter limit
    bandwidth = {kind: max(m[kind] for m in measured) for kind in measured[0]}
    report = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "bandwidth_gb_s": {kind: [round(m[kind], 1) for m in measured] for kind in measured[0]}},
        "rounds": args.rounds,
        "model": shape | {"parameters": params},
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
        "bandwidth_limit_tokens_per_s": {
            kind: {fmt: round(gb_s * 1e9 / (params * width), 1) for fmt, width in FORMAT_BYTES.items()}
            for kind, gb_s in bandwidth.items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
