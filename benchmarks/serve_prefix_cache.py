"""Prefix caching: time to first token of a 20-turn text adventure played through `rugpt serve`, cache on vs off.

Each turn's prompt is the adventure's fixed beginning plus every earlier turn (the player's line and the
reply the server wrote), plus the new line, as the adventure engine lays out its context: the prompt grows
by a turn each time and starts with the whole of the previous one. With the prefix cache the server finds
the previous turn's keys and values (its prompt and its reply) and computes only the new line; without it,
the whole prompt is prefilled again.

A randomly initialised GPT-2 of ruGPT-3 small's shape (vocab 50264, 12 layers, width 768, context 2048;
speed does not depend on weight values) is served twice in subprocesses on 127.0.0.1, the same in all but
`--prefix-cache-mb` (default vs 0), each with 2 torch threads; the turns alternate between the two
servers, so both see the same conditions on a machine shared with other work. Time to first token is the
time from sending a streamed request to its first chunk of text. Greedy replies are the same on both
servers (checked: the cache changes no token).

    python benchmarks/serve_prefix_cache.py           # full run, writes benchmarks/results/serve_prefix_cache.json
    python benchmarks/serve_prefix_cache.py --quick   # tiny model, 5 short turns: a smoke test, writes to /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx
import torch
from decode_speed import QUICK, SMALL, build_model, cpu_name
from serve_throughput import start_server, stop_server, stream_chunk, write_report

ROOT = Path(__file__).resolve().parent
BEGINNING = ("Ты просыпаешься на холодном каменном полу древнего храма. Сквозь трещины в своде падает бледный "
             "свет луны, и в его лучах кружится пыль. Вдоль стен стоят статуи забытых богов, их лица стёрты "
             "временем. Где-то вдалеке капает вода, и эхо разносит звук по бесконечным коридорам. У тебя с собой "
             "только походная сумка, огниво и старая карта, на которой кто-то углём отметил три знака. ")
ACTIONS = ["осмотреться", "открыть сумку", "взять огниво", "зажечь факел", "посмотреть на карту", "пойти на север",
           "прислушаться", "подойти к статуе", "прочитать надпись", "спуститься по лестнице", "открыть дверь",
           "позвать на помощь", "идти на звук воды", "напиться из ручья", "обойти колонну", "поднять камень",
           "бросить камень в темноту", "отметить путь на карте", "подняться на галерею", "выйти к свету"]
CACHE_MB = {"cache": None, "no-cache": 0}  # --prefix-cache-mb of each design; None: the server's default


def streamed_completion(client: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, str, int]:
    """(seconds to the first chunk of text, the whole text, completion tokens) of one greedy streamed request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "preset": "greedy",
            "no_repeat_ngram_size": 0, "stream": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first, pieces, tokens = None, [], 0
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            chunk = stream_chunk(line)
            if chunk is None:
                continue
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    first = first if first is not None else time.perf_counter() - began
                    pieces.append(choice["text"])
    return first if first is not None else time.perf_counter() - began, "".join(pieces), tokens


def cache_metrics(client: httpx.Client) -> dict:
    """The prefix cache's counters from /metrics."""
    wanted = {"rugpt_prefix_cache_hits_total": "hits", "rugpt_prefix_cache_lookups_total": "lookups",
              "rugpt_prefix_cache_saved_tokens_total": "saved_tokens", "rugpt_prefix_cache_bytes": "bytes"}
    found = {}
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


def play(urls: dict[str, str], turns: int, new_tokens: int, tokenizer) -> list[dict]:
    """The same adventure on every server, turn by turn; each server keeps its own history of replies."""
    histories = {design: BEGINNING for design in urls}
    clients = {design: httpx.Client(base_url=url, timeout=900) for design, url in urls.items()}
    rows = []
    try:
        for turn in range(turns):
            row = {"turn": turn + 1}
            replies = {}
            for design, client in clients.items():
                prompt = histories[design] + f"\n> {ACTIONS[turn % len(ACTIONS)]}\n"
                ttft, reply, tokens = streamed_completion(client, prompt, new_tokens)
                histories[design] = prompt + reply
                replies[design] = reply
                row[f"{design}_ttft_s"] = round(ttft, 4)
                row["prompt_tokens"] = len(tokenizer(prompt)["input_ids"])
                row[f"{design}_tokens"] = tokens
            row["speedup"] = round(row["no-cache_ttft_s"] / row["cache_ttft_s"], 2)
            row["same_reply"] = len(set(replies.values())) == 1
            print(json.dumps(row), flush=True)
            rows.append(row)
        for design, client in clients.items():
            rows.append({"design": design, "metrics": cache_metrics(client)})
        return rows
    finally:
        for client in clients.values():
            client.close()


def summary(rows: list[dict]) -> dict:
    turns = [r for r in rows if "turn" in r]
    last = turns[-1]
    return {f"ttft_turn_{last['turn']}_cache_vs_no_cache_s": [last["cache_ttft_s"], last["no-cache_ttft_s"]],
            f"speedup_at_turn_{last['turn']}": last["speedup"], "target_5x_met": last["speedup"] >= 5,
            "same_replies_every_turn": all(r["same_reply"] for r in turns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 5 short turns: check the script works")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--turns", type=int, default=None, help="turns to play; default 20 (quick: 5)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per reply; default 40 (quick: 8)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    turns = args.turns or (5 if args.quick else 20)
    new_tokens = args.new_tokens or (8 if args.quick else 40)
    out = args.out or (Path("/tmp/serve_prefix_cache_quick.json") if args.quick
                       else ROOT / "results" / "serve_prefix_cache.json")
    shape = QUICK if args.quick else SMALL
    folder = build_model(Path("/tmp") / ("rugpt-bench-quick" if args.quick else "rugpt-bench-small"), shape)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    servers = {design: start_server(folder, args.threads, *([] if mb is None else ["--prefix-cache-mb", str(mb)]))
               for design, mb in CACHE_MB.items()}
    try:
        for _, url in servers.values():  # warm-up: first-call allocations, lazy imports (and nothing to reuse)
            with httpx.Client(base_url=url, timeout=900) as client:
                streamed_completion(client, "Разминка.", 2)
        rows = play({design: url for design, (_, url) in servers.items()}, turns, new_tokens, tokenizer)
    finally:
        for process, _ in servers.values():
            stop_server(process)
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "server_threads": args.threads,
                    "torch": torch.__version__, "engine": "fast (fp32)",
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "model": shape, "turns": turns, "new_tokens": new_tokens,
        "designs": {name: "server default" if mb is None else f"--prefix-cache-mb {mb}"
                    for name, mb in CACHE_MB.items()},
        "results": rows, "summary": summary(rows),
    }
    write_report(out, report)


if __name__ == "__main__":
    main()
