"""How large an imported file may be: checked before it is read or inflated."""

from __future__ import annotations

from rugpt.errors import DataError

MAX_FILE_BYTES = 20 * 2**20  # a PNG card with a large picture fits; a 50 MB one does not
MAX_JSON_BYTES = 8 * 2**20  # the JSON inside a PNG chunk or a .charx zip


def check_size(data: bytes, name: str, most: int = MAX_FILE_BYTES) -> None:
    if len(data) > most:
        raise DataError(f"{name} has {len(data):,} bytes; the most rugpt imports is {most:,} bytes")
