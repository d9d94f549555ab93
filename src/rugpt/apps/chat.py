"""Chat by seed programming: a persona and a short seed dialogue set the tone; the model writes the bot's turns.

The conversation — the persona as a system message, the seed dialogue, the turns so far — becomes a
prompt through the one chat format rugpt has (rugpt.chat_format: the model's chat template, or rugpt's
«Пользователь: … / Ассистент: …» transcript), the same prompt `/v1/chat/completions` builds; the reply
ends at the next speaker's label. When the dialogue outgrows the context, the oldest turns leave it first
(the persona stays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rugpt.apps import TextGenerator, as_generator
from rugpt.chat_format import ASSISTANT_LABEL, USER_LABEL, ChatFormat
from rugpt.errors import DataError, UsageError
from rugpt.generation import GenerationSettings
from rugpt.models import LoadedModel


class Speaker(str, Enum):
    """A turn's author, named as chat templates name roles."""

    user = "user"
    assistant = "assistant"


@dataclass(frozen=True)
class Turn:
    speaker: Speaker
    text: str


DEFAULT_SEED_DIALOGUE = (
    Turn(Speaker.user, "Привет! Как дела?"),
    Turn(Speaker.assistant, "Здравствуйте! Всё хорошо, спасибо. Чем могу помочь?"),
)


@dataclass
class ChatSettings:
    """How the bot is introduced, how a conversation becomes a prompt, and how replies are decoded."""

    persona: str = field(default="", metadata={"help": "text put before the dialogue: who the bot is, how it talks"})
    seed_dialogue: tuple[Turn, ...] = field(
        default=DEFAULT_SEED_DIALOGUE, metadata={"help": "example turns that open every conversation"}
    )
    chat_template: str | None = field(default=None, metadata={
        "help": "a chat template (.jinja file or template text); default: the model's own, else rugpt's "
                "«Пользователь: / Ассистент:» transcript ('rugpt' forces that one)"})
    generation: GenerationSettings = field(
        default_factory=GenerationSettings, metadata={"help": "how replies are decoded (speaker labels are stops)"}
    )

    def __post_init__(self) -> None:
        self.seed_dialogue = tuple(self.seed_dialogue)
        if self.generation.num_return_sequences != 1:
            raise UsageError(f"num_return_sequences={self.generation.num_return_sequences}: a chat takes one reply")


class Chat:
    """A dialogue with a model: `send(text)` returns the bot's reply, `stream(text)` yields it as it is written;
    both remember the two turns."""

    def __init__(self, model: TextGenerator | LoadedModel | str | None = None, settings: ChatSettings | None = None):
        self.generator = as_generator(model)
        self.settings = settings or ChatSettings()
        self.format = ChatFormat.resolve(self.generator.tokenizer, self.settings.chat_template)
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
            for piece in self.generator.stream(self.prompt(), self.reply_settings()):
                piece = piece if pieces else piece.lstrip()  # the space after the assistant's label is not the reply's
                if piece:
                    pieces.append(piece)
                    yield piece
        finally:
            self.turns.append(Turn(Speaker.assistant, "".join(pieces).strip()))

    def messages(self) -> list[dict]:
        """The conversation as chat messages: the persona as the system message, then the turns."""
        system = [{"role": "system", "content": self.settings.persona}] if self.settings.persona.strip() else []
        return system + [{"role": t.speaker.value, "content": t.text} for t in self.turns]

    def prompt(self) -> str:
        """What the model continues: the conversation rendered by the chat format."""
        return self.format.render(self.generator.tokenizer, self.messages())

    def reply_settings(self) -> GenerationSettings:
        """The generation settings with the format's stops: a reply ends where the next turn would begin."""
        return dataclasses.replace(self.settings.generation, stop=(*self.settings.generation.stop, *self.format.stop))

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


def parse_dialogue(text: str, source: str = "dialogue") -> tuple[Turn, ...]:
    """Turns from lines that start with «Пользователь:» or «Ассистент:»; other non-blank lines continue the turn
    before them."""
    labels = {USER_LABEL: Speaker.user, ASSISTANT_LABEL: Speaker.assistant}
    turns: list[Turn] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        label = next((label for label in labels if stripped.startswith(label)), None)
        if label is not None:
            turns.append(Turn(labels[label], stripped[len(label):].strip()))
        elif turns:
            turns[-1] = Turn(turns[-1].speaker, f"{turns[-1].text}\n{stripped}")
        else:
            raise DataError(f"{source}:{number}: the first turn must start with {USER_LABEL!r} or {ASSISTANT_LABEL!r}")
    if not turns:
        raise DataError(f"{source}: no dialogue turns; write lines such as '{USER_LABEL} Привет!'")
    return tuple(turns)


def read_dialogue(path: str | Path) -> tuple[Turn, ...]:
    """A seed dialogue from a UTF-8 text file (see `parse_dialogue`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DataError(f"cannot read seed dialogue {str(path)!r}: {reason}") from None
    return parse_dialogue(text, source=str(path))
