"""The context builder: what the model reads each turn, within a token budget it never exceeds.

Layout, chosen so that the beginning stays the same from turn to turn and a server can reuse the cached
prefix:

    memory                    always; the player's notes on who they are and what matters
    world                     always; the scenario's setting
    history ...               the opening and recent turns; old ones leave `drop_chunk` at a time
    [world-info cards]        triggered by keys in recent text
    [Примечание автора: ...]  the author's note, `note_depth` lines before the end
    last lines of history     ending with the player's new action

Only what follows the insertion point changes from one turn to the next, until the window of turns moves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rugpt.apps.adventure.state import Adventure
from rugpt.apps.adventure.worldinfo import triggered_cards
from rugpt.errors import UsageError

NOTE_FORMAT = "[Примечание автора: {}]"
CARD_FORMAT = "[{}]"


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


@dataclass
class Context:
    """A built prompt and how it was made."""

    text: str
    tokens: int  # counted on the whole text with the model's tokenizer
    budget: int
    first_block: int  # first history block kept: 0 is the opening, i is turn i - 1
    stable_prefix: str  # the part before the cards and note: the next turn's context starts with it
    cards: list[int]  # the world-info cards included, by index


def history_blocks(adventure: Adventure, upto: int, pending: str) -> list[str]:
    """The opening, the turns before `upto`, then the new action (possibly empty, for "continue")."""
    return [adventure.opening, *(turn.block() for turn in adventure.turns[:upto]), pending]


def window_start(blocks: int, max_turns: int, chunk: int) -> int:
    """The first block kept when only the window matters: a multiple of `chunk`, so it moves rarely.

    At most `max_turns` finished turns plus the new action stay; fewer (down to max_turns - chunk + 1)
    right after the window has moved.
    """
    over = blocks - (max_turns + 1)
    return 0 if over <= 0 else -(-over // chunk) * chunk


def build_context(adventure: Adventure, count: TokenCounter, budget: int, upto: int | None = None,
                  pending: str = "") -> Context:
    """The prompt for the turn after `turns[:upto]` (default: the whole story) whose action is `pending`."""
    settings = adventure.settings
    upto = adventure.length if upto is None else upto
    blocks = history_blocks(adventure, upto, pending)
    header = "".join(f"{part}\n" for part in (adventure.memory, adventure.world) if part)
    note = NOTE_FORMAT.format(adventure.authors_note) if adventure.authors_note else ""
    fixed = count(header) + count(note) + 2
    if fixed > budget // 2:
        raise UsageError(f"memory, world and author's note take {fixed} tokens, more than half of the "
                         f"{budget}-token budget of this model; shorten the memory or the note")
    if count(pending) > budget // 4:
        raise UsageError(f"the action takes {count(pending)} tokens; the most is {budget // 4} for this model")
    reserve = int(budget * settings.card_share)  # kept whether or not cards fire, so `start` does not wobble
    start = _fit_history(blocks, count, budget - fixed - reserve, settings.max_turns, settings.drop_chunk)
    recent = "\n".join(blocks[max(0, len(blocks) - 1 - settings.scan_turns):])
    cards = triggered_cards(adventure.cards, recent)
    while True:
        text, prefix, used = _assemble(adventure, header, note, blocks[start:], cards, count, budget)
        tokens = count(text)
        if tokens <= budget:
            return Context(text, tokens, budget, start, prefix, used)
        if start >= len(blocks) - 1:  # only the new action is left; the checks above make this unreachable
            raise UsageError(f"the context needs {tokens} tokens even without history; the budget is {budget}")
        start += 1  # token merges across joins cost a token or two more than the plan: drop one more turn


def _fit_history(blocks: list[str], count: TokenCounter, room: int, max_turns: int, chunk: int) -> int:
    """The first block to keep: the window's start, moved on `chunk` blocks at a time until the rest fits."""
    start = window_start(len(blocks), max_turns, chunk)
    last = len(blocks) - 1
    while start < last and sum(count(b) + 1 for b in blocks[start:]) > room:
        start = start + chunk if start + chunk <= last else start + 1
    return start


def _assemble(adventure: Adventure, header: str, note: str, kept: list[str], cards: list[int],
              count: TokenCounter, budget: int) -> tuple[str, str, list[int]]:
    """Context text, its stable prefix and the cards that fit the room left."""
    lines = "\n".join(block for block in kept if block).split("\n")
    at = max(0, len(lines) - adventure.settings.note_depth)
    before, after = lines[:at], lines[at:]
    room = budget - count(header) - count("\n".join(lines)) - count(note) - 2
    used, inserts = [], []
    for index in cards:
        card = CARD_FORMAT.format(adventure.cards[index].text)
        cost = count(card) + 1
        if cost <= room:
            used.append(index)
            inserts.append(card)
            room -= cost
    inserts += [note] if note else []
    prefix = header + "\n".join(before)
    return header + "\n".join(before + inserts + after) + "\n", prefix, used
