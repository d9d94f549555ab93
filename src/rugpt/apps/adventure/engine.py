"""The game: actions (do, say, story, continue), retry, undo, redo, edit — each saved as one transaction.

The engine never calls a model itself. Each generating action is planned (`plan`, `plan_retry`: the
prompt and the sampling settings), completed by whoever holds the model, and committed (`commit`).
The terminal completes with a local `Generator` (`act`, `retry` do all three steps); the web page awaits
the server's batching scheduler between the steps.

With a translation bridge (an English model played in Russian), planning translates the player's action
into the model's language and committing translates the model's text back; each turn keeps both.

Players count turns from 1 («1. Вы осматриваете окно.»), the code from 0: `edit(0, ...)` is turn 1, and every
message to a player names turns by the player's numbers.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rugpt.apps.adventure.context import Context, ModelView, TokenCounter, build_context
from rugpt.apps.adventure.grammar import as_speech, to_second_person
from rugpt.apps.adventure.state import ActionKind, Adventure, Turn, apply_header, settings_record
from rugpt.apps.adventure.trimming import trim_to_sentence
from rugpt.errors import UsageError
from rugpt.generation import GenerationSettings

if TYPE_CHECKING:
    from rugpt.apps.adventure.store import AdventureStore
    from rugpt.apps.adventure.translation import TranslationBridge
    from rugpt.generation import Generator

Completer = Callable[[str, GenerationSettings], str]  # prompt, settings → the model's raw continuation
MAX_INPUT = 2000  # characters a player may type in one action


def local_completer(generator: Generator) -> Completer:
    """A completer that runs a local `Generator` (one call at a time: no batching across players)."""

    def complete(prompt: str, settings: GenerationSettings) -> str:
        return generator.generate(prompt, settings).text

    return complete


def new_seed() -> int:
    return secrets.randbelow(2**31)


@dataclass
class PendingTurn:
    """A turn planned but not generated yet: the prompt to complete and where the result goes."""

    turn: Turn  # its output is filled in by `commit`
    position: int  # index in `adventure.turns`
    replaces: Turn | None  # the turn a retry replaces; None when the turn is appended
    context: Context
    settings: GenerationSettings

    @property
    def prompt(self) -> str:
        return self.context.text


class Game:
    """One adventure being played. With a store, every change is saved before the method returns."""

    def __init__(self, adventure: Adventure, count: TokenCounter, context_length: int,
                 store: AdventureStore | None = None, seeds: Callable[[], int] = new_seed,
                 bridge: TranslationBridge | None = None):
        self.adventure, self.count, self.context_length = adventure, count, context_length
        self.store, self.seeds, self.bridge = store, seeds, bridge

    def view(self) -> ModelView | None:
        """How the model reads the adventure: translated through the bridge, or as it is."""
        if self.bridge is None:
            return None
        from rugpt.apps.adventure.translation import BridgeView

        return BridgeView(self.bridge, self.adventure.translations)

    def _build(self, budget: int, upto: int | None = None, action: str = "", model_action: str = "") -> Context:
        view = self.view()
        if view is not None and action and not model_action:
            model_action = view.text(action)
        return build_context(self.adventure, self.count, budget, upto=upto, pending=model_action or action,
                             view=view, scan_pending=action)

    def _to_player(self, model_text: str) -> str:
        return self.bridge.to_player(model_text) if self.bridge is not None and model_text else model_text

    def budget(self, max_new_tokens: int | None = None) -> int:
        """Prompt tokens allowed: the model's context less the tokens a turn generates."""
        new = self.adventure.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        if new >= self.context_length // 2:
            raise UsageError(f"max_new_tokens={new} must be < half the model's context of {self.context_length}")
        return self.context_length - new

    def context(self) -> Context:
        """What the model would read for a "continue" now."""
        return self._build(self.budget())

    # --- generating actions: plan, complete (elsewhere), commit

    def plan(self, kind: ActionKind | str, text: str = "") -> PendingTurn:
        """Plan a new turn: the player's text as it enters the story, and the prompt that continues it."""
        kind = ActionKind(kind)
        if len(text) > MAX_INPUT:
            raise UsageError(f"the action has {len(text)} characters; the most is {MAX_INPUT}")
        action = story_text(kind, text)
        if kind is not ActionKind.continue_ and not action:
            raise UsageError(f"a {kind.value!r} action needs some text; send 'continue' to let the story go on")
        seed = self.seeds()
        settings = self.adventure.settings.generation(seed)
        model_action = self.bridge.to_model(action) if self.bridge is not None and action else ""
        context = self._build(self.budget(), action=action, model_action=model_action)
        turn = Turn(kind, text.strip(), action, "", seed, settings_record(settings), model_action=model_action)
        return PendingTurn(turn, self.adventure.length, None, context, settings)

    def plan_retry(self) -> PendingTurn:
        """Plan the last turn again with a fresh seed (and the current settings)."""
        last = self._last("retry")
        seed = self.seeds()
        settings = self.adventure.settings.generation(seed)
        position = self.adventure.length - 1
        context = self._build(self.budget(), position, last.action, last.model_action)
        turn = dataclasses.replace(last, output="", model_output="", seed=seed, settings=settings_record(settings),
                                   created=time.time())
        return PendingTurn(turn, position, last, context, settings)

    def commit(self, pending: PendingTurn, raw_output: str) -> Turn:
        """Put a completed turn into the story (cut at its last complete sentence) and save it."""
        adventure = self.adventure
        expected = adventure.length - 1 if pending.replaces is not None else adventure.length
        current = adventure.turns[expected] if pending.replaces is not None else None
        if pending.position != expected or current is not pending.replaces:
            raise UsageError("the adventure changed while this turn was being written; send the action again")
        output = trim_to_sentence(raw_output)
        if self.bridge is not None:  # the model wrote in its language; the player reads a translation
            turn = dataclasses.replace(pending.turn, output=self._to_player(output), model_output=output)
        else:
            turn = dataclasses.replace(pending.turn, output=output)
        if pending.replaces is not None:
            adventure.turns[pending.position] = turn
        else:
            del adventure.turns[adventure.length :]  # a new turn ends what undo had taken
            adventure.turns.append(turn)
            adventure.length += 1
        self._save([pending.position])
        return turn

    def act(self, kind: ActionKind | str, text: str, complete: Completer) -> Turn:
        """Plan, complete and commit one turn."""
        pending = self.plan(kind, text)
        return self.commit(pending, complete(pending.prompt, pending.settings))

    def retry(self, complete: Completer) -> Turn:
        """Write the last turn again with a fresh seed."""
        pending = self.plan_retry()
        return self.commit(pending, complete(pending.prompt, pending.settings))

    def replay(self, index: int, complete: Completer) -> str:
        """Regenerate turn `index` exactly as it was (its seed and settings), changing nothing.

        Gives the stored output as long as memory, cards, note and layout settings have not changed since.
        """
        turn = self._turn(index)
        budget = self.budget(turn.generation().max_new_tokens)
        context = self._build(budget, index, turn.action, turn.model_action)
        return self._to_player(trim_to_sentence(complete(context.text, turn.generation())))

    # --- changes without the model

    def undo(self) -> Turn:
        """Take back the last turn (redo brings it back until a new turn is played)."""
        turn = self._last("undo")
        self.adventure.length -= 1
        self._save()
        return turn

    def redo(self) -> Turn:
        adventure = self.adventure
        if adventure.length >= len(adventure.turns):
            raise UsageError("nothing to redo: no turn was undone since the last action")
        adventure.length += 1
        self._save()
        return adventure.turns[adventure.length - 1]

    def edit(self, index: int, action: str | None = None, output: str | None = None) -> Turn:
        """Replace the text of turn `index` (its action, its output or both) as given."""
        turn = self._turn(index)
        changes = {k: v.strip() for k, v in (("action", action), ("output", output)) if v is not None}
        if any(len(v) > 4 * MAX_INPUT for v in changes.values()):
            raise UsageError(f"an edited text may have at most {4 * MAX_INPUT} characters")
        for name, text in list(changes.items()):  # the model's side follows the player's edit
            changes[f"model_{name}"] = self.bridge.to_model(text) if self.bridge is not None and text else ""
        self.adventure.turns[index] = dataclasses.replace(turn, **changes)
        self._save([index])
        return self.adventure.turns[index]

    def update(self, **fields) -> None:
        """Change title, memory, authors_note, cards, lorebooks or settings (plain data, as in the JSON export)."""
        allowed = ("title", "memory", "authors_note", "cards", "lorebooks", "settings")
        unknown = set(fields) - set(allowed)
        if unknown:
            raise UsageError(f"cannot change {', '.join(sorted(unknown))}; allowed: {', '.join(allowed)}")
        candidate = dataclasses.replace(self.adventure)  # shallow: apply_header swaps whole fields, never mutates
        apply_header(candidate, fields)
        Game(candidate, self.count, self.context_length).budget()  # the new settings must suit the model
        for name in fields:
            setattr(self.adventure, name, getattr(candidate, name))
        self._save()

    def _last(self, what: str) -> Turn:
        if self.adventure.length == 0:
            raise UsageError(f"nothing to {what}: the story has no turns yet")
        return self.adventure.turns[self.adventure.length - 1]

    def _turn(self, index: int) -> Turn:
        if not 0 <= index < self.adventure.length:
            turns = f"turns 1 to {self.adventure.length}" if self.adventure.length else "no turns yet"
            raise UsageError(f"turn {index + 1} does not exist; the story has {turns}")
        return self.adventure.turns[index]

    def _save(self, changed: Iterable[int] = ()) -> None:
        if self.store is not None:
            self.store.save(self.adventure, changed)


def story_text(kind: ActionKind, text: str) -> str:
    """The player's input as it enters the story."""
    if kind is ActionKind.do:
        return to_second_person(text)
    if kind is ActionKind.say:
        return as_speech(text)
    if kind is ActionKind.story:
        return "\n".join(" ".join(line.split()) for line in text.strip().splitlines() if line.strip())
    return ""
