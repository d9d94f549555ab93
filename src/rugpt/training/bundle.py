"""The last step of the bundled-model recipe: measure the trained model and ship it inside the package.

Measures held-out perplexity (per token and bits per character, on documents never trained on) and
the share of words in sampled text that a Russian morphology dictionary knows; writes the model,
tokenizer, metrics.json and a model card into the package's `bundled/` folder, atomically.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rugpt.atomic import atomic_write_dir

# Fixed prompts whose seeded continuations are committed beside the model card (samples.md), so that people
# can read what each edition of the model writes, not only its loss.
SAMPLE_PROMPTS = (
    "Александр Сергеевич Пушкин родился",
    "Вечером мы вышли в сад, и",
    "Зима. Крестьянин, торжествуя,",
    "Он долго смотрел на неё и наконец сказал:",
    "В старом доме на краю деревни",
    "Москва встретила нас",
    "Мой дядя самых честных правил,",
    "На следующее утро",
    "Письмо было коротким:",
    "Когда я вернулся домой, мать",
    "Доктор снял очки и",
    "В лесу было тихо, только",
    "— Послушайте, — сказал старик, —",
    "Поезд остановился на маленькой станции.",
    "Русская литература",
    "Весна в этом году пришла рано.",
    "Я помню тот день, когда",
    "Вы вошли в тёмную пещеру. Перед вами",
    "Вопрос: Какая река течёт через Москву?\nОтвет:",
    "Однажды в студёную зимнюю пору",
)
SAMPLES_FILE = "samples.md"
_WORD = re.compile(r"[а-яё]+(?:-[а-яё]+)*", re.IGNORECASE)


@torch.no_grad()
def heldout_perplexity(model, tokens: np.ndarray, characters: int, block: int) -> dict:
    """Perplexity over the whole held-out stream in consecutive windows of `block` tokens."""
    from rugpt.training.loss import loss_on_targets

    model.eval()
    total_nats, counted = 0.0, 0
    for start in range(0, len(tokens) - 1, block):
        window = torch.from_numpy(tokens[start : start + block + 1].astype(np.int64))
        if len(window) < 2:
            break
        total_nats += float(loss_on_targets(model, window[None, :-1], window[None, 1:]))
        counted += len(window) - 1
    return {
        "tokens": counted,
        "loss": total_nats / counted,
        "perplexity": math.exp(total_nats / counted),
        "bits_per_character": total_nats / math.log(2) / characters,
    }


def real_word_share(texts: list[str]) -> dict:
    """Share of the words in `texts` that pymorphy3's dictionary knows (not guessed)."""
    import pymorphy3

    morph = pymorphy3.MorphAnalyzer()
    words = [w.lower() for text in texts for w in _WORD.findall(text)]
    known = sum(1 for w in words if morph.word_is_known(w))
    return {"words": len(words), "known": known, "share": known / max(1, len(words))}


def sample_texts(loaded, count_per_prompt: int = 3, max_new_tokens: int = 80) -> list[str]:
    """Seeded samples with the default (balanced) preset, as a new user would first see them; the first of
    each prompt's samples is the one samples.md shows."""
    from rugpt.generation import GenerationSettings, Generator

    generator = Generator(loaded)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, num_return_sequences=count_per_prompt, seed=0)
    return [c.text for p in SAMPLE_PROMPTS for c in generator.generate(p, settings).completions]


def previous_edition(dest: Path) -> dict | None:
    """The metrics and samples of the model `dest` holds now, which the export is about to replace."""
    if not (dest / "metrics.json").is_file() or not (dest / "model.safetensors").is_file():
        return None
    from rugpt.models import load

    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["samples"] = sample_texts(load(str(dest), device="cpu"), count_per_prompt=1)
    return metrics


def run_tokenizer(run_dir: Path) -> Path:
    """The tokenizer the run trained with: its recorded setting, else the recipe's `run/tokenizer`."""
    record = run_dir / "settings.json"
    if record.is_file():
        return Path(json.loads(record.read_text())["tokenizer"])
    return run_dir / "tokenizer"


