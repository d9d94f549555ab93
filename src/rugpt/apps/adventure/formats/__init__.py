"""The community's files, in and out: Tavern character cards (JSON, PNG, .charx), SillyTavern World Info,
KoboldAI saves, AI Dungeon story cards, and rugpt's own JSON.

A file is recognised by what it holds, never by its name: a PNG signature, a zip, or the shape of its JSON.
Whatever it is, it becomes an `Adventure`; lorebook files (World Info, story cards) become an adventure that
has only lorebooks, to join another one. Every import is checked whole (sizes, entries, settings) before
anything is saved, and one `DataError` says what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from rugpt.apps.adventure.context import expand_macros
from rugpt.apps.adventure.formats import aidungeon, koboldai, sillytavern, tavern
from rugpt.apps.adventure.formats.limits import MAX_FILE_BYTES, check_size
from rugpt.apps.adventure.formats.png import is_png
from rugpt.apps.adventure.state import EXPORT_FORMAT, Adventure, apply_header, export_adventure, import_adventure
from rugpt.apps.adventure.worldinfo import Lorebook
from rugpt.atomic import atomic_write_bytes
from rugpt.errors import DataError, UsageError

__all__ = ["Format", "Imported", "MAX_FILE_BYTES", "export_bytes", "format_for_path", "read_bytes", "read_file",
           "with_lorebooks", "write_file"]


class Format(str, Enum):
    """What a file holds; each name is a `--format` value."""

    rugpt = "rugpt"  # rugpt's own JSON: the whole adventure, turns, seeds and settings
    tavern = "tavern"  # a Tavern character card as JSON (V2, or V3 if the card was V3)
    png = "png"  # a Tavern character card in a PNG (chunks chara, V2, and ccv3, V3)
    charx = "charx"  # a V3 character card as a .charx zip
    sillytavern = "sillytavern"  # SillyTavern World Info: the adventure's world info as one lorebook
    koboldai = "koboldai"  # a KoboldAI save: the whole story, memory, note and world info
    aidungeon = "aidungeon"  # AI Dungeon story cards: the adventure's world info



EXTENSIONS = {".png": Format.png, ".charx": Format.charx, ".json": Format.rugpt}
LOREBOOK_V3 = "lorebook_v3"


@dataclass
class Imported:
    adventure: Adventure
    format: Format
    name: str  # the file's name without its extension
    lore_only: bool = False  # a lorebook file: it joins an adventure and has no story of its own


def read_file(path: str | Path, greeting: int = 0) -> Imported:
    """Import a file; its size is checked before it is read."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DataError(f"{path.name} has {size:,} bytes; the most rugpt imports is {MAX_FILE_BYTES:,} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    return read_bytes(data, path.name, greeting)


def read_bytes(data: bytes, filename: str, greeting: int = 0) -> Imported:
    """Import a file's bytes; `filename` names it in messages (its stem names a lorebook or a save's adventure)."""
    check_size(data, filename)
    name = Path(filename).stem or "imported"
    if is_png(data):
        return _checked(tavern.read_card(data, filename, greeting), Format.png, name)
    if data.startswith(b"PK\x03\x04"):
        return _checked(tavern.read_card(data, filename, greeting), Format.charx, name)
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{filename} is neither a PNG or .charx character card nor JSON ({exc})") from None
    if isinstance(document, dict) and document.get("format") == EXPORT_FORMAT:
        return _checked(import_adventure(document), Format.rugpt, name)
    if tavern.is_card(document):
        return _checked(tavern.adventure_from_card(document, filename, greeting), Format.tavern, name)
    if isinstance(document, dict) and document.get("spec") == LOREBOOK_V3:
        return _checked(_lore(_lorebook_v3(document, name)), Format.tavern, name, lore_only=True)
    if koboldai.is_save(document):
        return _checked(koboldai.adventure_from_save(document, name), Format.koboldai, name)
    if sillytavern.is_world(document):
        return _checked(_lore(sillytavern.lorebook_from_world(document, name)), Format.sillytavern, name, True)
    if aidungeon.is_story_cards(document):
        return _checked(_lore(aidungeon.lorebook_from_story_cards(document, name)), Format.aidungeon, name, True)
    raise DataError(
        f"{filename} is JSON but not a file rugpt imports: expected a rugpt adventure (format {EXPORT_FORMAT!r}), a "
        f"Tavern character card (spec chara_card_v2 or chara_card_v3), a SillyTavern World Info file (\"entries\"), "
        f"a KoboldAI save (\"prompt\" and \"actions\") or AI Dungeon story cards (a list of \"keys\" and \"value\")")


