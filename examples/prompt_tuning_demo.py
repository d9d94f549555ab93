"""Prompt tuning for real, on the bundled model: an «анекдот» prompt (fortunes-ru jokes) and a question-answering
prompt (XQuAD-ru). Each trained prompt is compared on held-out rows with no prompt and with a hand-written
instruction — the loss is the mean cross-entropy of the same target tokens (the joke or the answer, plus
end-of-text) in all three cases — and a few samples are shown.

    python examples/prompt_tuning_demo.py            # the full run: about 10 minutes on 2 CPU cores
    python examples/prompt_tuning_demo.py --quick    # a smoke run on a few rows, under a minute

Writes benchmarks/results/prompt_tuning_demo.json (--quick: runs/prompt-demo/demo_quick.json) and the
trained prompts under runs/prompt-demo/
(try them: rugpt generate --prompt-tuned runs/prompt-demo/joke "").
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from prompt_tasks import JOKE_COLLECTIONS, joke_rows, qa_rows

from rugpt.generation import GenerationSettings, Generator
from rugpt.models import LoadedModel, load
from rugpt.prompts.losses import evaluate
from rugpt.prompts.preprocessing import Text2TextPreprocessor
from rugpt.prompts.prompt_format import PromptFormat
from rugpt.prompts.training import PromptTuningSettings, prompt_tune

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "prompt_tuning_demo.json"
JOKE_FORMAT = "<P*20>"
QA_FORMAT = "<P*8>{context}<P*4>{question}<P*4>"
# Baselines put their text in a field ("prefix"): a format must hold a slot or a field.
JOKE_BASELINES = {"no prompt": "<|endoftext|>", "instruction": "Анекдот:\n"}
QA_BASELINES = {"no prompt": "{context}\n{question}\n",
                "instruction": "Текст: {context}\nВопрос: {question}\nКраткий ответ:\n"}


@dataclass
class DemoSettings:
    model: str | None
    data_dir: Path
    out: Path
    results: Path
    quick: bool
    epochs: int
    seed: int = 0


def heldout_loss(loaded: LoadedModel, template: str, rows: list[dict], target: str, truncation: str | None = None,
                 batch_size: int = 8) -> float:
    """Mean cross-entropy per target token on `rows` formatted with `template` (the model may be patched)."""
    fmt = PromptFormat(template, tokenizer=loaded.tokenizer)
    pre = Text2TextPreprocessor(fmt, loaded.tokenizer, target, max_tokens=loaded.context_length,
                                truncation_field=truncation)
    processed = [pre(row) for row in rows]
    collate = pre.collate_fn()
    batches = (collate(processed[i : i + batch_size]) for i in range(0, len(processed), batch_size))
    return evaluate(loaded.model, batches).loss


def generate(generator: Generator, text: str, seed: int, sample: bool) -> str:
    settings = GenerationSettings(max_new_tokens=60 if sample else 20, do_sample=sample, temperature=0.8, top_p=0.95,
                                  repetition_penalty=1.1, seed=seed, stop=() if sample else ("\n",))
    return generator.generate(text, settings).text.strip()


def run_jokes(loaded: LoadedModel, s: DemoSettings) -> dict:
    train, held_out = joke_rows()
    if s.quick:
        train, held_out = train[:48], held_out[:16]
    settings = PromptTuningSettings(format=JOKE_FORMAT, target_field="text", epochs=s.epochs, batch_size=16,
                                    seed=s.seed, patience=2)
    started = time.perf_counter()
    result = prompt_tune(train, settings, loaded, eval_data=held_out, out=s.out / "joke")
    seconds = time.perf_counter() - started
    losses = {"trained prompt": heldout_loss(loaded, JOKE_FORMAT, held_out, "text")}
    for name, prefix in JOKE_BASELINES.items():
        losses[name] = heldout_loss(loaded, "{prefix}", [{**r, "prefix": prefix} for r in held_out], "text")
    generator = Generator(loaded)
    samples = {
        "trained prompt": [generate(generator, result.prompt.render(""), seed, True) for seed in range(4)],
        "instruction": [generate(generator, JOKE_BASELINES["instruction"], seed, True) for seed in range(4)],
    }
    return {"task": f"jokes (fortunes-ru, GPL-2: {', '.join(JOKE_COLLECTIONS)})",
            "format": JOKE_FORMAT, "train_rows": len(train), "heldout_rows": len(held_out),
            "train_seconds": round(seconds, 1), "best_epoch": result.best_epoch,
            "prompt_bytes": result.saved.size_bytes, "heldout_loss": losses, "samples": samples}


def run_qa(loaded: LoadedModel, s: DemoSettings) -> dict:
    train, held_out = qa_rows(s.data_dir)
    if s.quick:
        train, held_out = train[:32], held_out[:8]
    settings = PromptTuningSettings(format=QA_FORMAT, target_field="answer", truncation_field="context",
                                    epochs=s.epochs, batch_size=8, seed=s.seed, patience=2)
    started = time.perf_counter()
    result = prompt_tune(train, settings, loaded, eval_data=held_out, out=s.out / "qa")
    seconds = time.perf_counter() - started
    losses = {"trained prompt": heldout_loss(loaded, QA_FORMAT, held_out, "answer", "context")}
    for name, template in QA_BASELINES.items():
        losses[name] = heldout_loss(loaded, template, held_out, "answer", "context")
    generator = Generator(loaded)
    shown = held_out[:: max(1, len(held_out) // 5)][:5]
    fit = PromptFormat(QA_BASELINES["instruction"], tokenizer=loaded.tokenizer)
    samples = [{
        "question": row["question"], "gold": row["answer"],
        "trained prompt": generate(generator, result.prompt(_fitted(result.prompt.format, loaded, row)), 0, False),
        "instruction": generate(generator, fit(_fitted(fit, loaded, row)), 0, False),
    } for row in shown]
    return {"task": "question answering (XQuAD-ru, CC BY-SA 4.0)", "format": QA_FORMAT, "train_rows": len(train),
            "heldout_rows": len(held_out), "train_seconds": round(seconds, 1), "best_epoch": result.best_epoch,
            "prompt_bytes": result.saved.size_bytes, "heldout_loss": losses, "samples": samples}


def _fitted(fmt: PromptFormat, loaded: LoadedModel, row: dict) -> dict:
    """The row with its context cut so the question plus 20 new tokens fit the model's context."""
    return fmt.truncate(row, loaded.tokenizer, loaded.context_length, "context", reserve_tokens=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="alias, hub id or folder (default: the bundled model)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data", help="holds qa/xquad.ru.json")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "prompt-demo", help="folder for trained prompts")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON report (default: benchmarks/results/prompt_tuning_demo.json; --quick: in --out)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a few rows and one epoch: checks the script works")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    results = args.results or (args.out / "demo_quick.json" if args.quick else RESULTS)
    s = DemoSettings(args.model, args.data_dir, args.out, results, args.quick, 1 if args.quick else args.epochs)
    loaded = load(s.model, device="cpu")
    report = {"model": loaded.name, "quick": s.quick, "jokes": run_jokes(loaded, s)}
    report["qa"] = run_qa(load(s.model, device="cpu"), s)  # a fresh copy: one prompt per model
    s.results.parent.mkdir(parents=True, exist_ok=True)
    s.results.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    for task in ("jokes", "qa"):
        losses = ", ".join(f"{k} {v:.3f}" for k, v in report[task]["heldout_loss"].items())
        print(f"{task}: held-out loss per target token — {losses}")
    print(f"results in {s.results}")


if __name__ == "__main__":
    main()
