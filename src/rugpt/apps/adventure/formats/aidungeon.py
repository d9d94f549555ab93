"""AI Dungeon story cards: a JSON array of `{"keys": "comma,separated", "value": ..., "type": ..., "title": ...,
"description": ..., "useForCharacterCreation": ...}`, read as a lorebook.

`value` is the text that enters the context, `title` the card's name, `description` a note for the author (never
in the context); `type` and the rest are kept for the export. AI Dungeon has no constant cards: an export leaves
out constant entries without keys, and disabled entries.
"""

from __future__ import annotations

import copy

from rugpt.apps.adventure.worldinfo import Lorebook, WorldCard
from rugpt.errors import DataError

AIDUNGEON = "aidungeon"
USED = ("keys", "value", "title", "description")


def is_story_cards(document: object) -> bool:
    return isinstance(document, list) and bool(document) and all(
        isinstance(card, dict) and "value" in card and "keys" in card for card in document)


def lorebook_from_story_cards(document: list, name: str) -> Lorebook:
    return Lorebook(name, tuple(card_from_story_card(card, f"{name}: story card {i}") for i, card in
                                enumerate(document)))


def card_from_story_card(card: dict, where: str) -> WorldCard:
    keys = card.get("keys")
    if isinstance(keys, str):
        keys = tuple(k.strip() for k in keys.split(","))
    elif isinstance(keys, list):
        keys = tuple(str(k) for k in keys)
    else:
        raise DataError(f"{where}: keys must be comma-separated text, got {type(keys).__name__}")
    extra = {"type": "custom", "useForCharacterCreation": False} | {k: v for k, v in card.items() if k not in USED}
    try:
        return WorldCard(keys=keys, text=str(card.get("value") or ""),
                         name=str(card.get("title") or (keys[0].strip() if keys else "")),
                         comment=str(card.get("description") or ""), extra={AIDUNGEON: extra})
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def story_cards_document(cards: list[WorldCard]) -> list[dict]:
    documents = []
    for card in cards:
        if not card.enabled or not card.keys:
            continue
        entry = {"type": "custom", "useForCharacterCreation": False} | copy.deepcopy(card.extra.get(AIDUNGEON, {}))
        entry.update(keys=",".join(card.keys), value=card.text, title=card.name or card.keys[0],
                     description=card.comment)
        documents.append(entry)
    return documents
