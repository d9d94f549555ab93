"""SillyTavern World Info (a lorebook file): `{"entries": {"<uid>": {...}, ...}}`, entries keyed by uid.

Fields used (SillyTavern's public/scripts/world-info.js, `newWorldInfoEntryDefinition`): `key` and `keysecondary`
(lists), `content`, `comment`, `constant`, `selective`, `selectiveLogic` (0 AND ANY, 1 NOT ALL, 2 NOT ANY,
3 AND ALL), `order` (insertion order), `position` (0 before the character, 1 after it; the others — author's
note, @depth, example messages, outlets — go where rugpt puts every triggered entry), `disable`, `caseSensitive`.
The rest (probability, depth, groups, timed effects, ...) and the file's other fields are kept for the export.
"""

from __future__ import annotations

import copy
import itertools

from rugpt.apps.adventure.worldinfo import Lorebook, Position, SelectiveLogic, WorldCard
from rugpt.errors import DataError

SILLYTAVERN = "sillytavern"
USED = ("key", "keysecondary", "content", "comment", "constant", "selective", "selectiveLogic", "order", "disable",
        "caseSensitive")
POSITIONS = {0: Position.before_char, 1: Position.after_char}


def is_world(document: object) -> bool:
    return isinstance(document, dict) and isinstance(document.get("entries"), dict | list) and "spec" not in document


def lorebook_from_world(document: dict, name: str) -> Lorebook:
    """A lorebook named after its file (or its own "name") from a World Info file."""
    entries = document["entries"]
    items = list(entries.items()) if isinstance(entries, dict) else [(str(i), e) for i, e in enumerate(entries)]
    cards = tuple(card_from_entry(entry, f"{name}: entry {uid}") for uid, entry in items)
    title = document.get("name") if isinstance(document.get("name"), str) and document.get("name") else name
    return Lorebook(title, cards, {SILLYTAVERN: {k: v for k, v in document.items() if k != "entries"}})


def card_from_entry(entry: object, where: str) -> WorldCard:
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object, got {type(entry).__name__}")
    keys, secondary = entry.get("key", []), entry.get("keysecondary") or []
    if not isinstance(keys, list | str) or not isinstance(secondary, list | str):
        raise DataError(f"{where}: key and keysecondary must be lists of texts")
    order = entry.get("order", 100)
    if not isinstance(order, int | float) or isinstance(order, bool):
        raise DataError(f"{where}: order must be a number, got {order!r}")
    extra = {k: v for k, v in entry.items() if k not in USED}
    position = POSITIONS.get(entry.get("position", 0), Position.unspecified)  # SillyTavern's default is 0
    if position is not Position.unspecified:
        extra.pop("position", None)
    try:
        return WorldCard(
            keys=tuple(keys) if isinstance(keys, list) else (keys,), text=str(entry.get("content") or ""),
            secondary_keys=tuple(secondary) if isinstance(secondary, list) else (secondary,),
            selective=bool(entry.get("selective", True)),
            logic=SelectiveLogic.from_number(entry.get("selectiveLogic", 0)),
            constant=bool(entry.get("constant", False)), enabled=not entry.get("disable", False), order=int(order),
            position=position,
            case_sensitive=entry.get("caseSensitive") if isinstance(entry.get("caseSensitive"), bool) else None,
            comment=str(entry.get("comment") or ""), extra={SILLYTAVERN: extra},
        )
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def world_document(cards: list[WorldCard], book_extra: dict | None = None) -> dict:
    """A World Info file of these entries; uids kept where the entries came from SillyTavern and are free."""
    document = copy.deepcopy((book_extra or {}).get(SILLYTAVERN, {}))
    taken: set[int] = set()
    wanted = [card.extra.get(SILLYTAVERN, {}).get("uid") for card in cards]
    entries = {}
    for card, uid in zip(cards, wanted, strict=True):
        if not isinstance(uid, int) or uid in taken:
            uid = next(u for u in itertools.count() if u not in taken and u not in wanted)
        taken.add(uid)
        entries[str(uid)] = entry_document(card, uid)
    document["entries"] = entries
    return document


def entry_document(card: WorldCard, uid: int) -> dict:
    entry = copy.deepcopy(card.extra.get(SILLYTAVERN, {}))
    entry.update(uid=uid, key=list(card.keys), keysecondary=list(card.secondary_keys),
                 comment=card.comment or card.name, content=card.text, constant=card.constant, selective=card.selective,
                 selectiveLogic=card.logic.number, order=card.order, disable=not card.enabled)
    if card.position is not Position.unspecified or "position" not in entry:
        entry["position"] = 0 if card.position is Position.before_char else 1
    if card.case_sensitive is not None or "caseSensitive" in entry:
        entry["caseSensitive"] = card.case_sensitive
    return entry
