"""World-info cards: lore entries that enter the context only when one of their keys appears in recent text.

Keys match by lemma, so the key «змей» fires on «змея», «змеем» and «змеи» alike, and «Хромой гусь»
on «у Хромого гуся»; plain substring matching (what English engines do) would miss Russian cases.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from rugpt.apps.adventure.morphology import normal_forms, top_normal_form
from rugpt.errors import DataError

TOKEN = re.compile(r"\w+(?:-\w+)*")
MAX_KEYS = 20


@dataclass(frozen=True)
class WorldCard:
    """One piece of lore and the words that call it into the context."""

    keys: tuple[str, ...]
    text: str

    def __post_init__(self) -> None:
        keys = tuple(k.strip() for k in self.keys if k and k.strip())
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "text", self.text.strip())
        if not keys or len(keys) > MAX_KEYS or not self.text:
            raise DataError(f"world-info card {self.text[:40]!r} needs 1 to {MAX_KEYS} keys and a text")

    @classmethod
    def from_dict(cls, data: dict) -> WorldCard:
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list | tuple):
            raise DataError(f"world-info card must be an object with 'keys' (a list) and 'text', got {data!r:.80}")
        return cls(tuple(str(k) for k in data["keys"]), str(data.get("text", "")))

    def to_dict(self) -> dict:
        return {"keys": list(self.keys), "text": self.text}


@functools.lru_cache(maxsize=4096)
def _key_lemmas(key: str) -> tuple[frozenset[str], ...]:
    """Each word of a key as the forms it may take: itself and its likeliest lemma."""
    return tuple(frozenset({w.lower(), top_normal_form(w)}) for w in TOKEN.findall(key))


def _occurs(key: str, text_forms: list[frozenset[str]]) -> bool:
    wanted = _key_lemmas(key)
    if not wanted:
        return False
    span = len(wanted)
    return any(
        all(wanted[k] & text_forms[start + k] for k in range(span)) for start in range(len(text_forms) - span + 1)
    )


def triggered_cards(cards: list[WorldCard], text: str) -> list[int]:
    """Indices of the cards (in their order) with a key that occurs in `text`."""
    forms = [normal_forms(word.lower()) for word in TOKEN.findall(text)]
    return [i for i, card in enumerate(cards) if any(_occurs(key, forms) for key in card.keys)]
