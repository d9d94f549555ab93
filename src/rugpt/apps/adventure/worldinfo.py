"""World info: lore entries that enter the context when their keys appear in recent text, as the community's
formats (Tavern character books, SillyTavern World Info, KoboldAI) mean them.

Russian keys match by lemma, so the key «змей» fires on «змея», «змеем» and «змеи» alike, and «Хромой гусь»
on «у Хромого гуся»; plain substring matching (what English engines do) would miss Russian cases. Keys
without Cyrillic letters match as SillyTavern and KoboldAI match them: a case-insensitive substring.

Secondary keys follow SillyTavern's selective logic (`world_info_logic` in its world-info.js): AND ANY (a
primary key and any secondary one), AND ALL, NOT ANY, NOT ALL. KoboldAI's "selective" is AND ANY. Constant
entries are always in; entries are placed by insertion order (lower first) and, when the lore's token budget
is short, the ones of lowest priority (the insertion order where no priority is given) are left out first.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from rugpt.apps.adventure.morphology import normal_forms, top_normal_form
from rugpt.errors import DataError

TOKEN = re.compile(r"\w+(?:-\w+)*")
CYRILLIC = re.compile(r"[а-яё]", re.IGNORECASE)
MAX_KEYS = 50
MAX_KEY = 200  # characters in one key
DEFAULT_ORDER = 100
RECURSION_STEPS = 3  # passes over triggered entries' own text when a lorebook scans recursively


class SelectiveLogic(str, Enum):
    """How secondary keys combine with a primary match (SillyTavern's selectiveLogic 0..3)."""

    and_any = "and_any"  # a primary key and at least one secondary key
    not_all = "not_all"  # a primary key, and not every secondary key
    not_any = "not_any"  # a primary key and no secondary key
    and_all = "and_all"  # a primary key and every secondary key

    @classmethod
    def from_number(cls, value: object) -> SelectiveLogic:
        numbers = list(cls)
        return numbers[value] if isinstance(value, int) and 0 <= value < len(numbers) else cls.and_any

    @property
    def number(self) -> int:
        return list(SelectiveLogic).index(self)


class Position(str, Enum):
    """Where a constant entry sits in the stable beginning of the context: around the character's description."""

    unspecified = ""
    before_char = "before_char"
    after_char = "after_char"


@dataclass(frozen=True)
class WorldCard:
    """One piece of lore and the words that call it into the context.

    `extra` keeps what a file format says about the entry that rugpt does not use, by format name
    ({"sillytavern": {"uid": 3, "probability": 100, ...}}), so an export to that format gives it back.
    """

    keys: tuple[str, ...]
    text: str
    secondary_keys: tuple[str, ...] = ()
    selective: bool = True  # use the secondary keys (V2 cards: "ignored if selective == false")
    logic: SelectiveLogic = SelectiveLogic.and_any
    constant: bool = False  # always in the context (within the lore budget), in its stable beginning
    enabled: bool = True
    order: int = DEFAULT_ORDER  # insertion order: lower is placed earlier
    priority: int | None = None  # budget: lower is left out first; None uses `order`
    position: Position = Position.unspecified
    case_sensitive: bool | None = None
    name: str = ""
    comment: str = ""
    extra: dict = field(default_factory=dict, compare=True, hash=False)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("keys", _clean_keys(self.keys))
        set_("secondary_keys", _clean_keys(self.secondary_keys))
        set_("text", self.text.strip())
        set_("logic", SelectiveLogic(self.logic))
        set_("position", Position(self.position or ""))
        set_("extra", {fmt: fields for fmt, fields in self.extra.items() if fields})  # nothing kept: no entry
        label = f"world-info entry {self.label()!r}"
        if not self.keys and not self.constant and self.enabled:  # a switched-off blank entry is harmless
            raise DataError(f"{label} has no keys; give it at least one key or make it constant")
        if len(self.keys) > MAX_KEYS or len(self.secondary_keys) > MAX_KEYS:
            raise DataError(f"{label} has more than {MAX_KEYS} keys")
        if any(len(k) > MAX_KEY for k in self.keys + self.secondary_keys):
            raise DataError(f"{label} has a key longer than {MAX_KEY} characters")
        if not self.text:
            raise DataError(f"{label} has no text")
        if not isinstance(self.order, int) or not (self.priority is None or isinstance(self.priority, int)):
            raise DataError(f"{label}: order and priority must be whole numbers")

    def label(self) -> str:
        """How error messages name the entry: its name, comment, first key or the start of its text."""
        return (self.name or self.comment or (self.keys[0] if self.keys else "") or self.text[:40])[:60]

    @property
    def rank(self) -> int:
        """Budget rank: entries of the lowest rank are left out first."""
        return self.order if self.priority is None else self.priority

    @classmethod
    def from_dict(cls, data: dict) -> WorldCard:
        """From rugpt's own JSON (what `to_dict` writes; {"keys": [...], "text": ...} at the least)."""
        if not isinstance(data, dict) or not isinstance(data.get("keys", []), list | tuple):
            raise DataError(f"world-info card must be an object with 'keys' (a list) and 'text', got {data!r:.80}")
        try:
            return cls(
                keys=tuple(str(k) for k in data.get("keys") or ()), text=str(data.get("text", "")),
                secondary_keys=tuple(str(k) for k in data.get("secondary_keys") or ()),
                selective=bool(data.get("selective", True)), logic=SelectiveLogic(data.get("logic", "and_any")),
                constant=bool(data.get("constant", False)), enabled=bool(data.get("enabled", True)),
                order=data.get("order", DEFAULT_ORDER), priority=data.get("priority"),
                position=Position(data.get("position", "")), case_sensitive=data.get("case_sensitive"),
                name=str(data.get("name", "")), comment=str(data.get("comment", "")),
                extra=dict(data.get("extra") or {}),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"bad world-info card {str(data)[:80]!r}: {exc}") from None

    def to_dict(self) -> dict:
        """Keys and text, plus every field that differs from its default."""
        data = {"keys": list(self.keys), "text": self.text}
        for name in ("secondary_keys", "selective", "logic", "constant", "enabled", "order", "priority", "position",
                     "case_sensitive", "name", "comment", "extra"):
            value = getattr(self, name)
            if value != getattr(_DEFAULT, name):
                data[name] = list(value) if isinstance(value, tuple) else value.value if isinstance(value, Enum) \
                    else value
        return data


def _clean_keys(keys) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = (keys,)
    return tuple(k.strip() for k in keys if isinstance(k, str) and k.strip())


_DEFAULT = WorldCard(("x",), "x")


@dataclass(frozen=True)
class Lorebook:
    """A named set of entries brought in from a file (a SillyTavern world, AI Dungeon story cards, ...)."""

    name: str
    cards: tuple[WorldCard, ...]
    extra: dict = field(default_factory=dict, hash=False)  # the book's own unknown fields, by format

    @classmethod
    def from_dict(cls, data: dict) -> Lorebook:
        if not isinstance(data, dict) or not isinstance(data.get("cards"), list):
            raise DataError(f"a lorebook must be an object with 'name' and 'cards' (a list), got {data!r:.80}")
        return cls(str(data.get("name", "")), tuple(WorldCard.from_dict(c) for c in data["cards"]),
                   dict(data.get("extra") or {}))

    def to_dict(self) -> dict:
        return {"name": self.name, "cards": [c.to_dict() for c in self.cards], "extra": self.extra}


# --- matching


@functools.lru_cache(maxsize=4096)
def _key_lemmas(key: str) -> tuple[frozenset[str], ...]:
    """Each word of a key as the forms it may take: itself and its likeliest lemma."""
    return tuple(frozenset({w.lower(), top_normal_form(w)}) for w in TOKEN.findall(key))


class ScanText:
    """Recent text, prepared once for every key: its words' lemmas, its lower-cased and its own form."""

    def __init__(self, text: str):
        self.text, self.lower = text, text.lower()
        self.forms = [normal_forms(word.lower()) for word in TOKEN.findall(text)]

    def has(self, key: str, case_sensitive: bool | None = None) -> bool:
        if case_sensitive:
            return key in self.text
        # security: keys written as /regex/ (SillyTavern) are never compiled: a file's pattern must not be able to
        # stall a shared server with catastrophic backtracking. They match as plain text, i.e. practically never.
        if not CYRILLIC.search(key):
            return key.lower() in self.lower
        wanted = _key_lemmas(key)
        if not wanted:
            return False
        span, forms = len(wanted), self.forms
        return any(all(wanted[k] & forms[start + k] for k in range(span)) for start in range(len(forms) - span + 1))


def matches(card: WorldCard, text: ScanText) -> bool:
    """Whether a keyed entry fires on `text`: a primary key, then its secondary keys by its logic."""
    if not any(text.has(key, card.case_sensitive) for key in card.keys):
        return False
    if not (card.selective and card.secondary_keys):
        return True
    found = [text.has(key, card.case_sensitive) for key in card.secondary_keys]
    return {
        SelectiveLogic.and_any: any(found), SelectiveLogic.and_all: all(found),
        SelectiveLogic.not_any: not any(found), SelectiveLogic.not_all: not all(found),
    }[card.logic]


def triggered_cards(cards: list[WorldCard], text: str, recursive: bool = False) -> list[int]:
    """Indices of the enabled, non-constant cards (in their order) whose keys fire on `text`.

    With `recursive`, the text of the entries found is scanned too, a few passes deep (V2 `recursive_scanning`).
    """
    scan, found = ScanText(text), set()
    for _ in range(RECURSION_STEPS if recursive else 1):
        new = {i for i, card in enumerate(cards)
               if i not in found and card.enabled and not card.constant and matches(card, scan)}
        if not new:
            break
        found |= new
        scan = ScanText(scan.text + "\n" + "\n".join(cards[i].text for i in sorted(new)))
    return sorted(found)


def constant_cards(cards: list[WorldCard]) -> list[int]:
    return [i for i, card in enumerate(cards) if card.enabled and card.constant]


def fit_budget(cards: list[WorldCard], chosen: list[int], cost: Callable[[int], int], room: int) -> list[int]:
    """The chosen entries that fit in `room` tokens, highest rank first; returned in insertion order."""
    kept = []
    for index in sorted(chosen, key=lambda i: (-cards[i].rank, i)):
        if cost(index) <= room:
            kept.append(index)
            room -= cost(index)
    return sorted(kept, key=lambda i: (cards[i].order, i))
