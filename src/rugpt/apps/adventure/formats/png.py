"""PNG text chunks with the standard library (struct, zlib): read `tEXt`/`iTXt`, write `tEXt`, a plain picture.

Tavern character cards live in a PNG's text chunks (keyword `chara`, or `ccv3` for V3), base64 of the JSON.
A PNG is an 8-byte signature and then chunks: length (4 bytes, big-endian), type (4 ASCII letters), data,
CRC-32 of type and data (PNG specification, section 5.3). Pillow could do this too, but it would be a heavy
dependency for about a hundred lines, and it rewrites the image data where we only swap text chunks.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from rugpt.errors import DataError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT = 16 * 2**20  # bytes of one text chunk once decompressed


def is_png(data: bytes) -> bool:
    return data.startswith(SIGNATURE)


def chunks(data: bytes, name: str = "the PNG") -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking lengths and CRCs; stops after IEND."""
    if not is_png(data):
        raise DataError(f"{name} is not a PNG: it lacks the PNG signature")
    at = len(SIGNATURE)
    while at < len(data):
        if at + 8 > len(data):
            raise DataError(f"{name} is a truncated PNG: a chunk header is cut off at byte {at}")
        length, kind = struct.unpack(">I4s", data[at: at + 8])
        end = at + 8 + length
        if end + 4 > len(data):
            raise DataError(f"{name} is a truncated PNG: chunk {kind!r} at byte {at} runs past the end of the file")
        body = data[at + 8: end]
        (crc,) = struct.unpack(">I", data[end: end + 4])
        if zlib.crc32(kind + body) != crc:
            raise DataError(f"{name} is a damaged PNG: chunk {kind.decode('latin-1')!r} at byte {at} fails its CRC")
        yield kind, body
        if kind == b"IEND":
            return
        at = end + 4
    raise DataError(f"{name} is a truncated PNG: it has no IEND chunk")


def read_text(data: bytes, name: str = "the PNG") -> dict[str, str]:
    """The text chunks' keywords and texts (tEXt, and iTXt, compressed or not); the first of a keyword wins."""
    texts: dict[str, str] = {}
    for kind, body in chunks(data, name):
        if kind == b"tEXt" and b"\0" in body:
            keyword, text = body.split(b"\0", 1)
            texts.setdefault(keyword.decode("latin-1"), text.decode("latin-1"))
        elif kind == b"iTXt":
            keyword, text = _international(body, name)
            if keyword:
                texts.setdefault(keyword, text)
    return texts


def _international(body: bytes, name: str) -> tuple[str, str]:
    """An iTXt chunk: keyword, compression flag and method, language, translated keyword, then UTF-8 text."""
    try:
        keyword, rest = body.split(b"\0", 1)
        compressed, rest = rest[0], rest[2:]
        _language, rest = rest.split(b"\0", 1)
        _translated, text = rest.split(b"\0", 1)
    except (ValueError, IndexError):
        return "", ""
    if compressed:
        inflate = zlib.decompressobj()
        try:  # security: a small chunk may inflate to gigabytes; stop at MAX_TEXT
            text = inflate.decompress(text, MAX_TEXT)
        except zlib.error as exc:
            raise DataError(f"{name}: compressed text chunk {keyword!r} is damaged ({exc})") from None
        if inflate.unconsumed_tail:
            raise DataError(f"{name}: text chunk {keyword!r} inflates to more than {MAX_TEXT} bytes")
    return keyword.decode("latin-1"), text.decode("utf-8", errors="replace")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))


def without_text(data: bytes, keywords: set[str], name: str = "the PNG") -> bytes:
    """The PNG without the text chunks of these keywords (tEXt, zTXt and iTXt)."""
    kept = [SIGNATURE]
    for kind, body in chunks(data, name):
        keyword = body.split(b"\0", 1)[0].decode("latin-1") if kind in (b"tEXt", b"zTXt", b"iTXt") else None
        if keyword not in keywords:
            kept.append(_chunk(kind, body))
    return b"".join(kept)


def with_text(data: bytes, texts: dict[str, str], name: str = "the PNG") -> bytes:
    """The PNG with these tEXt chunks (Latin-1 text, as base64 is) before IEND, replacing any of the same keyword."""
    base = without_text(data, set(texts), name)
    added = b"".join(_chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in texts.items())
    return base[:-12] + added + base[-12:]  # IEND is the last 12 bytes: empty body, its length, type and CRC


def plain_picture(width: int = 256, height: int = 256, rgb: tuple[int, int, int] = (0xF6, 0xF1, 0xE7)) -> bytes:
    """A one-colour RGB picture: the face of a card exported from an adventure that had none."""
    row = b"\0" + bytes(rgb) * width  # each scanline starts with filter type 0 (none)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(row * height, 9)) + _chunk(b"IEND", b"")
