"""Long prompts under load: 4 clients sending 1,000-token prompts to `rugpt serve`, chunked prefill on vs off.

Two questions, one run. Throughput: generated tokens per second of 4 concurrent clients on the batching
server against the same server taking one request at a time (`--max-batch 1`). Smoothness: while a new
1,000-token prompt arrives, do the rows already running keep producing tokens? A prefill in one piece
holds every running row for its whole duration; chunked prefill (`--prefill-chunk`, the default) lets a
decode step run between chunks. Each streamed row's gaps between consecutive chunks of text are
collected, and their p99 compared with chunking on and off.

Clients start a little apart (`--stagger`), so prompts keep arriving while other rows decode, and send
their requests back to back. Every prompt differs from its first token (a request tag), so the prefix
cache never helps here: serve_prefix_cache.py measures that. A randomly initialised GPT-2 of ruGPT-3
small's shape (vocab 50264, 12 layers, width 768, context 2048) is served by three subprocesses on
127.0.0.1 with 2 torch threads each, same code, differing only in the options below; the designs take
turns, so all see the same conditions on a machine shared with other work.

    python benchmarks/serve_long_prompts.py           # full run, writes benchmarks/results/serve_long_prompts.json
    python benchmarks/serve_long_prompts.py --quick   # tiny model, short prompts: a smoke test, writes to /tmp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import torch
from decode_speed import QUICK, SMALL, build_model, cpu_name
from serve_prefix_cache import BEGINNING
from serve_throughput import percentile, start_server, stop_server, stream_chunk, write_report

ROOT = Path(__file__).resolve().parent
CLIENTS = 4
DESIGNS = {  # options of each server
    "chunked": ["--max-batch", "16"],  # the default chunk, 256 tokens
    "chunked-64": ["--max-batch", "16", "--prefill-chunk", "64"],
    "unchunked": ["--max-batch", "16", "--prefill-chunk", "0"],
    "one-at-a-time": ["--max-batch", "1"],
}


def prompts(tokenizer, length: int, clients: int, per_client: int) -> list[list[list[int]]]:
    """Token-id prompts of exactly `length` tokens, [client][request], each different from its first token."""
    body = tokenizer(BEGINNING * (length // 40 + 1))["input_ids"]
    out = []
    for client in range(clients):
        mine = []
        for request in range(per_client):
            tag = tokenizer(f"Запрос {client}.{request}. ")["input_ids"]
            mine.append((tag + body)[:length])
        out.append(mine)
    return out


async def streamed(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[list[float], int]:
    """Arrival times of the chunks of text of one greedy streamed request, and its completion tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "preset": "greedy",
            "no_repeat_ngram_size": 0, "stream": True, "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            chunk = stream_chunk(line)
            if chunk is None:
                continue
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                times.append(time.perf_counter())
    return times, tokens


async def run_clients(url: str, work: list[list[list[int]]], new_tokens: int, stagger: float) -> dict:
    """Every client sends its prompts back to back, client i starting i × `stagger` s after the first."""
    gaps: list[float] = []
    tokens = 0

    async def loop(client: httpx.AsyncClient, index: int) -> None:
        nonlocal tokens
        await asyncio.sleep(index * stagger)
        for prompt in work[index]:
            times, count = await streamed(client, prompt, new_tokens)
            gaps.extend(b - a for a, b in zip(times, times[1:], strict=False))
            tokens += count

    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=len(work))) as client:
        began = time.perf_counter()
        await asyncio.gather(*(loop(client, index) for index in range(len(work))))
        wall = time.perf_counter() - began
    gaps.sort()
    return {"requests": sum(len(w) for w in work), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "gap_p50_s": round(percentile(gaps, 50), 4),
            "gap_p99_s": round(percentile(gaps, 99), 4), "gap_max_s": round(gaps[-1], 4)}


def summary(results: dict[str, dict]) -> dict:
    ratio = results["chunked"]["tokens_per_s"] / results["one-at-a-time"]["tokens_per_s"]
    p99 = [results["chunked"]["gap_p99_s"], results["chunked-64"]["gap_p99_s"], results["unchunked"]["gap_p99_s"]]
    return {"throughput_ratio_chunked_vs_one_at_a_time": round(ratio, 2), "target_3x_met": ratio >= 3,
            "gap_p99_chunked_256_64_vs_unchunked_s": p99, "chunking_lowers_p99_gap": min(p99[:2]) < p99[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, short prompts: check the script works")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt; default 1000 (quick: 200)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request; default 256 (quick: 16)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--stagger", type=float, default=None,
                        help="seconds between the clients' starts; default 2 (quick: 0.1)")
    parser.add_argument("--case-timeout", type=float, default=1800, help="seconds one design may take")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    prompt_tokens = args.prompt_tokens or (200 if args.quick else 1000)
    new_tokens = args.new_tokens or (16 if args.quick else 256)
    stagger = args.stagger if args.stagger is not None else (0.1 if args.quick else 2.0)
    out = args.out or (Path("/tmp/serve_long_prompts_quick.json") if args.quick
                       else ROOT / "results" / "serve_long_prompts.json")
    shape = QUICK if args.quick else SMALL
    folder = build_model(Path("/tmp") / ("rugpt-bench-quick" if args.quick else "rugpt-bench-small"), shape)
    from transformers import AutoTokenizer

    work = prompts(AutoTokenizer.from_pretrained(folder), prompt_tokens, CLIENTS, args.requests_per_client)
    servers = {design: start_server(folder, args.threads, *options) for design, options in DESIGNS.items()}
    results = {}
    try:
        for _, url in servers.values():  # warm-up: first-call allocations, lazy imports
            asyncio.run(run_clients(url, [[work[0][0][:8]]], 2, 0))
        for design, (_, url) in servers.items():
            load_before = os.getloadavg()[0]
            row = asyncio.run(asyncio.wait_for(run_clients(url, work, new_tokens, stagger), args.case_timeout))
            # Other work on the machine skews a case; the load average says how much there was.
            results[design] = row | {"load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            print(json.dumps({"design": design} | results[design]), flush=True)
    finally:
        for process, _ in servers.values():
            stop_server(process)
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "server_threads": args.threads,
                    "torch": torch.__version__, "engine": "fast (fp32)"},
        "model": shape, "clients": CLIENTS, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "requests_per_client": args.requests_per_client, "stagger_s": stagger,
        "designs": {name: " ".join(options) for name, options in DESIGNS.items()},
        "results": results, "summary": summary(results),
    }
    write_report(out, report)


if __name__ == "__main__":
    main()
