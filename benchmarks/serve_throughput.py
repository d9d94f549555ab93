"""Serving throughput: `rugpt serve` with its batching scheduler against one-request-at-a-time, in one run.

A randomly initialised GPT-2 of ruGPT-3 small's shape (vocab 50264, 12 layers, width 768, 12 heads,
context 2048; speed does not depend on weight values) is served by `rugpt serve` in a subprocess on
127.0.0.1, twice: with batches of up to 16 rows (the design) and with `--max-batch 1` (the queue-one-
request-at-a-time design, same server code otherwise). For 1, 4 and 16 concurrent clients, each sending
a fixed number of requests back to back (a ~50-token prompt, 128 new tokens, greedy, fixed length: end-of-
text can never win), it measures aggregate generated tokens per second and p50 / p99 request latency.

    python benchmarks/serve_throughput.py            # full run, writes benchmarks/results/serve_throughput.json
    python benchmarks/serve_throughput.py --quick    # tiny model: a smoke test, writes to /tmp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from decode_speed import QUICK, SMALL, build_model, cpu_name

ROOT = Path(__file__).resolve().parent
CLIENTS = (1, 4, 16)
BASE_PROMPT = ("Мой дядя самых честных правил, когда не в шутку занемог, он уважать себя заставил и лучше выдумать "
               "не мог. Его пример другим наука; но, боже мой, какая скука с больным сидеть и день и ночь")
DESIGNS = {"batched": 16, "sequential": 1}  # --max-batch of each design


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, threads: int, *options: str) -> tuple[subprocess.Popen, str]:
    """`rugpt serve` in a subprocess on 127.0.0.1; returns it and its base URL once /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-c", "from rugpt.cli import main; main()", "serve", "--model", str(folder),
           "--engine", "fast", "--port", str(port), "--max-queue-seconds", "0", "--request-timeout", "900",
           "--max-tokens-limit", "2048", "--no-play", *options]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise RuntimeError("the server did not become healthy within 180 s")


def write_report(out: Path, report: dict) -> None:
    """The run's JSON to `out`, its summary to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps(report["summary"]))
    print(f"wrote {out}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


async def run_clients(url: str, clients: int, per_client: int, new_tokens: int) -> dict:
    """`clients` concurrent loops of `per_client` requests each; tokens/s over the wall time, latency percentiles."""
    latencies: list[float] = []
    tokens, errors = 0, 0

    async def loop(client: httpx.AsyncClient, index: int) -> None:
        nonlocal tokens, errors
        for i in range(per_client):
            body = {"prompt": f"{index}.{i}: {BASE_PROMPT}", "max_tokens": new_tokens, "temperature": 0,
                    "preset": "greedy", "no_repeat_ngram_size": 0}
            began = time.perf_counter()
            response = await client.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - began)
            if response.status_code != 200:
                errors += 1
                continue
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(loop(client, c) for c in range(clients)))
        wall = time.perf_counter() - began
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "errors": errors, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(percentile(latencies, 50), 3), "p99_s": round(percentile(latencies, 99), 3)}


def stream_chunk(line: str) -> dict | None:
    """The completion chunk of one server-sent-events line (None for other lines and the final [DONE]); a chunk
    carrying an error raises, so a failed request never passes for a short one."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    chunk = json.loads(line[len("data: "):])
    if "error" in chunk:
        raise RuntimeError(f"the server failed the request: {chunk['error']}")
    return chunk


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def measure(folder: Path, args) -> list[dict]:
    """Both designs served at once (an idle server costs nothing); for each client count they run back to back,
    so both see the same conditions on a machine shared with other work."""
    servers = {design: start_server(folder, args.threads, "--max-batch", str(size), "--max-waiting", "64")
               for design, size in DESIGNS.items()}
    try:
        for _, url in servers.values():
            asyncio.run(run_clients(url, 1, 1, 8))  # warm-up: first-call allocations, lazy imports
        rows = []
        for clients in CLIENTS:
            for design, (_, url) in servers.items():
                load_before = os.getloadavg()[0]
                row = asyncio.run(asyncio.wait_for(
                    run_clients(url, clients, args.requests_per_client, args.new_tokens), args.case_timeout))
                # Other work on the machine skews a case; the load average says how much there was.
                row = {"design": design, "max_batch": DESIGNS[design]} | row | {
                    "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
                print(json.dumps(row), flush=True)
                rows.append(row)
        return rows
    finally:
        for process, _ in servers.values():
            stop_server(process)


def summary(results: list[dict]) -> dict:
    by = {(r["design"], r["clients"]): r for r in results}
    top = max(CLIENTS)
    batched, sequential = by[("batched", top)], by[("sequential", top)]
    speedup = batched["tokens_per_s"] / sequential["tokens_per_s"]
    return {f"throughput_ratio_at_{top}_clients": round(speedup, 2),
            f"p99_batched_vs_sequential_at_{top}_clients": [batched["p99_s"], sequential["p99_s"]],
            "target_4x_met": speedup >= 4, "target_p99_met": batched["p99_s"] <= sequential["p99_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer requests: check the script works")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server; more than 1 on a "
                        "machine shared with other work makes every batched matmul wait for a descheduled thread")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request; default 128 (quick: 16)")
    parser.add_argument("--case-timeout", type=float, default=1200, help="seconds one (design, clients) case may take")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)  # decode_speed.py's 128 new tokens
    default_out = Path("/tmp/serve_throughput_quick.json") if args.quick else ROOT / "results" / "serve_throughput.json"
    out = args.out or default_out
    shape = QUICK if args.quick else SMALL
    folder = build_model(Path("/tmp") / ("rugpt-bench-quick" if args.quick else "rugpt-bench-small"), shape)
    results = measure(folder, args)
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "server_threads": args.threads,
                    "torch": torch.__version__, "engine": "fast (fp32)"},
        "model": shape, "new_tokens": args.new_tokens, "requests_per_client": args.requests_per_client,
        "designs": {name: f"--max-batch {size}" for name, size in DESIGNS.items()},
        "results": results, "summary": summary(results),
    }
    write_report(out, report)


if __name__ == "__main__":
    main()
