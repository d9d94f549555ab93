"""An adventure's state: scenario text, memory, author's note, world info, settings and the turn log.

Also its JSON form (export and import), which is the same dictionary the SQLite store keeps.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum

from rugpt.apps.adventure.scenario import Scenario
from rugpt.apps.adventure.worldinfo import Lorebook, WorldCard
from rugpt.errors import DataError, UsageError
from rugpt.generation import GenerationSettings, Preset

EXPORT_FORMAT = "rugpt-adventure"
EXPORT_VERSION = 1
MAX_TEXT = 20_000  # characters in any one field: memory, a card, a turn
MAX_CARDS = 200
MAX_LOREBOOKS = 20
MAX_LORE_CARDS = 2000  # entries in one lorebook
MAX_TURNS = 20_000
MAX_TRANSLATIONS = 4000  # texts kept translated; the oldest go first


class ActionKind(str, Enum):
    """What the player does in a turn."""

    do = "do"  # an action: «я открываю дверь» → «Вы открываете дверь.»
    say = "say"  # a line of speech: «Вы говорите: «...»»
    story = "story"  # text put into the story as written
    continue_ = "continue"  # nothing: the model goes on with the story


# Adventure-only presets: a generation preset plus settings. "gamio": what gamio ran gameGPT (GPT-2 XL) with.
ADVENTURE_PRESETS: dict[str, tuple[str, dict]] = {
    "gamio": (Preset.balanced.value, {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "repetition_penalty": 5.0}),
}


@dataclass
class AdventureSettings:
    """How turns are generated and how the context is laid out; each adventure keeps its own copy."""

    preset: str = field(default=Preset.balanced.value, metadata={
        "help": "generation preset of each turn: precise, greedy, balanced, creative, or gamio (temperature 0.9, "
                "top-k 50, top-p 0.95, repetition penalty 5.0)"})
    max_new_tokens: int = field(default=55, metadata={"help": "tokens generated per turn (gamio used about 55)"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature; None keeps the preset's"})
    top_k: int | None = field(default=None, metadata={"help": "top-k sampling; None keeps the preset's"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling; None keeps the preset's"})
    repetition_penalty: float | None = field(default=None, metadata={"help": "None keeps the preset's"})
    max_turns: int = field(default=10, metadata={"help": "recent turns kept in the context (gamio: the last 10)"})
    drop_chunk: int = field(default=5, metadata={"help": "old turns leave the context this many at a time, so its "
                                                         "beginning stays the same for several turns"})
    note_depth: int = field(default=3, metadata={"help": "lines from the end where the author's note and cards go"})
    scan_turns: int = field(default=3, metadata={"help": "scan depth: recent turns searched for world-info keys"})
    card_share: float = field(default=0.2, metadata={"help": "share of the token budget kept for world info, "
                                                             "unless lore_tokens is set"})
    lore_tokens: int | None = field(default=None, metadata={"help": "token budget of world info (a character "
                                                                    "book's token_budget); None: card_share"})
    recursive_lore: bool = field(default=False, metadata={"help": "entries' own text can trigger other entries"})

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens > 0, f"max_new_tokens={self.max_new_tokens} must be > 0"),
            (self.max_turns >= 1, f"max_turns={self.max_turns} must be >= 1"),
            (self.drop_chunk >= 1, f"drop_chunk={self.drop_chunk} must be >= 1"),
            (self.note_depth >= 0, f"note_depth={self.note_depth} must be >= 0"),
            (self.scan_turns >= 0, f"scan_turns={self.scan_turns} must be >= 0"),
            (0 <= self.card_share <= 0.5, f"card_share={self.card_share} must be in [0, 0.5]"),
            (self.lore_tokens is None or self.lore_tokens >= 0, f"lore_tokens={self.lore_tokens} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        self.generation(0)  # validates preset and sampling settings

    def generation(self, seed: int) -> GenerationSettings:
        """The sampling settings of one turn."""
        preset, overrides = ADVENTURE_PRESETS.get(self.preset, (self.preset, {}))
        given = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                 "repetition_penalty": self.repetition_penalty}
        overrides = overrides | {k: v for k, v in given.items() if v is not None}
        return GenerationSettings.from_preset(preset, max_new_tokens=self.max_new_tokens, seed=seed,
                                              num_return_sequences=1, **overrides)


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
    # Through a translation bridge: the action and the output in the model's language ("" without a bridge)
    model_action: str = ""
    model_output: str = ""

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
                       created=float(data.get("created") or time.time()),
                       model_action=str(data.get("model_action", "")), model_output=str(data.get("model_output", "")))
            turn.generation()  # the stored settings must be valid to replay
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"bad turn {str(data)[:80]!r}: {exc}") from None
        _check_length("turn", turn.action + turn.output + turn.player_text + turn.model_action + turn.model_output)
        return turn


@dataclass
class Origin:
    """The file an adventure was imported from, kept so that an export to the same format gives back, unchanged,
    everything rugpt does not use (a card's extensions, unknown fields, its picture)."""

    format: str  # a formats.Format value
    document: dict | list  # the parsed JSON as it was
    blob: bytes | None = None  # a PNG card's image, or a .charx file's zip


TEXT_FIELDS = ("title", "scenario", "world", "opening", "memory", "authors_note", "character", "system_prompt",
               "personality", "examples", "post_history", "note_template")
DEFAULT_NOTE_TEMPLATE = "[Примечание автора: <|>]"  # KoboldAI's anotetemplate: <|> is where the note goes


@dataclass
class Adventure:
    """A game in progress. `turns[:length]` is the story; `turns[length:]` is what undo took (redo brings it back).

    The fields after `authors_note` come from character cards and saves of other tools; empty, they change nothing.
    """

    title: str
    scenario: str
    world: str  # the setting (a card's scenario)
    opening: str  # the story's first paragraph (a card's greeting, a KoboldAI prompt)
    memory: str = ""  # who the player is and what matters (a card's description, KoboldAI's memory)
    authors_note: str = ""
    cards: list[WorldCard] = field(default_factory=list)  # the adventure's own world info, editable while playing
    settings: AdventureSettings = field(default_factory=AdventureSettings)
    turns: list[Turn] = field(default_factory=list)
    length: int = 0
    id: int | None = None  # the store's row id, set once saved
    character: str = ""  # the card's character: {{char}} in any text becomes this name
    system_prompt: str = ""  # first in the context
    personality: str = ""  # after the memory
    examples: str = ""  # example messages, after the world
    post_history: str = ""  # post-history instructions: last, after the player's action
    greetings: list[str] = field(default_factory=list)  # a card's first message and alternates
    note_template: str = DEFAULT_NOTE_TEMPLATE
    lorebooks: list[Lorebook] = field(default_factory=list)  # world info from lorebook files, all active at once
    translations: dict[str, str] = field(default_factory=dict)  # texts in the model's language (translation bridge)
    origin: Origin | None = None  # kept by the store apart from the header: read only for an export

    @classmethod
    def from_scenario(cls, scenario: Scenario, settings: AdventureSettings | None = None) -> Adventure:
        return cls(title=scenario.title, scenario=scenario.name, world=scenario.world, opening=scenario.opening,
                   memory=scenario.memory, authors_note=scenario.authors_note, cards=list(scenario.cards),
                   settings=settings or AdventureSettings())

    @property
    def story(self) -> list[Turn]:
        return self.turns[: self.length]

    def all_cards(self) -> list[WorldCard]:
        """The adventure's own cards, then every lorebook's, in that order (the context's card indices)."""
        return [*self.cards, *(card for book in self.lorebooks for card in book.cards)]

    def header(self) -> dict:
        """Everything but the turns, as plain data."""
        return {
            **{name: getattr(self, name) for name in TEXT_FIELDS},
            "cards": [c.to_dict() for c in self.cards], "settings": dataclasses.asdict(self.settings),
            "greetings": list(self.greetings), "lorebooks": [b.to_dict() for b in self.lorebooks],
            "translations": dict(self.translations),
        }


def apply_header(adventure: Adventure, data: dict) -> None:
    """Set title, memory, note, cards and settings from plain data, checking sizes and shapes."""
    for name in TEXT_FIELDS:
        if name in data:
            value = data[name]
            if not isinstance(value, str):
                raise DataError(f"{name} must be text, got {type(value).__name__}")
            _check_length(name, value)
            setattr(adventure, name, value.strip())
    if "note_template" in data and "<|>" not in adventure.note_template:
        raise DataError(f"note_template={adventure.note_template[:60]!r} must contain <|> where the note goes")
    if "cards" in data:
        adventure.cards = _cards(data["cards"], "cards", MAX_CARDS)
    if "lorebooks" in data:
        books = data["lorebooks"]
        if not isinstance(books, list) or len(books) > MAX_LOREBOOKS:
            raise DataError(f"lorebooks must be a list of at most {MAX_LOREBOOKS} lorebooks")
        adventure.lorebooks = [b if isinstance(b, Lorebook) else Lorebook.from_dict(b) for b in books]
        for book in adventure.lorebooks:
            _cards(list(book.cards), f"lorebook {book.name!r}", MAX_LORE_CARDS)
    if "greetings" in data:
        greetings = data["greetings"]
        if not isinstance(greetings, list) or not all(isinstance(g, str) for g in greetings) or len(greetings) > 100:
            raise DataError("greetings must be a list of at most 100 texts")
        for greeting in greetings:
            _check_length("greeting", greeting)
        adventure.greetings = list(greetings)
    if "translations" in data:
        translations = data["translations"]
        if not isinstance(translations, dict) or not all(isinstance(v, str) for v in translations.values()):
            raise DataError("translations must map texts to texts")
        adventure.translations = dict(list(translations.items())[-MAX_TRANSLATIONS:])
    if "settings" in data:
        try:
            adventure.settings = AdventureSettings(**data["settings"])
        except (TypeError, UsageError) as exc:
            raise DataError(f"bad adventure settings: {exc}") from None


def _cards(cards: object, what: str, most: int) -> list[WorldCard]:
    if not isinstance(cards, list | tuple) or len(cards) > most:
        raise DataError(f"{what} must be a list of at most {most} world-info entries")
    cards = [c if isinstance(c, WorldCard) else WorldCard.from_dict(c) for c in cards]
    for card in cards:
        _check_length(f"world-info entry {card.label()!r}", card.text + "".join(card.keys + card.secondary_keys))
    return cards


def adventure_from_header(data: dict) -> Adventure:
    if not isinstance(data, dict):
        raise DataError(f"an adventure must be a JSON object, got {type(data).__name__}")
    adventure = Adventure(title="", scenario="", world="", opening="")
    apply_header(adventure, data)
    return adventure


def export_adventure(adventure: Adventure) -> dict:
    """The whole adventure as JSON-ready data (redo stack included, and the imported file it came from)."""
    data = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **adventure.header(),
            "length": adventure.length, "turns": [t.to_dict() for t in adventure.turns]}
    if adventure.origin is not None:
        origin = adventure.origin
        blob = base64.b64encode(origin.blob).decode("ascii") if origin.blob is not None else None
        data["origin"] = {"format": origin.format, "document": origin.document, "blob": blob}
    return data


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
    adventure.origin = _origin(data.get("origin"))
    return adventure


def _origin(data: object) -> Origin | None:
    if data is None:
        return None
    try:
        blob = data.get("blob")
        origin = Origin(data["format"], data["document"], base64.b64decode(blob, validate=True) if blob else None)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"bad 'origin' (the file the adventure was imported from): {exc}") from None
    if not isinstance(origin.format, str) or not isinstance(origin.document, dict | list):
        raise DataError("bad 'origin': it needs a format (text) and a document (JSON)")
    return origin


def _check_length(name: str, text: str) -> None:
    if len(text) > MAX_TEXT:
        raise DataError(f"{name} has {len(text)} characters; the most is {MAX_TEXT}")