def training_stages(run_dir: Path, state: dict, previous: dict | None) -> list[dict]:
    """Every training run behind the model: the runs it continued from, back to a run from scratch or to the
    previous edition (whose stages its metrics list), whether or not those runs were exported themselves."""
    record = run_dir / "settings.json"
    settings = json.loads(record.read_text()) if record.is_file() else {}
    stage = {"steps": state["step"], "tokens_seen": state["tokens_seen"], "minutes": round(state["elapsed"] / 60, 1),
             "init_from": settings.get("init_from"), "lr": settings.get("lr"), "min_lr": settings.get("min_lr"),
             "warmup_steps": settings.get("warmup_steps"), "budget_minutes": settings.get("minutes"),
             "block_size": settings.get("block_size"), "seed": settings.get("seed")}
    if not settings.get("init_from"):
        return [stage]
    parent = _run_checkpoint(Path(settings["init_from"]))
    if parent is not None:
        parent_run, checkpoint = parent
        return [*training_stages(parent_run, json.loads((checkpoint / "state.json").read_text()), previous), stage]
    if previous is None:
        return [stage]
    before = previous.get("stages") or [{"steps": previous["steps"], "tokens_seen": previous["tokens_seen"],
                                         "minutes": previous["training_minutes"], "init_from": None}]
    return [*before, stage]


def _run_checkpoint(model_dir: Path) -> tuple[Path, Path] | None:
    """(run folder, checkpoint) for a model folder inside a pre-training run's checkpoint
    (`<run>/checkpoints/step-N/model`), else None."""
    checkpoint = model_dir.parent
    if model_dir.name == "model" and checkpoint.parent.name == "checkpoints" and (checkpoint / "state.json").is_file():
        return checkpoint.parent.parent, checkpoint
    return None


def export_bundle(run_dir: Path, dest: Path, training_minutes: float | None = None) -> dict:
    """Evaluate the run's checkpoint and write model, tokenizer, metrics and model card into `dest`."""
    from rugpt.errors import UsageError
    from rugpt.models import load
    from rugpt.training.checkpoints import latest_checkpoint

    checkpoint, tokens_dir = latest_checkpoint(run_dir), run_dir / "tokens"
    if checkpoint is None:
        raise UsageError(f"run={str(run_dir)!r} has no checkpoint; run `rugpt pretrain --out {run_dir}` first")
    previous = previous_edition(dest)
    tokenizer = run_tokenizer(run_dir)
    with atomic_write_dir(dest) as tmp:
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy2(checkpoint / "model" / name, tmp / name)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tokenizer / name, tmp / name)
        loaded = load(str(tmp), device="cpu")
        stats = json.loads((tokens_dir / "stats.json").read_text())
        state = json.loads((checkpoint / "state.json").read_text())
        heldout = np.load(tokens_dir / "heldout.npy")
        block = loaded.context_length
        samples = sample_texts(loaded)
        stages = training_stages(run_dir, state, previous)
        metrics = {
            "parameters": loaded.model.num_parameters(),
            "steps": sum(s["steps"] for s in stages),
            "tokens_seen": sum(s["tokens_seen"] for s in stages),
            "training_minutes": training_minutes or round(sum(s["minutes"] for s in stages), 1),
            "stages": stages,
            "train": {k: stats["train"][k] for k in ("documents", "characters", "tokens")},
            "heldout": {k: stats["heldout"][k] for k in ("documents", "characters", "tokens")}
            | heldout_perplexity(loaded.model, heldout, stats["heldout"]["characters"], block),
            "heldout_sources": stats["heldout"]["sources"],
            "real_words": real_word_share(samples),
            "samples": [f"{p}{t}" for p, t in zip(SAMPLE_PROMPTS, samples[::3], strict=True)],
            "history": state["evals"],
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=1))
        (tmp / "README.md").write_text(model_card(metrics, loaded.model.config, previous))
        (tmp / SAMPLES_FILE).write_text(samples_page(samples[::3], previous))
    return metrics


def samples_page(samples: list[str], previous: dict | None) -> str:
    """The fixed prompts' continuations (default preset, seed 0), beside the previous edition's."""
    lines = ["# rugpt-tiny: continuations of 20 fixed prompts", "",
             "Default (balanced) preset, seed 0, 80 new tokens; made by `rugpt export-bundled`.", ""]
    old = (previous or {}).get("samples") or []
    for i, (prompt, text) in enumerate(zip(SAMPLE_PROMPTS, samples, strict=True)):
        lines += [f"## {i + 1}. {prompt}", "", "**This edition:**", "", _quote(prompt + text), ""]
        if i < len(old):
            lines += ["**Previous edition:**", "", _quote(prompt + old[i]), ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines())


