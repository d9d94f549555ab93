"""Speculative decoding speed: prompt-lookup drafting against plain greedy decoding, in one run, same output.

The bundled model, greedy, on copying workloads, where lookup drafts come from the prompt and the text so far:
quoting a Russian passage back, summarising it, and a chat that repeats people's names. Passages are public-domain
prose from ../shared/data/ruslit (GitHub d0rj/RusLit). Every workload runs plainly and with `speculate="lookup"`
in alternation (rounds over all cases, so a slow spell of this shared machine hits both alike); the texts must be
identical token for token, and tokens/s (prefill included), drafted / accepted tokens and the acceptance rate are
reported, with the ratio of an extend call to a one-row step as measured during the run (what decides whether a
lookup draft is worth checking). The issue's target is at least 1.5x plain greedy.

    python benchmarks/speculative_speed.py            # full run, writes benchmarks/results/speculative_speed.json
    python benchmarks/speculative_speed.py --quick    # short texts, one round: a smoke test (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent.parent / "shared" / "data" / "ruslit" / "prose"
PASSAGES = {"chekhov": ("Chekhov/Ванька.txt", 0.30), "pushkin": ("Pushkin/Пиковая дама.txt", 0.33)}
CHAT = (
    "Пользователь: Здравствуйте! Меня зовут Аполлинария Вениаминовна Кржижановская.\n"
    "Ассистент: Здравствуйте, Аполлинария Вениаминовна! Чем я могу помочь?\n"
    "Пользователь: Мой сосед, Евстигней Пафнутьевич Загоруйко, опять шумит по ночам.\n"
    "Ассистент: Понимаю, Аполлинария Вениаминовна. Евстигней Пафнутьевич Загоруйко шумит каждую ночь?\n"
    "Пользователь: Да. Что мне сказать Евстигнею Пафнутьевичу Загоруйко?\n"
    "Ассистент:"
)


def passage(name: str, chars: int) -> str:
    """`chars` characters of a prose file from `fraction` of the way in, starting at a sentence."""
    file, fraction = PASSAGES[name]
    text = (DATA / file).read_text(encoding="utf-8")
    start = text.index(". ", int(len(text) * fraction)) + 2
    return " ".join(text[start : start + chars].split())


def workloads(chars: int) -> dict[str, str]:
    out = {}
    for name in PASSAGES:
        text = passage(name, chars)
        out[f"quote-{name}"] = f"Отрывок:\n{text}\n\nПовтори отрывок слово в слово:\n{text[:100]}"
        out[f"summary-{name}"] = f"Текст:\n{text}\n\nКраткий пересказ текста:\n"
    out["chat-names"] = CHAT
    return out


def run_case(generator, prompt: str, settings, speculate: str | None) -> dict:
    start = time.perf_counter()
    result = generator.generate(prompt, settings, speculate=speculate)
    seconds = time.perf_counter() - start
    tokens = len(result.completions[0].token_ids)
    row = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
           "token_ids": result.completions[0].token_ids}
    if result.speculation is not None:
        row |= result.speculation.as_dict()
    return row


def summarise(name: str, plain: list[dict], lookup: list[dict]) -> dict:
    same = all(p["token_ids"] == s["token_ids"] for p, s in zip(plain, lookup, strict=True))
    plain_rate = statistics.median(r["tokens_per_s"] for r in plain)
    lookup_rate = statistics.median(r["tokens_per_s"] for r in lookup)
    last = lookup[-1]
    return {"workload": name, "new_tokens": plain[-1]["tokens"], "identical_output": same,
            "plain_tokens_per_s": round(plain_rate, 1), "lookup_tokens_per_s": round(lookup_rate, 1),
            "speedup": round(lookup_rate / plain_rate, 2),
            "runs_plain_tokens_per_s": [round(r["tokens_per_s"], 1) for r in plain],
            "runs_lookup_tokens_per_s": [round(r["tokens_per_s"], 1) for r in lookup],
            "drafted": last["drafted"], "accepted": last["accepted"], "rounds": last["rounds"],
            "acceptance_rate": last["acceptance_rate"],
            "tokens_per_engine_call": round(last["tokens"] / last["rounds"], 2)}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short texts, one round: check that the script works")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every case; the median is reported")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from rugpt.generation import GenerationSettings, Generator

    rounds, new_tokens, chars = (1, 80, 400) if args.quick else (args.rounds, args.new_tokens, 700)
    out = args.out or ROOT / "results" / ("speculative_speed_quick.json" if args.quick else "speculative_speed.json")
    generator = Generator(None, engine=args.engine)
    settings = GenerationSettings.from_preset("greedy", no_repeat_ngram_size=0, max_new_tokens=new_tokens)
    cases = workloads(chars)
    if args.quick:
        cases = {k: v for k, v in cases.items() if k in ("quote-chekhov", "chat-names")}
    for speculate in (None, "lookup"):  # warm-up: engine built, kernels loaded, call costs first measured
        generator.generate(CHAT, settings, max_new_tokens=16, speculate=speculate)
    runs: dict[str, dict[str, list[dict]]] = {name: {"plain": [], "lookup": []} for name in cases}
    for round_number in range(rounds):
        for name, prompt in cases.items():
            for kind, speculate in (("plain", None), ("lookup", "lookup")):
                row = run_case(generator, prompt, settings, speculate)
                runs[name][kind].append(row)
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "token_ids"}
                print(json.dumps({"round": round_number, "workload": name, "kind": kind} | shown), flush=True)
    results = [summarise(name, r["plain"], r["lookup"]) for name, r in runs.items()]
    costs = generator.speculator("lookup").costs
    report = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__},
        "model": generator.loaded.name, "engine": generator.engine().name, "rounds": rounds, "quick": args.quick,
        "decoding": "greedy", "max_new_tokens": new_tokens, "passage_chars": chars,
        "data": "ruslit prose (public domain; GitHub d0rj/RusLit): " + ", ".join(f for f, _ in PASSAGES.values()),
        "extend_to_step_ratio": {f"{fed} tokens": round(costs.ratio(fed), 2) for fed in (2, 4, 8)},
        "step_ms": None if costs.step is None else round(costs.step * 1e3, 2),
        "extend_ms_per_token": None if costs.per_token is None else round(costs.per_token * 1e3, 2),
        "results": results,
        "median_speedup": statistics.median(r["speedup"] for r in results),
        "all_identical": all(r["identical_output"] for r in results),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps({k: report[k] for k in ("extend_to_step_ratio", "median_speedup", "all_identical")}))
    print(f"wrote {out}")
    assert report["all_identical"], "speculative output differs from plain greedy"


if __name__ == "__main__":
    main()
