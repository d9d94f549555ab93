"""4-bit weights and compiled prefill (issue 19): fast-q4 against fast-int8 and llama.cpp q4_0 / q4_K_M, in one run.

A randomly initialised GPT-2 with ruGPT-3 small's shape (speed does not depend on weight values), 2 threads:
- decode: greedy, a 64-token prompt, 128 new tokens, batch 1 and 8, through rugpt's generation path, each
  case in its own process (its peak RSS its own); llama.cpp on the same model converted to GGUF and
  quantized by llama.cpp itself (llama-cpp-python, the `llamacpp` extra; its rows are skipped with a note
  when it is not installed): its own loop at batch 1, rugpt's llama.cpp engine over the file at batch 8;
- prefill: one 1,024-token prompt (the last position's logits, as generation needs) on rugpt's engines,
  transformers bf16 (`logits_to_keep=1`) and llama.cpp q4_0, interleaved rounds, as tokens/s and as a
  share of this CPU's compute peak measured in the same run (register-only loops of bf16 and VNNI dot
  products and fp32 FMAs in rugpt's kernel, and torch's bf16 GEMM of the model's shapes; the best of a
  reading at the start and one before the prefills);
- memory bandwidth (decode_speed.bandwidth_gb_s) before and after, and the decode rate each format allows;
- quality: held-out perplexity of the bundled model on its held-out texts (../shared/data, as in
  bundled/metrics.json) and of the benchmark model on the same text, fp32 against fast-int8 and fast-q4,
  computed through the engines themselves (prefill + extend);
- a ruGPT-3.5-13B estimate (40 x 5120, vocabulary 50272) from one 13B-shaped layer and the 13B head,
  measured here at 4 and 8 bits (batch-1 step, batch-8 step, 1,024-token prefill): time x 40 + head;
- peak memory of loading ruGPT-3.5's layout (six float32 `.bin` shards, load_memory.py's 1 GB fixture)
  into fast-q4 and fast-int8, against the packed weights and the largest shard.

    python benchmarks/q4_speed.py            # full run (about 20 minutes), writes benchmarks/results/q4_speed.json
    python benchmarks/q4_speed.py --quick    # tiny shapes, ~2 minutes: a smoke test of the script
    python benchmarks/q4_speed.py --prefill-only   # the peaks and prefills again (~3 minutes), the rest kept
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import (  # noqa: E402
    NEW_TOKENS,
    PROMPT_TOKENS,
    QUICK,
    SMALL,
    bandwidth_gb_s,
    build_model,
    cpu_name,
    llama_generate_seconds,
    peak_rss_mb,
    prompts,
    rugpt_generate_seconds,
)

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent.parent / "shared" / "data"
PREFILL_TOKENS = 1024
SHAPE_13B = dict(n_layer=40, n_embd=5120, vocab_size=50272)
QUICK_13B = dict(n_layer=40, n_embd=512, vocab_size=8000)  # --quick: the same measurement on a small layer
FORMAT_BYTES = {"int8": 1.0, "q4": 4.5 / 8}  # bytes per weight (q4: 4 bits + fp16 scale and minimum per 64)
LLAMA_FTYPES = {"q4_0": 2, "q4_K_M": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*

DECODE_CASES = [("rugpt", "fast-int8", 1), ("rugpt", "fast-int8", 8), ("rugpt", "fast-q4", 1), ("rugpt", "fast-q4", 8),
                ("llama-cpp-python", "q4_0", 1), ("llama-cpp-python", "q4_K_M", 1),
                ("rugpt-gguf", "q4_0", 8), ("rugpt-gguf", "q4_K_M", 8)]
PREFILL_CASES = [("transformers", "bf16"), ("rugpt", "fast"), ("rugpt", "fast-bf16"), ("rugpt", "fast-int8"),
                 ("rugpt", "fast-q4"), ("llama-cpp-python", "q4_0")]


def llama_gguf(folder: Path, kind: str) -> Path:
    """The model as GGUF quantized by llama.cpp itself (from rugpt's f32 conversion), made once."""
    import llama_cpp

    from rugpt.engines.gguf_convert import convert

    source = convert(folder, "f32")
    target = source.parent.parent / f"{source.parent.name}-{kind}.gguf"
    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[kind]
        params.nthread = torch.get_num_threads()
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    return target


def prefill_seconds(folder: Path, kind: str, variant: str, tokens: int) -> float:
    """Best of 3 prefills of one `tokens`-long prompt (after a warm-up), last position's logits only."""
    ids = prompts(1, tokens)[0]
    if kind == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        batch = torch.tensor([ids])

        def run() -> None:
            with torch.inference_mode():
                model(batch, logits_to_keep=1, use_cache=True)
    elif kind == "llama-cpp-python":
        from llama_cpp import Llama

        threads = torch.get_num_threads()
        llm = Llama(model_path=str(llama_gguf(folder, variant)), n_ctx=tokens + 8, n_batch=tokens, n_ubatch=512,
                    n_threads=threads, n_threads_batch=threads, verbose=False)

        def run() -> None:
            llm.reset()
            llm.eval(ids)
    else:
        from rugpt.engines import create_engine
        from rugpt.models import load

        engine = create_engine(load(str(folder), device="cpu"), variant, max_rows=1)

        def run() -> None:
            engine.prefill(ids)
            engine.release_all()
    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_13b(shape: dict, fmt: str, tokens: int) -> dict:
    """Milliseconds for one 13B-shaped block's four products and for the 13B head in `fmt` (int8 or q4, as the
    fast engines pack them), at a batch-1 step, a batch-8 step and a `tokens`-long prefill; bytes each holds."""
    from rugpt.engines import native
    from rugpt.engines.q4 import pack_q4

    kernel = native.step_kernel()
    d = shape["n_embd"]
    shapes = {"qkv": (3 * d, d), "proj": (d, d), "fc": (4 * d, d), "out": (d, 4 * d)}
    gen = torch.Generator().manual_seed(0)

    def pack(out: int, n_in: int, bias: bool):
        weight = torch.randn(out, n_in, generator=gen) * 0.02
        b = torch.zeros(out) if bias else None
        return pack_q4(weight, b, kernel) if fmt == "q4" else native.int8_tiled(kernel, weight, b)

    def timed(linears: list, inputs: list[torch.Tensor], repeats: int) -> float:
        for linear, x in zip(linears, inputs, strict=True):
            linear(x)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for linear, x in zip(linears, inputs, strict=True):
                linear(x)
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    block = [pack(out, n_in, True) for out, n_in in shapes.values()]
    result = {"layer_bytes": sum(linear.nbytes for linear in block)}
    for rows, key, repeats in ((1, "step_b1_ms", 10), (8, "step_b8_ms", 10), (tokens, "prefill_ms", 2)):
        result[key] = timed(block, [torch.randn(rows, n_in) for _, n_in in shapes.values()], repeats)
    del block
    head = pack(shape["vocab_size"], d, False)
    result["head_bytes"] = head.nbytes
    result["head_b1_ms"] = timed([head], [torch.randn(1, d)], 10)
    result["head_b8_ms"] = timed([head], [torch.randn(8, d)], 10)
    return result


def child(args) -> None:
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    if args.kind == "layer-13b":
        result = layer_13b(json.loads(args.variant), args.format, args.batch)
    elif args.kind.startswith("prefill:"):
        seconds = prefill_seconds(folder, args.kind.split(":", 1)[1], args.variant, args.batch)
        result = {"seconds": seconds, "tokens_per_s": args.batch / seconds}
    else:
        if args.kind == "rugpt-gguf":
            seconds = rugpt_generate_seconds(llama_gguf(folder, args.variant), "auto", args.batch)
        elif args.kind == "llama-cpp-python":
            seconds = llama_generate_seconds(llama_gguf(folder, args.variant))
        else:
            seconds = rugpt_generate_seconds(folder, args.variant, args.batch)
        result = {"seconds": seconds, "tokens_per_s": args.batch * NEW_TOKENS / seconds}
    print(json.dumps(result | {"peak_rss_mb": peak_rss_mb()}))


def run_case(folder: Path, kind: str, variant: str, batch: int, threads: int, fmt: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--kind", kind, "--variant", variant,
           "--batch", str(batch), "--threads", str(threads), "--format", fmt]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


LOAD_CHILD = r"""
import json, sys, time
import torch
from rugpt.models import load
import rugpt.generation, rugpt.engines.fast, rugpt.engines.q4  # imports are not the loading's memory
from transformers import GPT2LMHeadModel, GPT2Tokenizer
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1e3 for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) from here on
before = status("VmRSS")
began = time.perf_counter()
from rugpt.generation import Generator
generator = Generator(load(sys.argv[1], device="cpu"), engine=sys.argv[2])
generator.generate("Мороз и солнце", max_new_tokens=4, do_sample=False)
weights = sum(linear.nbytes for layer in generator.engine().layers
              for linear in (layer.qkv, layer.proj, layer.fc, layer.out)) + generator.engine().lm_head.nbytes
print(json.dumps({"peak_above_start_mb": status("VmHWM") - before, "end_rss_mb": status("VmRSS") - before,
                  "engine_weights_mb": weights / 1e6, "seconds": time.perf_counter() - began}))
"""


def load_memory(quick: bool) -> dict:
    """Peak memory of loading ruGPT-3.5's layout (six float32 `.bin` shards; load_memory.py's scaled fixture)
    into fast-q4 and fast-int8: the .bin files are converted to safetensors once (not measured here), mapped,
    and each layer is packed from its mapped pages, which are then given back (engines/memory.py)."""
    import tempfile

    from load_memory import build_fixture
    from load_memory import run_case as load_case

    report = {}
    with tempfile.TemporaryDirectory(prefix="rugpt-q4-load-") as tmp:
        folder, cache = Path(tmp) / "ruGPT-3.5-sharded", Path(tmp) / "cache"
        report["fixture"] = build_fixture(folder, quick)
        load_case(folder, "convert", cache)
        env = os.environ | {"RUGPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        for engine in ("fast-int8", "fast-q4"):
            done = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(folder), engine], env=env,
                                  capture_output=True, text=True)
            report[engine] = ({k: round(v, 1) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
                              if done.returncode == 0 else {"error": done.stderr.strip().splitlines()[-1]})
    report["largest_shard_mb"] = max(report["fixture"]["shard_mb"])
    return report


def compute_peaks(shape: dict, threads: int) -> dict:
    """Operations per second: rugpt's register-only loops (bf16 pairs, VNNI bytes) and torch's bf16 GEMM of the
    model's prefill shapes (1,024 rows), the best of a few tries each."""
    import ctypes

    import torch.nn.functional as F

    from rugpt.engines import native

    peaks = {}
    library = ctypes.CDLL(str(native._built()))
    library.rugpt_peak.restype = ctypes.c_double
    library.rugpt_peak.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    for kind, name in ((0, "bf16_dot_loop"), (1, "vnni_dot_loop"), (2, "fp32_fma_loop")):
        best = 0.0
        for _ in range(5):
            start = time.perf_counter()
            ops = library.rugpt_peak(kind, 1_000_000, threads)
            best = max(best, ops * threads / (time.perf_counter() - start))
        if best > 0:
            peaks[name] = best / 1e9
    d = shape["n_embd"]
    x = torch.randn(PREFILL_TOKENS, d, dtype=torch.bfloat16)
    weights = [torch.randn(out, d, dtype=torch.bfloat16) for out in (3 * d, 4 * d)]
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        best = max(best, 2 * PREFILL_TOKENS * d * 7 * d / (time.perf_counter() - start))
    peaks["torch_bf16_gemm"] = best / 1e9
    return {name: round(value, 1) for name, value in peaks.items()}


def prefill_section(folder: Path, shape: dict, tokens: int, rounds: int, threads: int, have_llama: bool,
                    peaks: dict) -> tuple[dict, dict]:
    """Each case's prefill (best of 3 in its own process) in `rounds` interleaved rounds, the best round kept, and
    its share of the compute peaks: the best of those measured at the start of the run and again here (a reading
    taken while this shared machine was busy elsewhere would understate what it can do)."""
    peaks = {name: max(value, again) for (name, value), again in
             zip(peaks.items(), compute_peaks(shape, threads).values(), strict=True)}
    cases = [(kind, variant) for kind, variant in PREFILL_CASES if have_llama or kind != "llama-cpp-python"]
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for _ in range(rounds):
        for kind, variant in cases:
            row = run_case(folder, f"prefill:{kind}", variant, tokens, threads)
            print(json.dumps({"prefill": [kind, variant]} | row), flush=True)
            runs[(kind, variant)].append(row)
    work = prefill_gflop(shape, tokens)
    results = []
    for (kind, variant), rows in runs.items():
        done = [r for r in rows if "error" not in r]
        if not done:
            results.append({"kind": kind, "variant": variant} | rows[-1])
            continue
        best = min(done, key=lambda r: r["seconds"])
        gflop_s = work / best["seconds"]
        results.append({"kind": kind, "variant": variant} | best | {
            "runs_seconds": [round(r["seconds"], 4) for r in done], "gflop_per_s": round(gflop_s, 1),
            "share_of_peak": {name: round(gflop_s / peak, 3) for name, peak in peaks.items()}})
    return {"tokens": tokens, "gflop": round(work, 2), "rounds": rounds, "results": results}, peaks


def prefill_gflop(shape: dict, tokens: int) -> float:
    """Work in a prefill that keeps only the last logits: 2 x tokens x (12 d^2 per layer) for the products, causal
    attention's QK^T and PV (2 x 2 x d x tokens^2 / 2 per layer), and the last position's head."""
    d, layers = shape["n_embd"], shape["n_layer"]
    return (2 * tokens * 12 * d * d * layers + 2 * d * tokens * tokens * layers + 2 * d * shape["vocab_size"]) / 1e9


def quality(model_folder: Path, tokens: dict[str, int]) -> dict:
    """Held-out perplexity, fp32 against fast-int8 and fast-q4, through each engine's prefill and extend: the
    bundled model (trained: the number that matters) and the random benchmark model of ruGPT-3 small's shape
    (its perplexity is near its vocabulary size, so it only shows that the real shape loses nothing more)."""
    from rugpt.engines import create_engine
    from rugpt.engines.base import perplexity
    from rugpt.models import BUNDLED_DIR, load

    sources = json.loads((BUNDLED_DIR / "metrics.json").read_text())["heldout_sources"]
    files = [SHARED_DATA / s for s in sources if (SHARED_DATA / s).is_file()]
    if not files:
        return {"skipped": f"no held-out texts under {SHARED_DATA}"}
    text = "\n\n".join(path.read_text(encoding="utf-8")[:20000] for path in files)
    report = {"texts": [str(p.relative_to(SHARED_DATA)) for p in files]}
    for name, folder in (("bundled", None), ("benchmark_model", model_folder)):
        loaded = load(str(folder) if folder else None, device="cpu")
        ids = loaded.tokenizer(text)["input_ids"][:tokens[name]]
        window = min(loaded.context_length - 1, 1023)
        rows = {}
        for engine_name in ("fast", "fast-int8", "fast-q4"):
            rows[engine_name] = perplexity(create_engine(loaded, engine_name, max_rows=1), ids, window)
        base = rows["fast"]
        report[name] = {"tokens": len(ids), "perplexity": {k: round(v, 3) for k, v in rows.items()},
                        "vs_fp32_percent": {k: round((v / base - 1) * 100, 2) for k, v in rows.items()}}
    return report


def summarise(rows: list[dict]) -> dict:
    done = [r for r in rows if "error" not in r]
    if not done:
        return {"error": rows[-1]["error"]}
    rates = sorted(r["tokens_per_s"] for r in done)
    return {"tokens_per_s": round(statistics.median(rates), 1), "runs_tokens_per_s": [round(r, 1) for r in rates],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in done))}