def model_card(metrics: dict, config, previous: dict | None = None) -> str:
    h = metrics["heldout"]
    samples = "\n".join(f"- {s}" for s in metrics["samples"][:8])
    recipe = "\n".join(_stage_command(i, s) for i, s in enumerate(metrics.get("stages") or [{}]))
    return f"""# rugpt-tiny: the bundled Russian model

A small GPT-2 trained from scratch by this project's own recipe, so that every `rugpt` command works
offline on a fresh machine. It writes Russian-looking prose; it knows little and is no substitute for
ruGPT-3 (`rugpt generate --model small ...`).

| | |
|---|---|
| architecture | GPT-2: {config.n_layer} layers × width {config.n_embd} × {config.n_head} heads, context {config.n_positions} |
| parameters | {metrics["parameters"] / 1e6:.2f} M (fp32, tied embeddings) |
| tokenizer | byte-level BPE, {config.vocab_size} tokens, `<|endoftext|>` = 0 |
| training | {metrics["steps"]} steps, {metrics["tokens_seen"] / 1e6:.1f} M tokens, {metrics["training_minutes"]} min on 2 CPU cores (bf16 autocast) |
| held-out perplexity | {h["perplexity"]:.1f} per token; {h["bits_per_character"]:.3f} bits per character ({h["documents"]} documents, {h["characters"]:,} characters never trained on) |
| real Russian words in samples | {metrics["real_words"]["share"]:.1%} of {metrics["real_words"]["words"]} words known to pymorphy3 (default preset, seed 0) |
{_comparison(metrics, previous)}
## Data and licences
- **RusLit** (github.com/d0rj/RusLit): Russian classics — Pushkin, Lermontov, Nekrasov, Blok, Gogol,
  Chekhov, Dostoevsky, Tolstoy, Gorky, Herzen, Bryusov — public domain. Cleaned of page numbers,
  separator lines and footnote marks.
- **fortunes-ru** (Debian package, GPL-2): aphorisms, quotes and jokes, without the sex-themed
  collections (sex, d1, d21, d41, e0). Because of this part, treat the weights as a GPL-2 derived work.
- Held out: about 3% of documents, chosen by a hash of their path; listed in `metrics.json`.

## Recipe
```
rugpt train-tokenizer --corpus ../shared/data/ruslit
{recipe}
```

## Samples (default preset, seed 0)
{samples}

All 20 fixed prompts, beside the previous edition's continuations: [{SAMPLES_FILE}]({SAMPLES_FILE}).
"""


def _stage_command(index: int, stage: dict) -> str:
    if not stage.get("init_from"):
        return f"rugpt pretrain --minutes {stage.get('minutes', 95)}\nrugpt export-bundled"
    seed = "" if stage.get("seed") is None else f" --seed {stage['seed']}"
    return (f"rugpt pretrain --out runs/bundled{index + 1} --init-from {stage['init_from']} --tokenizer src/rugpt/bundled "
            f"--lr {stage['lr']} --min-lr {stage.get('min_lr')} --warmup-steps {stage.get('warmup_steps')} "
            f"--short-until 0 --minutes {stage.get('budget_minutes', stage['minutes'])}{seed}  # continued pre-training\n"
            f"rugpt export-bundled --run runs/bundled{index + 1}")


def _comparison(metrics: dict, previous: dict | None) -> str:
    """Rows comparing this edition with the one it replaced (empty when there was none)."""
    if previous is None:
        return ""
    h, p = metrics["heldout"], previous["heldout"]
    return (f"| previous edition | perplexity {p['perplexity']:.1f}, {p['bits_per_character']:.3f} bits/char, "
            f"real words {previous['real_words']['share']:.1%}, {previous['tokens_seen'] / 1e6:.1f} M tokens seen |\n"
            f"| change | bits/char {h['bits_per_character'] - p['bits_per_character']:+.3f} |\n")