def _lore(book: Lorebook) -> Adventure:
    return Adventure(title="", scenario="", world="", opening="", lorebooks=[book])


def _lorebook_v3(document: dict, name: str) -> Lorebook:
    """A V3 lorebook on its own: {"spec": "lorebook_v3", "data": Lorebook}."""
    data = document.get("data")
    if not isinstance(data, dict):
        raise DataError(f"{name}: a lorebook_v3 file needs 'data' (an object with 'entries')")
    extra = {tavern.TAVERN: {k: v for k, v in data.items() if k != "entries"}}
    title = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else name
    return Lorebook(title, tuple(tavern.book_cards(data, name)), extra)


def _checked(adventure: Adventure, fmt: Format, name: str, lore_only: bool = False) -> Imported:
    """The adventure through rugpt's own validation (sizes, counts, settings)."""
    return Imported(import_adventure(export_adventure(adventure)), fmt, name, lore_only)


def format_for_path(path: str | Path, given: str | Format | None = None) -> Format:
    """The export format: `given`, or by the file's extension (.png, .charx; .json is rugpt's own)."""
    if given is not None:
        try:
            return Format(given)
        except ValueError:
            raise UsageError(f"format={given!r} is unknown; use one of {', '.join(f.value for f in Format)}") from None
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise UsageError(f"cannot tell the format of {Path(path).name!r} from its extension; name a .json, .png or "
                         f".charx file, or give --format ({', '.join(f.value for f in Format)})")
    return EXTENSIONS[suffix]


def export_bytes(adventure: Adventure, fmt: Format | str) -> bytes:
    """The adventure as a file of this format (the origin, if any, should be loaded: `AdventureStore.load_origin`)."""
    fmt = Format(fmt)
    if fmt is Format.png:
        return tavern.write_png(adventure)
    if fmt is Format.charx:
        return tavern.write_charx(adventure)
    if fmt is Format.tavern:
        return tavern.write_json(adventure)
    if fmt is Format.rugpt:
        document: object = export_adventure(adventure)
    elif fmt is Format.koboldai:
        document = koboldai.save_document(adventure, always_present(adventure))
    elif fmt is Format.sillytavern:
        books = adventure.lorebooks
        extra = books[0].extra if len(books) == 1 and not adventure.cards else None
        document = sillytavern.world_document(adventure.all_cards(), extra)
    else:
        document = aidungeon.story_cards_document(adventure.all_cards())
    return json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")


def always_present(adventure: Adventure) -> str:
    """The texts always at the top of the context, as one (KoboldAI's memory)."""
    parts = (adventure.system_prompt, adventure.memory, adventure.personality, adventure.world, adventure.examples)
    return "\n".join(expand_macros(adventure, part) for part in parts if part)


def media_type(fmt: Format) -> str:
    return {Format.png: "image/png", Format.charx: "application/zip"}.get(fmt, "application/json")


def file_suffix(fmt: Format) -> str:
    return {Format.png: ".png", Format.charx: ".charx"}.get(fmt, ".json")


def write_file(adventure: Adventure, path: str | Path, fmt: str | Format | None = None) -> Format:
    """Export to a file (its format from `fmt` or its extension), written whole or not at all."""
    fmt = format_for_path(path, fmt)
    atomic_write_bytes(Path(path).expanduser(), export_bytes(adventure, fmt))
    return fmt


def with_lorebooks(adventure: Adventure, imported: list[Imported]) -> list[Lorebook]:
    """The adventure's lorebooks and those of these lorebook files (checked: each must be a lorebook)."""
    stories = [i.name for i in imported if not i.lore_only]
    if stories:
        raise UsageError(f"{', '.join(stories)}: not a lorebook (a SillyTavern World Info file, AI Dungeon story cards "
                         f"or a V3 lorebook); a card or a save starts an adventure of its own")
    books = [*adventure.lorebooks, *(book for i in imported for book in i.adventure.lorebooks)]
    apply_header(Adventure(title="", scenario="", world="", opening=""), {"lorebooks": books})  # the limits
    return books
