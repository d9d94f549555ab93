"""The per-token cost of JSON-schema enforcement in a shared batch: 8 rows without a grammar, against 4 rows held to
a JSON schema (rugpt.grammar, llguidance) plus 4 without, in one run.

The rows are the server's: the decode core (`rugpt.decoding.advance`) on the fast engine, 8 rows stepped together,
greedy, as the scheduler steps them. The model is a randomly initialised GPT-2 of ruGPT-3 small's shape (vocab
50264, 12 layers, width 768, 12 heads; speed does not depend on weight values) with the bundled tokenizer (8,000
tokens: llguidance's mask work grows with the tokenizer's vocabulary, so ruGPT-3's 50,257 tokens would cost it
more). The schema holds a long string, so no grammar row finishes inside the measured window and every step
decodes all 8 rows.

Reported: each row's pick (its sampling under the grammar's mask, the grammar's advance, the finish rules) timed
inside the same batched steps for the rows with and without the schema; their difference is the enforcement's
cost per token, and so stays meaningful when the machine is shared (a slow spell hits both alike). Also the time
inside llguidance itself (mask + advance) per token, and the median batched step of both batches for scale (on a
shared machine these whole-step times swing far more than the grammar's cost, so they are context, not the result).

    python benchmarks/serve_json_schema.py --quick   # ~1 minute: writes benchmarks/results/serve_json_schema.json
    python benchmarks/serve_json_schema.py           # more tokens and rounds, same file
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from decode_speed import SMALL, build_model, cpu_name

from rugpt.decoding import RowDecoder, RowSettings, advance, start_row
from rugpt.engines import create_engine
from rugpt.grammar import GrammarMatcher, JsonGrammar, ll_tokenizer
from rugpt.models import load
from rugpt.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent
ROWS, WITH_SCHEMA = 8, 4
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "story"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 40},
                         "story": {"type": "string", "minLength": 4000}}}
PROMPT = ("Анкета героя в формате JSON. Мой дядя самых честных правил, когда не в шутку занемог, он уважать себя "
          "заставил и лучше выдумать не мог.")


class PickClock:
    """Times every row's pick (sampling with its grammar's mask, the grammar's advance, the finish rules) inside
    `advance`, by wrapping RowDecoder.pick: rows with and without a grammar are timed in the same steps, so a slow
    spell of this shared machine hits both alike and their difference is the grammar's cost."""

    def __init__(self):
        self.picks: dict[bool, list[float]] = {True: [], False: []}  # has a grammar → seconds of each pick
        self.grammar_seconds, self.grammar_calls = 0.0, 0
        pick, allowed, accept = RowDecoder.pick, GrammarMatcher.allowed, GrammarMatcher.accept
        clock = self

        def timed_pick(row):
            began = time.perf_counter()
            try:
                return pick(row)
            finally:
                clock.picks[row.grammar is not None].append(time.perf_counter() - began)

        def timed_allowed(matcher):
            began = time.perf_counter()
            try:
                return allowed(matcher)
            finally:
                clock.grammar_seconds += time.perf_counter() - began
                clock.grammar_calls += 1

        def timed_accept(matcher, token):
            began = time.perf_counter()
            try:
                return accept(matcher, token)
            finally:
                clock.grammar_seconds += time.perf_counter() - began

        RowDecoder.pick, GrammarMatcher.allowed, GrammarMatcher.accept = timed_pick, timed_allowed, timed_accept

    def reset(self) -> None:
        self.picks = {True: [], False: []}
        self.grammar_seconds, self.grammar_calls = 0.0, 0


def run_batch(engine, tokenizer, grammar: JsonGrammar | None, new_tokens: int) -> list[float]:
    """Seconds of each batched step (pick for all 8 rows + one engine step) while all rows decode."""
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    plain = RowSettings(SamplingParams(do_sample=False), new_tokens + 1)
    held = RowSettings(SamplingParams(do_sample=False), new_tokens + 1, grammar=grammar)
    rows = [start_row(engine, tokenizer, ids, held if grammar and r < WITH_SCHEMA else plain, seed=r)
            for r in range(ROWS)]
    times = []
    try:
        for _ in range(new_tokens):
            began = time.perf_counter()
            outcomes = advance(engine, rows)
            times.append(time.perf_counter() - began)
            if any(isinstance(o, Exception) or o.finish is not None for o in outcomes):
                raise RuntimeError(f"a row stopped early: {outcomes}")
    finally:
        for row in rows:
            engine.release(row.engine_row)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds: about a minute")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_json_schema.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new_tokens, rounds = (8, 3) if args.quick else (128, 5)
    folder = build_model(Path("/tmp") / "rugpt-bench-small", SMALL)
    loaded = load(str(folder), device="cpu")
    engine = create_engine(loaded, "fast", max_rows=ROWS)
    began = time.perf_counter()
    ll_tokenizer(loaded.tokenizer)  # once per tokenizer, at the first JSON request
    tokenizer_ms = (time.perf_counter() - began) * 1e3
    began = time.perf_counter()
    grammar = JsonGrammar(loaded.tokenizer, SCHEMA, strict=True)
    compile_ms = (time.perf_counter() - began) * 1e3
    run_batch(engine, loaded.tokenizer, grammar, 4)  # warm-up: the engine's first steps, llguidance's caches
    clock = PickClock()
    steps: dict[str, list[float]] = {"8 without": [], "4 with + 4 without": []}
    picks: dict[bool, list[float]] = {True: [], False: []}
    grammar_seconds, grammar_calls = 0.0, 0
    for round_number in range(rounds):
        steps["8 without"] += run_batch(engine, loaded.tokenizer, None, new_tokens)
        clock.reset()
        steps["4 with + 4 without"] += run_batch(engine, loaded.tokenizer, grammar, new_tokens)
        for has_grammar in picks:
            picks[has_grammar] += clock.picks[has_grammar]
        grammar_seconds, grammar_calls = grammar_seconds + clock.grammar_seconds, grammar_calls + clock.grammar_calls
        print(json.dumps({"round": round_number} | {k: round(statistics.median(v) * 1e3, 2)
                                                    for k, v in steps.items()}), flush=True)
    plain, mixed = (statistics.median(steps[k]) * 1e3 for k in steps)
    pick_with, pick_without = (statistics.median(picks[k]) * 1e3 for k in (True, False))
    report = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "engine": engine.name},
        "model": SMALL | {"tokenizer": "bundled, 8000 tokens"},
        "mode": "quick" if args.quick else "full",
        "rows": ROWS, "rows_with_schema": WITH_SCHEMA, "new_tokens": new_tokens, "rounds": rounds,
        "llguidance_tokenizer_ms": round(tokenizer_ms, 2),
        "schema_compile_ms": round(compile_ms, 2),
        # whole batched steps: dominated by the engine, and by the machine's load when it is shared
        "step_ms_median": {"8 without": round(plain, 3), "4 with + 4 without": round(mixed, 3)},
        # one row's pick, timed in the same steps for rows with and without the schema
        "pick_ms_median": {"with schema": round(pick_with, 4), "without": round(pick_without, 4)},
        "enforcement_ms_per_token": round(pick_with - pick_without, 4),
        "grammar_ms_per_token": round(grammar_seconds * 1e3 / max(grammar_calls, 1), 4),
        "enforcement_percent_of_8_row_step_per_grammar_row": round(100 * (pick_with - pick_without) / plain, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
