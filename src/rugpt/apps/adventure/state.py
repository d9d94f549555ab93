"""An adventure's state: scenario text, memory, author's note, world-info cards, settings and the turn log.

Also its JSON form (export and import), which is the same dictionary the SQLite store keeps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum

from rugpt.apps.adventure.scenario import Scenario
from rugpt.apps.adventure.worldinfo import WorldCard
from rugpt.errors import DataError, UsageError
from rugpt.generation import GenerationSettings, Preset

EXPORT_FORMAT = "rugpt-adventure"
EXPORT_VERSION = 1
MAX_TEXT = 20_000  # characters in any one field: memory, a card, a turn
MAX_CARDS = 200
MAX_TURNS = 20_000


class ActionKind(str, Enum):
    """What the player does in a turn."""

    do = "do"  # an action: «я открываю дверь» → «Вы открываете дверь.»
    say = "say"  # a line of speech: «Вы говорите: «...»»
    story = "story"  # text put into the story as written
    continue_ = "continue"  # nothing: the model goes on with the story


@dataclass
class AdventureSettings:
    """How turns are generated and how the context is laid out; each adventure keeps its own copy."""

    preset: str = field(default=Preset.balanced.value, metadata={"help": "generation preset of each turn"})
    max_new_tokens: int = field(default=55, metadata={"help": "tokens generated per turn (gamio used about 55)"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature; None keeps the preset's"})
    max_turns: int = field(default=10, metadata={"help": "recent turns kept in the context (gamio: the last 10)"})
    drop_chunk: int = field(default=5, metadata={"help": "old turns leave the context this many at a time, so its "
                                                         "beginning stays the same for several turns"})
    note_depth: int = field(default=3, metadata={"help": "lines from the end where the author's note and cards go"})
    scan_turns: int = field(default=3, metadata={"help": "recent turns searched for world-info keys"})
    card_share: float = field(default=0.2, metadata={"help": "share of the token budget kept for world-info cards"})

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens > 0, f"max_new_tokens={self.max_new_tokens} must be > 0"),
            (self.max_turns >= 1, f"max_turns={self.max_turns} must be >= 1"),
            (self.drop_chunk >= 1, f"drop_chunk={self.drop_chunk} must be >= 1"),
            (self.note_depth >= 0, f"note_depth={self.note_depth} must be >= 0"),
            (self.scan_turns >= 0, f"scan_turns={self.scan_turns} must be >= 0"),
            (0 <= self.card_share <= 0.5, f"card_share={self.card_share} must be in [0, 0.5]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        self.generation(0)  # validates preset and temperature

    def generation(self, seed: int) -> GenerationSettings:
        """The sampling settings of one turn."""
        return GenerationSettings.from_preset(self.preset, max_new_tokens=self.max_new_tokens,
                                              temperature=self.temperature, seed=seed, num_return_sequences=1)


def settings_record(settings: GenerationSettings) -> dict:
    """Generation settings as plain JSON data (the stop strings as a list), as a turn keeps them."""
    return {**dataclasses.asdict(settings), "stop": list(settings.stop)}


@dataclass
class Turn:
    """One turn: what the player did, what the model wrote, and how (seed and settings replay it exactly)."""

    kind: ActionKind
    player_text: str  # as typed, before any rewriting
    action: str  # the text that entered the story ("" for continue)
    output: str  # the model's text, cut at its last complete sentence
    seed: int
    settings: dict  # GenerationSettings as a dict
    created: float = field(default_factory=time.time)

    def block(self) -> str:
        """The turn as it reads in the story."""
        return "\n".join(part for part in (self.action, self.output) if part)

    def generation(self) -> GenerationSettings:
        return GenerationSettings(**{**self.settings, "stop": tuple(self.settings.get("stop") or ())})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kind": self.kind.value}

    @classmethod
    def from_dict(cls, data: dict) -> Turn:
        try:
            turn = cls(kind=ActionKind(data["kind"]), player_text=str(data.get("player_text", "")),
                       action=str(data.get("action", "")), output=str(data.get("output", "")),
                       seed=int(data["seed"]), settings=dict(data.get("settings") or {}),
                       created=float(data.get("created") or time.time()))
            turn.generation()  # the stored settings must be valid to replay
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"bad turn {str(data)[:80]!r}: {exc}") from None
        _check_length("turn", turn.action + turn.output + turn.player_text)
        return turn


@dataclass
class Adventure:
    """A game in progress. `turns[:length]` is the story; `turns[length:]` is what undo took (redo brings it back)."""

    title: str
    scenario: str
    world: str
    opening: str
    memory: str = ""
    authors_note: str = ""
    cards: list[WorldCard] = field(default_factory=list)
    settings: AdventureSettings = field(default_factory=AdventureSettings)
    turns: list[Turn] = field(default_factory=list)
    length: int = 0
    id: int | None = None  # the store's row id, set once saved

    @classmethod
    def from_scenario(cls, scenario: Scenario, settings: AdventureSettings | None = None) -> Adventure:
        return cls(title=scenario.title, scenario=scenario.name, world=scenario.world, opening=scenario.opening,
                   memory=scenario.memory, authors_note=scenario.authors_note, cards=list(scenario.cards),
                   settings=settings or AdventureSettings())

    @property
    def story(self) -> list[Turn]:
        return self.turns[: self.length]

    def header(self) -> dict:
        """Everything but the turns, as plain data."""
        return {
            "title": self.title, "scenario": self.scenario, "world": self.world, "opening": self.opening,
            "memory": self.memory, "authors_note": self.authors_note, "cards": [c.to_dict() for c in self.cards],
            "settings": dataclasses.asdict(self.settings),
        }


def apply_header(adventure: Adventure, data: dict) -> None:
    """Set title, memory, note, cards and settings from plain data, checking sizes and shapes."""
    for name in ("title", "scenario", "world", "opening", "memory", "authors_note"):
        if name in data:
            value = data[name]
            if not isinstance(value, str):
                raise DataError(f"{name} must be text, got {type(value).__name__}")
            _check_length(name, value)
            setattr(adventure, name, value.strip())
    if "cards" in data:
        cards = data["cards"]
        if not isinstance(cards, list) or len(cards) > MAX_CARDS:
            raise DataError(f"cards must be a list of at most {MAX_CARDS} world-info cards")
        adventure.cards = [c if isinstance(c, WorldCard) else WorldCard.from_dict(c) for c in cards]
        for card in adventure.cards:
            _check_length("card", card.text + "".join(card.keys))
    if "settings" in data:
        try:
            adventure.settings = AdventureSettings(**data["settings"])
        except (TypeError, UsageError) as exc:
            raise DataError(f"bad adventure settings: {exc}") from None


def adventure_from_header(data: dict) -> Adventure:
    if not isinstance(data, dict):
        raise DataError(f"an adventure must be a JSON object, got {type(data).__name__}")
    adventure = Adventure(title="", scenario="", world="", opening="")
    apply_header(adventure, data)
    return adventure


def export_adventure(adventure: Adventure) -> dict:
    """The whole adventure as JSON-ready data (redo stack included)."""
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **adventure.header(),
            "length": adventure.length, "turns": [t.to_dict() for t in adventure.turns]}


def import_adventure(data: dict) -> Adventure:
    """An adventure from `export_adventure`'s data; DataError says what is wrong with it."""
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise DataError(f"not an exported adventure: expected an object with format={EXPORT_FORMAT!r}")
    if data.get("version") != EXPORT_VERSION:
        raise DataError(f"adventure export version {data.get('version')!r} is not supported; expected {EXPORT_VERSION}")
    adventure = adventure_from_header(data)
    turns = data.get("turns") or []
    if not isinstance(turns, list) or len(turns) > MAX_TURNS:
        raise DataError(f"turns must be a list of at most {MAX_TURNS} turns")
    adventure.turns = [Turn.from_dict(t) for t in turns]
    length = data.get("length", len(adventure.turns))
    if not isinstance(length, int) or not 0 <= length <= len(adventure.turns):
        raise DataError(f"length={length!r} must be between 0 and the number of turns ({len(adventure.turns)})")
    adventure.length = length
    return adventure


def _check_length(name: str, text: str) -> None:
    if len(text) > MAX_TEXT:
        raise DataError(f"{name} has {len(text)} characters; the most is {MAX_TEXT}")
