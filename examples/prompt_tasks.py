"""Ready-made prompt-tuning tasks from data found on this machine, read by path and never copied.

- jokes: anecdotes from Debian's fortunes-ru (GPL-2), only collections of jokes, never the sex-themed ones;
- qa: XQuAD, Russian (CC BY-SA 4.0): context, question → answer.

Each returns (train, held_out) rows; the split is a hash of a stable name (the joke's collection and
number, the QA article), so it is the same everywhere and no held-out article leaks into training.
"""

from __future__ import annotations

import json
from pathlib import Path

from rugpt.errors import UsageError
from rugpt.training.corpus import FORTUNES_DIR, FORTUNES_EXCLUDED, clean_fortune, is_heldout

# Collections of anecdotes (no "-- Author" lines): Armenian radio, computer and IT jokes, one-liners, fake ads.
JOKE_COLLECTIONS = ("armenian", "computer", "just4fun", "adv", "M$")
XQUAD_RU = Path("qa") / "xquad.ru.json"


def joke_rows(root: Path = FORTUNES_DIR, heldout_fraction: float = 0.1,
              max_chars: int = 400) -> tuple[list[dict], list[dict]]:
    """Jokes as rows {"text": joke}, (train, held-out)."""
    if not root.is_dir():
        raise UsageError(f"fortunes-ru is not installed at {str(root)!r}; run `apt-get install fortunes-ru`")
    train, held_out = [], []
    for name in JOKE_COLLECTIONS:
        if name in FORTUNES_EXCLUDED:
            continue
        path = root / f"{name}.u8"
        entries = path.read_text(encoding="utf-8", errors="replace").split("\n%\n") if path.is_file() else []
        for number, entry in enumerate(entries):
            text = clean_fortune(entry)
            if 10 <= len(text) <= max_chars:
                (held_out if is_heldout(f"{name}#{number}", heldout_fraction) else train).append({"text": text})
    if not train or not held_out:
        raise UsageError(f"found too few jokes in {str(root)!r} (collections {', '.join(JOKE_COLLECTIONS)})")
    return train, held_out


def qa_rows(data_dir: Path, heldout_fraction: float = 0.15) -> tuple[list[dict], list[dict]]:
    """XQuAD-ru questions as rows {"context", "question", "answer"} (the first gold answer), (train, held-out)."""
    path = Path(data_dir) / XQUAD_RU
    if not path.is_file():
        raise UsageError(f"{str(path)!r} is missing; pass the shared data folder that holds {XQUAD_RU}")
    articles = json.loads(path.read_text(encoding="utf-8-sig"))["data"]
    train, held_out = [], []
    for article in articles:
        rows = [{"context": paragraph["context"].lstrip("\ufeff").strip(), "question": qa["question"].strip(),
                 "answer": qa["answers"][0]["text"].strip()}
                for paragraph in article["paragraphs"] for qa in paragraph["qas"] if qa["answers"]]
        (held_out if is_heldout(f"xquad/{article['title']}", heldout_fraction) else train).extend(rows)
    return train, held_out
