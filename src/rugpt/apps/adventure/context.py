"""The context builder: what the model reads each turn, within a token budget it never exceeds.

Layout, chosen so that the beginning stays the same from turn to turn and a server can reuse the cached
prefix:

    system prompt             a card's, if any
    [constant lore, before]   constant world-info entries placed before the character
    memory                    always; the player's notes on who they are and what matters
    personality               a card's, if any
    world                     always; the scenario's setting
    [constant lore, after]    the other constant entries
    example messages          a card's, if any
    history ...               the opening and recent turns; old ones leave `drop_chunk` at a time
    [world-info entries]      triggered by keys in recent text, in insertion order
    [Примечание автора: ...]  the author's note in its template, `note_depth` lines before the end
    last lines of history     ending with the player's new action
    post-history instructions a card's, if any

Only what follows the insertion point changes from one turn to the next, until the window of turns moves.
Triggered entries always go to the insertion point, whatever position a card gives them: at the top they
would change the beginning, and the cached prefix with it, whenever an entry comes or goes.

Through a translation bridge the model reads another language: a `ModelView` gives each text as the model
reads it, while keys are still looked for in the player's text (Russian keys match by lemma).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from rugpt.apps.adventure.state import Adventure, Turn
from rugpt.apps.adventure.worldinfo import Position, WorldCard, constant_cards, fit_budget, triggered_cards
from rugpt.errors import UsageError

NOTE_FORMAT = "[Примечание автора: {}]"  # the default note template, as str.format sees it
CARD_FORMAT = "[{}]"
PLAYER = "Вы"  # what {{user}} becomes: the adventure speaks to the player in the second person
MACROS = re.compile(r"\{\{(char|user)\}\}|<(BOT|USER)>", re.IGNORECASE)


class TokenCounter:
    """Counts tokens with the loaded model's own tokenizer — never another — and remembers recent texts."""

    def __init__(self, tokenizer, cache_size: int = 4096):
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._cache_size = cache_size

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        self._cache[text] = count
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return count


class ModelView:
    """Texts as the model reads them: the player's own (this class), or translated (the bridge's subclass)."""

    def text(self, text: str) -> str:
        return text

    def turn(self, turn: Turn) -> str:
        return turn.block()


@dataclass
class Context:
    """A built prompt and how it was made."""

    text: str
    tokens: int  # counted on the whole text with the model's tokenizer
    budget: int
    first_block: int  # first history block kept: 0 is the opening, i is turn i - 1
    stable_prefix: str  # the part before the cards and note: the next turn's context starts with it
    cards: list[int]  # the triggered world-info entries included, by index in `adventure.all_cards()`
    constants: list[int]  # the constant entries included, in the stable beginning


def expand_macros(adventure: Adventure, text: str) -> str:
    """{{char}} and <BOT> become the character's name, {{user}} and <USER> the player («Вы»)."""
    if "{{" not in text and "<" not in text:
        return text
    char = adventure.character or adventure.title
    return MACROS.sub(lambda m: char if (m.group(1) or m.group(2)).lower() in ("char", "bot") else PLAYER, text)


def render_note(adventure: Adventure) -> str:
    """The author's note in its template (`<|>` is where the note goes); empty without a note."""
    if not adventure.authors_note:
        return ""
    return adventure.note_template.replace("<|>", adventure.authors_note, 1)


def history_blocks(adventure: Adventure, upto: int, pending: str, view: ModelView | None = None) -> list[str]:
    """The opening, the turns before `upto`, then the new action (possibly empty, for "continue")."""
    if view is None:
        return [expand_macros(adventure, adventure.opening), *(t.block() for t in adventure.turns[:upto]), pending]
    return [view.text(expand_macros(adventure, adventure.opening)), *(view.turn(t) for t in adventure.turns[:upto]),
            pending]


