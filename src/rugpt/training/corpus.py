"""The bundled model's corpus: Russian classics (and optionally fortunes-ru), read by path and cleaned.

The corpus files are never copied into the project; this module reads them where they lie.
Documents are split into train and held-out sets by a hash of their path, so the split is
the same on every machine and a held-out text is never trained on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rugpt.errors import UsageError

# fortunes-ru collections that are sex-themed or crude: never part of what the bundled model learns.
FORTUNES_EXCLUDED = frozenset({"sex", "d1", "d21", "d41", "e0"})
FORTUNES_DIR = Path("/usr/share/games/fortunes/ru")

_PAGE_NUMBER = re.compile(r"^\s*[\[(]?\d{1,4}[\])]?\s*$")
_SEPARATOR = re.compile(r"^[\s\-_*=~.·•]{3,}$")
_FOOTNOTE_MARK = re.compile(r"\[\d{1,3}\]|\{\d{1,3}\}")
_INNER_SPACES = re.compile(r"[ \t\u00a0]+")
_DASH_RUN = re.compile(r"([-–—_=*]){4,}")


@dataclass(frozen=True)
class Document:
    """One text of the corpus: `source` is its path (or path#entry), `text` its cleaned content."""

    source: str
    text: str


def clean_text(raw: str) -> str:
    """Remove what teaches a model noise: page numbers, separator lines, footnote marks, runs of dashes.

    Paragraphs stay one per line; spaces inside a line are collapsed.
    """
    lines = []
    for line in raw.replace("\r\n", "\n").replace("\ufeff", "").split("\n"):
        if _PAGE_NUMBER.match(line) or _SEPARATOR.match(line):
            continue
        line = _FOOTNOTE_MARK.sub("", line)
        line = _DASH_RUN.sub(r"\1\1\1", line)
        line = _INNER_SPACES.sub(" ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def is_heldout(source: str, fraction: float) -> bool:
    """True for the stable `fraction` of documents kept out of training (hash of the source name)."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def iter_ruslit(root: Path) -> Iterator[Document]:
    """Every .txt file under the RusLit folder, cleaned, in a fixed order."""
    if not root.is_dir():
        raise UsageError(f"corpus folder {str(root)!r} does not exist; pass the path of shared/data/ruslit")
    for path in sorted(root.rglob("*.txt")):
        text = clean_text(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield Document(str(path.relative_to(root.parent)), text)


def iter_fortunes(root: Path = FORTUNES_DIR) -> Iterator[Document]:
    """Entries of Debian's fortunes-ru (GPL-2), without the sex-themed collections; one document per file."""
    for path in sorted(root.glob("*.u8")):
        if path.stem in FORTUNES_EXCLUDED:
            continue
        entries = [clean_fortune(e) for e in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        text = "\n\n".join(e for e in entries if e)
        if text:
            yield Document(f"fortunes-ru/{path.stem}", text)


def clean_fortune(entry: str) -> str:
    """One fortune: joined lines, the `-- Author` attribution kept on its own line as '— Author'."""
    body, author = [], ""
    for line in entry.strip("%\n").split("\n"):
        stripped = line.strip()
        if stripped.startswith("--"):
            author = "— " + stripped.lstrip("- ").strip()
        elif stripped:
            body.append(stripped)
    text = _INNER_SPACES.sub(" ", " ".join(body)).strip()
    return f"{text}\n{author}" if text and author else text


def load_corpus(ruslit: Path, with_fortunes: bool, heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents. fortunes-ru is added only when asked for and installed."""
    docs = list(iter_ruslit(ruslit))
    if with_fortunes:
        if not FORTUNES_DIR.is_dir():
            raise UsageError("fortunes-ru is not installed; run `apt-get install fortunes-ru` or drop --fortunes")
        docs.extend(iter_fortunes())
    train = [d for d in docs if not is_heldout(d.source, heldout_fraction)]
    heldout = [d for d in docs if is_heldout(d.source, heldout_fraction)]
    return train, heldout
