"""Serving on Ray Serve replicas: `rugpt serve --replicas 1 / 2` against the one-process `rugpt serve`, in one run.

A randomly initialised GPT-2 of ruGPT-3 small's shape (vocab 50264, 12 layers, width 768, context 2048) is
served three ways, one after another, each in a subprocess on 127.0.0.1 with 1 torch thread per model copy
(OMP_NUM_THREADS=1, --cpus-per-replica 1) and batches of up to 16 rows:

- `single`: `rugpt serve`, one process, uvicorn (the baseline);
- `ray-1`: `rugpt serve --replicas 1`, one replica behind Ray's HTTP proxy (what the proxy costs);
- `ray-2`: `rugpt serve --replicas 2`, two replicas (what a second copy of the model adds).

For 1 and 16 concurrent clients, each sending a fixed number of requests back to back (a ~50-token prompt,
128 new tokens, greedy, fixed length), it measures aggregate generated tokens per second and p50 / p99
latency (serve_throughput.py's client loop). Each configuration starts its own local Ray instance, so the
three see the same machine, one at a time; the load average before and after each case says how busy it was.
Needs Ray Serve (`pip install 'rugpt[cluster]'`).

    python benchmarks/serve_replicas.py            # full run, writes benchmarks/results/serve_replicas.json
    python benchmarks/serve_replicas.py --quick    # tiny model, few requests: checks the script, writes to /tmp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from decode_speed import QUICK, SMALL, build_model, cpu_name
from serve_throughput import free_port, run_clients, stop_server

ROOT = Path(__file__).resolve().parent
CLIENTS = (1, 16)
CONFIGS = {"single": None, "ray-1": 1, "ray-2": 2}  # --replicas of each (None: no Ray)


def start(folder: Path, replicas: int | None, startup_timeout: float) -> tuple[subprocess.Popen, str]:
    """`rugpt serve` in a subprocess on 127.0.0.1; returns it once every replica answers."""
    port = free_port()
    cmd = [sys.executable, "-c", "from rugpt.cli import main; main()", "serve", "--model", str(folder),
           "--engine", "fast", "--port", str(port), "--max-batch", "16", "--max-waiting", "64",
           "--max-queue-seconds", "0", "--request-timeout", "900", "--max-tokens-limit", "2048", "--no-play",
           "--log-level", "warning"]
    if replicas is not None:
        cmd += ["--replicas", str(replicas), "--cpus-per-replica", "1"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-3000:]}")
        try:
            if _serving(url, replicas):
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"the server did not serve within {startup_timeout:g} s")


def _serving(url: str, replicas: int | None) -> bool:
    if httpx.get(f"{url}/health", timeout=5).status_code != 200:
        return False
    if replicas is None:
        return True
    page = httpx.get(f"{url}/metrics", timeout=15).text
    return f"rugpt_cluster_replicas {float(replicas)}" in page


def measure(folder: Path, args) -> list[dict]:
    rows = []
    for config, replicas in CONFIGS.items():
        began = time.monotonic()
        process, url = start(folder, replicas, args.startup_timeout)
        started = round(time.monotonic() - began, 1)
        try:
            asyncio.run(run_clients(url, 2, 1, 8))  # warm-up: every replica's first-call allocations
            for clients in CLIENTS:
                load_before = os.getloadavg()[0]
                row = asyncio.run(asyncio.wait_for(
                    run_clients(url, clients, args.requests_per_client, args.new_tokens), args.case_timeout))
                row = {"config": config, "replicas": replicas or 0, "startup_s": started} | row | {
                    "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            stop_server(process)
    return rows


def summary(results: list[dict]) -> dict:
    by = {(r["config"], r["clients"]): r for r in results}
    top, one = max(CLIENTS), min(CLIENTS)
    single, ray1, ray2 = by[("single", top)], by[("ray-1", top)], by[("ray-2", top)]
    return {
        f"tokens_per_s_at_{top}_clients": {c: by[(c, top)]["tokens_per_s"] for c in CONFIGS},
        f"p99_s_at_{top}_clients": {c: by[(c, top)]["p99_s"] for c in CONFIGS},
        f"two_vs_one_replica_throughput_at_{top}_clients": round(ray2["tokens_per_s"] / ray1["tokens_per_s"], 2),
        f"two_replicas_vs_single_process_throughput_at_{top}_clients":
            round(ray2["tokens_per_s"] / single["tokens_per_s"], 2),
        f"proxy_overhead_throughput_ratio_at_{top}_clients": round(ray1["tokens_per_s"] / single["tokens_per_s"], 3),
        f"proxy_overhead_p50_s_at_{one}_client": round(by[("ray-1", one)]["p50_s"] - by[("single", one)]["p50_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer tokens: check the script works")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request; default 128 (quick: 16)")
    parser.add_argument("--case-timeout", type=float, default=1800, help="seconds one (config, clients) case may take")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds a server may take to serve")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)
    out = args.out or (Path("/tmp/serve_replicas_quick.json") if args.quick
                       else ROOT / "results" / "serve_replicas.json")
    shape = QUICK if args.quick else SMALL
    folder = build_model(Path("/tmp") / ("rugpt-bench-quick" if args.quick else "rugpt-bench-small"), shape)
    results = measure(folder, args)
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads_per_model_copy": 1,
                    "torch": torch.__version__, "engine": "fast (fp32)", "ray": _ray_version()},
        "model": shape, "new_tokens": args.new_tokens, "requests_per_client": args.requests_per_client,
        "max_batch": 16, "configs": {name: f"--replicas {n}" if n else "one process" for name, n in CONFIGS.items()},
        "results": results, "summary": summary(results),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps(report["summary"]))
    print(f"wrote {out}")


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