def window_start(blocks: int, max_turns: int, chunk: int) -> int:
    """The first block kept when only the window matters: a multiple of `chunk`, so it moves rarely.

    At most `max_turns` finished turns plus the new action stay; fewer (down to max_turns - chunk + 1)
    right after the window has moved.
    """
    over = blocks - (max_turns + 1)
    return 0 if over <= 0 else -(-over // chunk) * chunk


def build_context(adventure: Adventure, count: TokenCounter, budget: int, upto: int | None = None,
                  pending: str = "", view: ModelView | None = None, scan_pending: str | None = None) -> Context:
    """The prompt for the turn after `turns[:upto]` (default: the whole story) whose action is `pending`.

    With a `view`, `pending` is already in the model's language and `scan_pending` is the player's action.
    """
    settings, view = adventure.settings, view or ModelView()
    upto = adventure.length if upto is None else upto
    text = _texter(adventure, view)
    cards = adventure.all_cards()
    lore_budget = settings.lore_tokens if settings.lore_tokens is not None else int(budget * settings.card_share)
    constants = fit_budget(cards, constant_cards(cards), lambda i: count(_card(cards[i], text)) + 1, lore_budget)
    header = _header(adventure, cards, constants, text)
    note = text(render_note(adventure))
    tail = text(adventure.post_history)
    fixed = count(header) + count(note) + count(tail) + 2 + bool(tail)
    if fixed > budget // 2:
        raise UsageError(f"memory, world, author's note, card texts and constant world info take {fixed} tokens, "
                         f"more than half of the {budget}-token budget of this model; shorten the memory or the note")
    if count(pending) > budget // 4:
        raise UsageError(f"the action takes {count(pending)} tokens; the most is {budget // 4} for this model")
    blocks = history_blocks(adventure, upto, pending, view)
    lore_left = max(0, lore_budget - sum(count(_card(cards[i], text)) + 1 for i in constants))
    start = _fit_history(blocks, count, budget - fixed - lore_left, settings.max_turns, settings.drop_chunk)
    scanned = history_blocks(adventure, upto, pending if scan_pending is None else scan_pending)
    recent = "\n".join(scanned[max(0, len(scanned) - 1 - settings.scan_turns):])
    triggered = triggered_cards(cards, recent, settings.recursive_lore)
    while True:
        layout = _Layout(header, note, tail, lore_left)
        prompt, prefix, used = layout.assemble(adventure, blocks[start:], cards, triggered, text, count, budget)
        tokens = count(prompt)
        if tokens <= budget:
            return Context(prompt, tokens, budget, start, prefix, used, constants)
        if start >= len(blocks) - 1:  # only the new action is left; the checks above make this unreachable
            raise UsageError(f"the context needs {tokens} tokens even without history; the budget is {budget}")
        start += 1  # token merges across joins cost a token or two more than the plan: drop one more turn


def _texter(adventure: Adventure, view: ModelView):
    def text(value: str) -> str:
        return view.text(expand_macros(adventure, value)) if value else ""

    return text


def _card(card: WorldCard, text) -> str:
    return CARD_FORMAT.format(text(_without_decorators(card.text)))


def _without_decorators(content: str) -> str:
    """An entry's text without its leading V3 decorator lines (`@@depth 4`, `@@@fallback`): never prompt text.

    The spec asks to trim them before the content enters the prompt; rugpt keeps them (for the export) but
    acts on none of them.
    """
    lines = content.split("\n")
    while lines and lines[0].startswith("@@"):
        lines.pop(0)
    return "\n".join(lines).strip() or content


def _header(adventure: Adventure, cards: list[WorldCard], constants: list[int], text) -> str:
    """The stable beginning: system prompt, constant lore around the character, memory, world, examples."""
    before = [_card(cards[i], text) for i in constants if cards[i].position is Position.before_char]
    after = [_card(cards[i], text) for i in constants if cards[i].position is not Position.before_char]
    parts = [text(adventure.system_prompt), *before, text(adventure.memory), text(adventure.personality),
             text(adventure.world), *after, text(_examples(adventure.examples))]
    return "".join(f"{part}\n" for part in parts if part)


def _examples(examples: str) -> str:
    """Example messages without their <START> separators (SillyTavern's marker of a new example)."""
    return "\n".join(line for line in examples.splitlines() if line.strip().upper() != "<START>").strip()


def _fit_history(blocks: list[str], count: TokenCounter, room: int, max_turns: int, chunk: int) -> int:
    """The first block to keep: the window's start, moved on `chunk` blocks at a time until the rest fits."""
    start = window_start(len(blocks), max_turns, chunk)
    last = len(blocks) - 1
    while start < last and sum(count(b) + 1 for b in blocks[start:]) > room:
        start = start + chunk if start + chunk <= last else start + 1
    return start


@dataclass
class _Layout:
    header: str
    note: str
    tail: str
    lore_left: int

    def assemble(self, adventure: Adventure, kept: list[str], cards: list[WorldCard], triggered: list[int], text,
                 count: TokenCounter, budget: int) -> tuple[str, str, list[int]]:
        """Context text, its stable prefix and the triggered entries that fit the room left."""
        lines = "\n".join(block for block in kept if block).split("\n")
        at = max(0, len(lines) - adventure.settings.note_depth)
        before, after = lines[:at], lines[at:]
        fixed = count(self.header) + count(self.note) + count(self.tail) + 2 + bool(self.tail)
        room = budget - fixed - count("\n".join(lines))
        used = fit_budget(cards, triggered, lambda i: count(_card(cards[i], text)) + 1, min(room, self.lore_left))
        inserts = [_card(cards[i], text) for i in used] + ([self.note] if self.note else [])
        prefix = self.header + "\n".join(before)
        body = before + inserts + after + ([self.tail] if self.tail else [])
        return self.header + "\n".join(body) + "\n", prefix, used
