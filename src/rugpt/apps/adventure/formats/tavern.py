"""Tavern character cards, V1, V2 (malfoyslastname/character-card-spec-v2) and V3 (kwaroran/character-card-spec-v3):
JSON, a PNG's `chara` / `ccv3` text chunks (base64 of the JSON; `ccv3` wins), or a `.charx` zip with `card.json`.

A card becomes the beginning of an adventure:

    name → title (and {{char}}, or the V3 nickname)   description → memory      personality → personality
    scenario → world                                   first_mes, alternate_greetings → opening, greetings
    mes_example → examples                             system_prompt → system prompt (first in the context)
    post_history_instructions → post-history (last)    extensions.depth_prompt.prompt → author's note (SillyTavern)
    character_book → the adventure's world info; its scan_depth, token_budget, recursive_scanning → settings

Everything else (creator notes, tags, extensions, assets, fields of later versions) stays in the adventure's
`origin` and each entry's `extra`, and an export writes it back unchanged: both specs say editors must never
destroy unknown fields or `extensions`.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import time
import zipfile

from rugpt.apps.adventure.formats import limits
from rugpt.apps.adventure.formats.png import is_png, plain_picture, read_text, with_text, without_text
from rugpt.apps.adventure.state import MAX_TEXT, Adventure, AdventureSettings, Origin
from rugpt.apps.adventure.worldinfo import SelectiveLogic, WorldCard
from rugpt.errors import DataError

V2, V3 = "chara_card_v2", "chara_card_v3"
CHUNKS = ("ccv3", "chara")  # the first one found wins (V3 spec: "the application SHOULD use the ccv3 chunk")
TEXTS = {  # card field → adventure field
    "description": "memory", "personality": "personality", "scenario": "world", "mes_example": "examples",
    "system_prompt": "system_prompt", "post_history_instructions": "post_history",
}
ENTRY_FIELDS = ("keys", "content", "enabled", "insertion_order", "case_sensitive", "name", "priority", "comment",
                "selective", "secondary_keys", "constant", "position")
TAVERN = "tavern"  # the key of entries' and books' extras


def is_card(document: object) -> bool:
    if not isinstance(document, dict):
        return False
    if document.get("spec") in (V2, V3):
        return True
    return "spec" not in document and isinstance(document.get("name"), str) and "first_mes" in document  # V1


# --- reading


def read_png(data: bytes, name: str) -> tuple[dict, bytes]:
    """The card's JSON from a PNG, and the PNG without the card's chunks (its picture)."""
    texts = read_text(data, name)
    keyword = next((k for k in CHUNKS if k in texts), None)
    if keyword is None:
        raise DataError(f"{name} is a PNG without a character card: it has no 'chara' or 'ccv3' text chunk")
    try:
        raw = base64.b64decode("".join(texts[keyword].split()), validate=True)
        limits.check_size(raw, f"the {keyword!r} chunk of {name}", limits.MAX_JSON_BYTES)
        document = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"the {keyword!r} chunk of {name} is not base64 of JSON: {exc}") from None
    if not is_card(document):
        raise DataError(f"the {keyword!r} chunk of {name} is JSON but not a character card (no spec "
                        f"'{V2}' or '{V3}', nor V1's name and first_mes)")
    return document, without_text(data, set(CHUNKS), name)


def read_charx(data: bytes, name: str) -> dict:
    """The card.json of a .charx zip (V3)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            try:
                info = archive.getinfo("card.json")
            except KeyError:
                raise DataError(f"{name} is a zip without card.json at its root, so not a .charx card") from None
            if info.file_size > limits.MAX_JSON_BYTES:  # security: checked before inflating
                raise DataError(f"card.json in {name} has {info.file_size:,} bytes; the most is "
                                f"{limits.MAX_JSON_BYTES:,}")
            document = json.loads(archive.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {name} as a .charx card: {exc}") from None
    if not is_card(document):
        raise DataError(f"card.json in {name} is not a character card (its spec is {document.get('spec')!r})")
    return document


def adventure_from_card(document: dict, name: str, greeting: int = 0, origin: Origin | None = None) -> Adventure:
    """A new adventure from a card (V1, V2 or V3 JSON); `greeting` 0 is first_mes, 1.. the alternates."""
    data = document.get("data") if "spec" in document else document
    if not isinstance(data, dict):
        raise DataError(f"{name}: the card's 'data' must be an object, got {type(data).__name__}")
    text = {field: _text(data, field, name) for field in ("name", "first_mes", *TEXTS)}
    alternates = data.get("alternate_greetings") or []
    if not isinstance(alternates, list) or not all(isinstance(g, str) for g in alternates):
        raise DataError(f"{name}: alternate_greetings must be a list of texts")
    greetings = [text["first_mes"], *alternates] if alternates else []
    if not 0 <= greeting <= len(alternates):
        raise DataError(f"{name} has greetings 0 to {len(alternates)} (0 is the first message); "
                        f"greeting {greeting} does not exist")
    adventure = Adventure(title=text["name"] or name, scenario="card", world=text["scenario"],
                          opening=(greetings or [text["first_mes"]])[greeting], greetings=greetings,
                          character=(data.get("nickname") if isinstance(data.get("nickname"), str) else "")
                          or text["name"])
    for field, target in TEXTS.items():
        if field != "scenario":
            setattr(adventure, target, text[field])
    note = (data.get("extensions") or {}).get("depth_prompt") if isinstance(data.get("extensions"), dict) else None
    if isinstance(note, dict) and isinstance(note.get("prompt"), str):
        adventure.authors_note = note["prompt"]
    book = data.get("character_book")
    if book is not None:
        adventure.cards, adventure.settings = book_cards(book, name), book_settings(book, name)
    adventure.origin = origin or Origin(TAVERN, document)
    return adventure


def _text(data: dict, field: str, name: str) -> str:
    value = data.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{name}: the card's {field!r} must be text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise DataError(f"{name}: the card's {field!r} has {len(value):,} characters; the most is {MAX_TEXT:,}")
    return value


def book_settings(book: dict, name: str) -> AdventureSettings:
    """A character book's scan depth, token budget and recursion as the adventure's settings."""
    given = {"scan_turns": book.get("scan_depth"), "lore_tokens": book.get("token_budget")}
    for field, value in given.items():
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise DataError(f"{name}: character_book {field.replace('scan_turns', 'scan_depth')} must be a number "
                            f">= 0, got {value!r}")
    settings = AdventureSettings(recursive_lore=bool(book.get("recursive_scanning", False)))
    if given["scan_turns"] is not None:
        settings.scan_turns = int(given["scan_turns"])
    if given["lore_tokens"] is not None:
        settings.lore_tokens = int(given["lore_tokens"])
    return settings


def book_cards(book: object, name: str) -> list[WorldCard]:
    if not isinstance(book, dict) or not isinstance(book.get("entries"), list):
        raise DataError(f"{name}: character_book must be an object with 'entries' (a list)")
    return [card_from_entry(entry, f"{name}: character_book entry {i}") for i, entry in enumerate(book["entries"])]


def card_from_entry(entry: object, where: str) -> WorldCard:
    """One character-book entry; SillyTavern keeps its selective logic in extensions.selectiveLogic."""
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object, got {type(entry).__name__}")
    keys, secondary = entry.get("keys"), entry.get("secondary_keys") or []
    if not isinstance(keys, list | str) or not isinstance(secondary, list | str):
        raise DataError(f"{where}: keys and secondary_keys must be lists of texts")
    extensions = entry.get("extensions") if isinstance(entry.get("extensions"), dict) else {}
    try:
        return WorldCard(
            keys=tuple(keys) if isinstance(keys, list) else keys, text=str(entry.get("content") or ""),
            secondary_keys=tuple(secondary) if isinstance(secondary, list) else secondary,
            selective=bool(entry.get("selective", True)),
            logic=SelectiveLogic.from_number(extensions.get("selectiveLogic")),
            constant=bool(entry.get("constant", False)), enabled=bool(entry.get("enabled", True)),
            order=_whole(entry.get("insertion_order"), 100, where), priority=_whole(entry.get("priority"), None, where),
            position=entry.get("position") if entry.get("position") in ("before_char", "after_char") else "",
            case_sensitive=entry.get("case_sensitive") if isinstance(entry.get("case_sensitive"), bool) else None,
            name=str(entry.get("name") or ""), comment=str(entry.get("comment") or ""),
            extra={TAVERN: _entry_extra(entry, extensions)},
        )
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def _entry_extra(entry: dict, extensions: dict) -> dict:
    """What rugpt does not use of an entry, kept for the export: id, extensions, unknown fields, an odd position."""
    extra = {k: v for k, v in entry.items() if k not in ENTRY_FIELDS}
    if entry.get("position") not in (None, "before_char", "after_char"):
        extra["position"] = entry["position"]
    if extra.get("use_regex") is False:  # V3's default, written back by a V3 export
        del extra["use_regex"]
    extra["extensions"] = extensions  # mandatory, "must default to {}": an export writes {} where it is empty
    return extra if extra != {"extensions": {}} else {}


def _whole(value: object, default: int | None, where: str) -> int | None:
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise DataError(f"{where}: insertion_order and priority must be numbers, got {value!r}")
    return int(value)


# --- writing


def card_document(adventure: Adventure, version: int) -> dict:
    """The adventure as a card of spec V2 or V3, on top of the card it came from (whose unknown fields stay)."""
    origin = adventure.origin
    document = copy.deepcopy(origin.document) if origin is not None and origin.format in CARD_FORMATS else {}
    if "spec" not in document and document:  # a V1 card: its fields stay at the top too, as SillyTavern writes V2
        document["data"] = {k: v for k, v in document.items()}
    data = document.setdefault("data", {})
    greetings = adventure.greetings or [adventure.opening]
    fields = {"name": adventure.title, "first_mes": greetings[0], "alternate_greetings": greetings[1:],
              **{field: getattr(adventure, target) for field, target in TEXTS.items()}}
    data.update(fields)
    for field, default in (("creator_notes", ""), ("tags", []), ("creator", ""), ("character_version", "")):
        data.setdefault(field, default)
    extensions = data.setdefault("extensions", {})
    if isinstance(extensions.get("depth_prompt"), dict):
        extensions["depth_prompt"]["prompt"] = adventure.authors_note
    elif adventure.authors_note:  # SillyTavern's "character's note", the nearest thing a card has to a note
        extensions["depth_prompt"] = {"prompt": adventure.authors_note, "depth": adventure.settings.note_depth,
                                      "role": "system"}
    for field in ("name", "description", "personality", "scenario", "first_mes", "mes_example"):
        if field in document and field != "data":  # V1 fields kept at the top are kept current
            document[field] = data[field]
    if adventure.all_cards() or "character_book" in data:
        data["character_book"] = book_document(adventure, data.get("character_book"), version)
    if version == 3:
        document.update(spec=V3, spec_version="3.0")
        data.setdefault("group_only_greetings", [])
        data["modification_date"] = int(time.time())  # V3: "SHOULD add or modify this field when exported"
    else:
        document.update(spec=V2, spec_version="2.0")
    return document


def book_document(adventure: Adventure, original: object, version: int) -> dict:
    """The adventure's world info (its own cards, then its lorebooks') as a character book."""
    book = {k: v for k, v in original.items() if k != "entries"} if isinstance(original, dict) else {}
    settings = adventure.settings
    book.setdefault("extensions", {})
    book.update(scan_depth=settings.scan_turns, recursive_scanning=settings.recursive_lore)
    if settings.lore_tokens is not None:
        book["token_budget"] = settings.lore_tokens
    book["entries"] = [entry_document(card, version) for card in adventure.all_cards()]
    return book


def entry_document(card: WorldCard, version: int) -> dict:
    entry = copy.deepcopy(card.extra.get(TAVERN, {}))
    extensions = entry.setdefault("extensions", {})
    if card.logic is not SelectiveLogic.and_any or "selectiveLogic" in extensions:
        extensions["selectiveLogic"] = card.logic.number
    entry.update(keys=list(card.keys), content=card.text, enabled=card.enabled, insertion_order=card.order,
                 selective=card.selective, secondary_keys=list(card.secondary_keys), constant=card.constant)
    optional = {"case_sensitive": card.case_sensitive, "priority": card.priority, "name": card.name or None,
                "comment": card.comment or None, "position": card.position.value or None}
    entry.update({k: v for k, v in optional.items() if v is not None})
    if version == 3:
        entry.setdefault("use_regex", False)  # required in V3
    return entry


def write_json(adventure: Adventure) -> bytes:
    version = 3 if _origin_spec(adventure) == V3 else 2
    return json.dumps(card_document(adventure, version), ensure_ascii=False, indent=1).encode("utf-8")


def write_png(adventure: Adventure) -> bytes:
    """A PNG card with both chunks: `chara` (V2, for older tools) and `ccv3` (V3), as the V3 spec asks."""
    origin = adventure.origin
    picture = origin.blob if origin is not None and origin.format == "png" and origin.blob else plain_picture()
    texts = {"chara": _b64(card_document(adventure, 2)), "ccv3": _b64(card_document(adventure, 3))}
    return with_text(picture, texts)


def write_charx(adventure: Adventure) -> bytes:
    """A .charx zip: card.json (V3) and, if the card came as a .charx, its other files (assets) as they were."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("card.json", json.dumps(card_document(adventure, 3), ensure_ascii=False, indent=1))
        origin = adventure.origin
        if origin is not None and origin.format == "charx" and origin.blob:
            with zipfile.ZipFile(io.BytesIO(origin.blob)) as old:
                for info in old.infolist():
                    if info.filename != "card.json":
                        archive.writestr(info, old.read(info))
    return buffer.getvalue()


def _b64(document: dict) -> str:
    return base64.b64encode(json.dumps(document, ensure_ascii=False).encode("utf-8")).decode("ascii")


def _origin_spec(adventure: Adventure) -> str | None:
    origin = adventure.origin
    if origin is None or origin.format not in CARD_FORMATS or not isinstance(origin.document, dict):
        return None
    return origin.document.get("spec")


CARD_FORMATS = (TAVERN, "png", "charx")


def read_card(data: bytes, name: str, greeting: int = 0) -> Adventure:
    """An adventure from a card file's bytes: PNG, .charx zip or JSON."""
    if is_png(data):
        document, picture = read_png(data, name)
        return adventure_from_card(document, name, greeting, Origin("png", document, picture))
    if data.startswith(b"PK\x03\x04"):
        document = read_charx(data, name)
        return adventure_from_card(document, name, greeting, Origin("charx", document, data))
    document = json.loads(data.decode("utf-8-sig"))
    return adventure_from_card(document, name, greeting)
