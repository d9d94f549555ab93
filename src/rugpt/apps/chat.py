"""Chat by seed programming: a persona and a short seed dialogue set the tone; the model writes the bot's turns.

The prompt is the persona, then the dialogue as "Пользователь: ..." / "Бот: ..." lines, ending with the
bot's tag; generation stops at the next speaker tag. When the dialogue outgrows the context, the
oldest turns leave it first (the persona stays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rugpt.apps import TextGenerator, as_generator
from rugpt.errors import DataError, UsageError
from rugpt.generation import GenerationSettings
from rugpt.models import LoadedModel


class Speaker(str, Enum):
    user = "user"
    bot = "bot"


@dataclass(frozen=True)
class Turn:
    speaker: Speaker
    text: str


DEFAULT_SEED_DIALOGUE = (
    Turn(Speaker.user, "Привет! Как дела?"),
    Turn(Speaker.bot, "Здравствуйте! Всё хорошо, спасибо. Чем могу помочь?"),
)


@dataclass
class ChatSettings:
    """Who speaks, how the bot is introduced and how its replies are decoded."""

    user_tag: str = field(default="Пользователь:", metadata={"help": "the tag before the user's lines"})
    bot_tag: str = field(default="Бот:", metadata={"help": "the tag before the bot's lines"})
    persona: str = field(default="", metadata={"help": "text put before the dialogue: who the bot is, how it talks"})
    seed_dialogue: tuple[Turn, ...] = field(
        default=DEFAULT_SEED_DIALOGUE, metadata={"help": "example turns that open every conversation"}
    )
    generation: GenerationSettings = field(
        default_factory=GenerationSettings, metadata={"help": "how replies are decoded (the tags are added as stops)"}
    )

    def __post_init__(self) -> None:
        self.seed_dialogue = tuple(self.seed_dialogue)
        for name, tag in (("user_tag", self.user_tag), ("bot_tag", self.bot_tag)):
            if not tag.strip() or "\n" in tag:
                raise UsageError(f"{name}={tag!r} must be non-empty text on one line")
        if self.user_tag.strip() == self.bot_tag.strip():
            raise UsageError(f"user_tag and bot_tag are both {self.user_tag!r}: the speakers must differ")
        if self.generation.num_return_sequences != 1:
            raise UsageError(f"num_return_sequences={self.generation.num_return_sequences}: a chat takes one reply")

    def tag(self, speaker: Speaker) -> str:
        return self.user_tag if speaker is Speaker.user else self.bot_tag

    def reply_settings(self) -> GenerationSettings:
        """The generation settings with both speaker tags as stop strings: a reply ends where the next turn begins."""
        stop = (*self.generation.stop, self.user_tag.strip(), self.bot_tag.strip())
        return dataclasses.replace(self.generation, stop=stop)


class Chat:
    """A dialogue with a model: `send(text)` returns the bot's reply, `stream(text)` yields it as it is written;
    both remember the two turns."""

    def __init__(self, model: TextGenerator | LoadedModel | str | None = None, settings: ChatSettings | None = None):
        self.generator = as_generator(model)
        self.settings = settings or ChatSettings()
        self.turns: list[Turn] = list(self.settings.seed_dialogue)

    def send(self, text: str) -> str:
        """The bot's reply to `text`."""
        return "".join(self.stream(text)).strip()

    def stream(self, text: str) -> Iterator[str]:
        """The bot's reply to `text` in pieces as the model writes them (joined and stripped: `send`'s reply).

        The reply is remembered when the stream ends, or as far as it got when the reader stops early.
        """
        if not text or not text.strip():
            raise UsageError("message is empty: write something to the bot")
        self.turns.append(Turn(Speaker.user, text.strip()))
        self._trim()
        pieces: list[str] = []
        try:
            for piece in self.generator.stream(self.prompt(), self.settings.reply_settings()):
                piece = piece if pieces else piece.lstrip()  # the space after the bot's tag is not the reply's
                if piece:
                    pieces.append(piece)
                    yield piece
        finally:
            self.turns.append(Turn(Speaker.bot, "".join(pieces).strip()))

    def prompt(self) -> str:
        """What the model continues: the persona, the turns, and the bot's tag."""
        lines = [self.settings.persona.strip()] if self.settings.persona.strip() else []
        lines += [f"{self.settings.tag(t.speaker)} {t.text}" for t in self.turns]
        return "\n".join([*lines, self.settings.bot_tag])

    def reset(self) -> None:
        """Forget the conversation; the seed dialogue opens the next one."""
        self.turns = list(self.settings.seed_dialogue)

    def _trim(self) -> None:
        """Drop the oldest turns until the prompt and a full reply fit the context; the newest turn always stays."""
        budget = self.generator.loaded.context_length - self.settings.generation.max_new_tokens
        while len(self.turns) > 1 and self._count_tokens(self.prompt()) > budget:
            self.turns.pop(0)

    def _count_tokens(self, text: str) -> int:
        return len(self.generator.tokenizer(text, add_special_tokens=False)["input_ids"])


def parse_dialogue(text: str, user_tag: str, bot_tag: str, source: str = "dialogue") -> tuple[Turn, ...]:
    """Turns from lines that start with a speaker tag; other non-blank lines continue the turn before them."""
    turns: list[Turn] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        stripped = line.strip()
        if stripped.startswith(user_tag.strip()):
            turns.append(Turn(Speaker.user, stripped[len(user_tag.strip()):].strip()))
        elif stripped.startswith(bot_tag.strip()):
            turns.append(Turn(Speaker.bot, stripped[len(bot_tag.strip()):].strip()))
        elif turns:
            turns[-1] = Turn(turns[-1].speaker, f"{turns[-1].text}\n{stripped}")
        else:
            raise DataError(f"{source}:{number}: the first turn must start with {user_tag!r} or {bot_tag!r}")
    if not turns:
        raise DataError(f"{source}: no dialogue turns; write lines such as '{user_tag} Привет!'")
    return tuple(turns)


def read_dialogue(path: str | Path, user_tag: str, bot_tag: str) -> tuple[Turn, ...]:
    """A seed dialogue from a UTF-8 text file (see `parse_dialogue`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DataError(f"cannot read seed dialogue {str(path)!r}: {reason}") from None
    return parse_dialogue(text, user_tag, bot_tag, source=str(path))
