"""Read JSON Lines files (one JSON object per line); every error names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from rugpt.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of `path`, counting lines from 1."""
    path = Path(path)
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object {{...}}, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: str | Path) -> list[dict]:
    """All objects of a JSON Lines file; blank lines are skipped."""
    return [record for _, record in iter_jsonl(path)]


def string_field(record: dict, name: str, path: str | Path, line: int) -> str:
    """`record[name]` when it is a string, else a DataError naming the file, the line and the field."""
    if name not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise DataError(f"{path}:{line}: no field {name!r} (fields here: {fields})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def read_field(path: str | Path, name: str) -> list[str]:
    """The string field `name` of every object in a JSON Lines file; an empty file is an error."""
    values = [string_field(record, name, path, line) for line, record in iter_jsonl(path)]
    if not values:
        raise DataError(f"{path}: no JSON objects in the file")
    return values


def _read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some Windows editors write
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text") from None
    return text.splitlines()