def estimate_13b(measured: dict, shape: dict, context: int = 2048) -> dict:
    """Tokens/s and memory of the whole 13B-shaped model from one measured layer and the measured head."""
    layers, d, vocab = shape["n_layer"], shape["n_embd"], shape["vocab_size"]
    out = {}
    for fmt, m in measured.items():
        if "error" in m:
            out[fmt] = m
            continue
        step = {b: layers * m[f"step_b{b}_ms"] + m[f"head_b{b}_ms"] for b in (1, 8)}
        weights_gb = (layers * m["layer_bytes"] + m["head_bytes"]) / 1e9
        kv_gb = 2 * layers * context * d * 4 / 1e9  # fp32 keys and values, one row at full context
        out[fmt] = {"weights_gb": round(weights_gb, 2), "kv_cache_gb_per_row_at_2048": round(kv_gb, 2),
                    # the fp32 token embedding stays mapped from the checkpoint; lookups read a row a token
                    "embedding_fp32_mapped_gb": round(vocab * d * 4 / 1e9, 2),
                    "decode_b1_tokens_per_s": round(1e3 / step[1], 2),
                    "decode_b8_tokens_per_s": round(8e3 / step[8], 2),
                    "prefill_products_tokens_per_s": round(PREFILL_TOKENS * 1e3 / (layers * m["prefill_ms"]), 1),
                    "measured": {k: round(v, 3) for k, v in m.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check that the script works")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode cases (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "q4_speed.json")
    for hidden in ("--folder", "--kind", "--variant", "--format"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefill-only", action="store_true",
                        help="measure the peaks and the prefills again; the file's other sections stay")
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else SMALL
    folder = build_model(Path("/tmp") / ("rugpt-bench-quick" if args.quick else "rugpt-bench-small"), shape)
    rounds = 1 if args.quick else args.rounds
    prefill_tokens = 256 if args.quick else PREFILL_TOKENS
    have_llama = _has_llama_cpp()
    if args.prefill_only:
        report = json.loads(args.out.read_text())
        report["prefill"], report["machine"]["compute_peak_gop_s"] = prefill_section(
            folder, shape, prefill_tokens, rounds, args.threads, have_llama, compute_peaks(shape, args.threads))
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
        print(f"wrote {args.out}")
        return
    measured = [bandwidth_gb_s(256 if args.quick else 1024)]
    peaks = compute_peaks(shape, args.threads)
    decode_cases = [c for c in DECODE_CASES if have_llama or c[0] == "rugpt"]
    runs: dict[tuple, list[dict]] = {case: [] for case in decode_cases}
    for round_number in range(rounds):
        for case in decode_cases:
            row = run_case(folder, *case, args.threads)
            print(json.dumps({"round": round_number, "case": case} | row), flush=True)
            runs[case].append(row)
        measured.append(bandwidth_gb_s(256 if args.quick else 1024))
    decode = [{"kind": k, "variant": v, "batch": b} | summarise(rows) for (k, v, b), rows in runs.items()]
    prefill, peaks = prefill_section(folder, shape, prefill_tokens, rounds, args.threads, have_llama, peaks)
    big = QUICK_13B if args.quick else SHAPE_13B
    per_layer = {fmt: run_case(folder, "layer-13b", json.dumps(big), 64 if args.quick else PREFILL_TOKENS,
                               args.threads, fmt) for fmt in ("int8", "q4")}
    print(json.dumps({"13b_layer": per_layer}), flush=True)
    bandwidth = {kind: max(m[kind] for m in measured) for kind in measured[0]}
    params = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    report = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "bandwidth_gb_s": {kind: [round(m[kind], 1) for m in measured] for kind in measured[0]},
                    "compute_peak_gop_s": peaks},
        "quick": args.quick, "rounds": rounds, "model": shape | {"parameters": params},
        "llama_cpp": "installed" if have_llama else "absent: llama.cpp rows skipped (pip install 'rugpt[llamacpp]')",
        "decode": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                   "bandwidth_limit_tokens_per_s": {
                       kind: {fmt: round(gb_s * 1e9 / (params * width), 1) for fmt, width in FORMAT_BYTES.items()}
                       for kind, gb_s in bandwidth.items()},
                   "results": decode},
        "prefill": prefill,
        "quality": quality(folder, {"bundled": 4000, "benchmark_model": 2000} if args.quick
                           else {"bundled": 40000, "benchmark_model": 8000}),
        "load_memory": load_memory(args.quick),
        "estimate_13b": {"shape": big, "note": "one layer and the head measured here, times 40 layers"}
        | estimate_13b(per_layer, big),
    }
    ratios = _ratios(decode)
    if ratios:
        report["decode"]["ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps({"ratios": ratios, "quality": report["quality"]}, ensure_ascii=False))
    print(f"wrote {args.out}")


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _ratios(decode: list[dict]) -> dict:
    rate = {(r["kind"], r["variant"], r["batch"]): r.get("tokens_per_s") for r in decode}
    out = {}
    for batch in (1, 8):
        q4 = rate.get(("rugpt", "fast-q4", batch))
        for key, name in ((("rugpt", "fast-int8", batch), "fast-int8"),
                          (("llama-cpp-python", "q4_0", batch), "llama.cpp q4_0"),
                          (("llama-cpp-python", "q4_K_M", batch), "llama.cpp q4_K_M"),
                          (("rugpt-gguf", "q4_0", batch), "llama.cpp q4_0 (rugpt engine)"),
                          (("rugpt-gguf", "q4_K_M", batch), "llama.cpp q4_K_M (rugpt engine)")):
            if q4 and rate.get(key):
                out[f"fast-q4 / {name}, batch {batch}"] = round(q4 / rate[key], 2)
    return out


if __name__ == "__main__":
    main()
