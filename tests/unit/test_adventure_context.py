"""The context builder: token budget, stable prefix, chunked dropping, card triggers, note placement."""

import random

import pytest
from _adventure_helpers import WORDS, small_adventure

from rugpt.apps.adventure.context import NOTE_FORMAT, TokenCounter, build_context
from rugpt.apps.adventure.scenario import load_scenario
from rugpt.apps.adventure.state import ActionKind, Adventure, AdventureSettings, Turn
from rugpt.apps.adventure.worldinfo import WorldCard, triggered_cards
from rugpt.errors import UsageError


def add_turn(adventure: Adventure, action: str, output: str) -> None:
    adventure.turns.append(Turn(ActionKind.do, action, action, output, 0, {}))
    adventure.length += 1


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


@pytest.fixture
def count(tiny):
    return TokenCounter(tiny.tokenizer)


def model_tokens(tiny, text: str) -> int:
    return len(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("budget", [80, 108, 200, 457])
def test_budget_never_exceeded(tiny, count, budget):
    rng = random.Random(budget)
    adventure = small_adventure()
    for _ in range(40):
        pending = sentence(rng, rng.randint(1, 5))
        context = build_context(adventure, count, budget, pending=pending)
        assert context.tokens == model_tokens(tiny, context.text) <= budget
        assert context.text.startswith(adventure.memory)
        assert context.text.rstrip("\n").endswith(pending)
        add_turn(adventure, pending, "\n".join(sentence(rng, rng.randint(1, 30)) for _ in range(rng.randint(0, 3))))


def test_real_scenario_fits_the_bundled_model_budget(tiny, count):
    adventure = Adventure.from_scenario(load_scenario("fantasy"))
    rng = random.Random(0)
    for _ in range(30):
        context = build_context(adventure, count, 512 - 55, pending="Вы идёте к корчме и ищете змея.")
        assert model_tokens(tiny, context.text) <= 512 - 55
        add_turn(adventure, "Вы ждёте.", sentence(rng, 25))


def test_prefix_stays_the_same_until_the_window_moves(count):
    adventure = Adventure.from_scenario(load_scenario("fantasy"))
    rng = random.Random(1)
    previous = None
    starts = []
    for turn in range(30):
        context = build_context(adventure, count, 457, pending=f"Вы делаете шаг {turn}.")
        assert context.text.startswith(adventure.memory + "\n" + adventure.world + "\n")
        if previous is not None and previous.first_block == context.first_block:
            assert context.text.startswith(previous.stable_prefix)
        starts.append(context.first_block)
        previous = context
        add_turn(adventure, f"Вы делаете шаг {turn}.", sentence(rng, 8))
    moves = [b for a, b in zip(starts, starts[1:], strict=False) if b != a]
    assert moves and len(moves) <= 30 // 5 + 1  # the window moved a few times, not every turn


def test_old_turns_leave_in_chunks(count):
    adventure = small_adventure(max_turns=10, drop_chunk=5)
    starts, kept = [], []
    for turn in range(31):
        context = build_context(adventure, count, 10_000, pending="Вы ждёте.")
        starts.append(context.first_block)
        kept.append(len(adventure.turns) + 2 - context.first_block - 1)  # finished turns (and opening) kept
        add_turn(adventure, "Вы ждёте.", f"Прошёл час номер {turn}.")
    assert set(starts) == {0, 5, 10, 15, 20, 25}
    assert all(b - a in (0, 5) for a, b in zip(starts, starts[1:], strict=False))
    assert max(kept) <= 10 and min(kept[12:]) >= 6  # the last 10 actions at most, as gamio


def test_over_budget_drops_chunks_not_single_turns(count):
    adventure = small_adventure(max_turns=1000, drop_chunk=4, card_share=0.0)
    adventure.authors_note = ""
    starts = []
    for turn in range(40):
        starts.append(build_context(adventure, count, 200, pending="Вы ждёте.").first_block)
        add_turn(adventure, "Вы ждёте.", f"Прошёл ещё один долгий час, номер {turn}.")
    moved = sorted(set(starts))
    assert len(moved) > 2
    assert all(s % 4 == 0 for s in moved)  # every start is a chunk boundary


def test_cards_trigger_by_lemma_in_recent_text():
    cards = [WorldCard(("змей",), "Змей боится огня."), WorldCard(("Хромой гусь", "корчмарь"), "Корчма."),
             WorldCard(("ведьма",), "Ведьма на болоте.")]
    assert triggered_cards(cards, "Вы видите змея над стеной.") == [0]
    assert triggered_cards(cards, "Вы сидите у Хромого гуся.") == [1]
    assert triggered_cards(cards, "Корчмарю не до вас, а змеем пугают детей.") == [0, 1]
    assert triggered_cards(cards, "Вы идёте по тихой улице.") == []
    assert triggered_cards(cards, "Вы видите хромого коня и гуся.") == []  # both words, in a row


def test_cards_come_from_recent_turns_only(count):
    adventure = small_adventure(scan_turns=2)
    add_turn(adventure, "Вы видите дракона.", "Он улетает.")
    context = build_context(adventure, count, 10_000, pending="Вы ждёте.")
    assert "Дракон спит в пещере." in context.text and context.cards == [0]
    for _ in range(3):
        add_turn(adventure, "Вы ждёте.", "Тихо.")
    context = build_context(adventure, count, 10_000, pending="Вы ждёте.")
    assert "Дракон спит" not in context.text and context.cards == []


def test_note_and_cards_sit_a_few_lines_before_the_end(count):
    adventure = small_adventure(note_depth=3)
    for i in range(5):
        add_turn(adventure, f"Вы делаете шаг {i}.", f"Дракон смотрит {i}.")
    lines = build_context(adventure, count, 10_000, pending="Вы бежите.").text.rstrip("\n").split("\n")
    note = NOTE_FORMAT.format(adventure.authors_note)
    assert lines[-4] == note and lines[-5] == "[Дракон спит в пещере.]"
    assert lines[-3:] == ["Вы делаете шаг 4.", "Дракон смотрит 4.", "Вы бежите."]


def test_short_story_puts_note_before_everything_of_the_history(count):
    adventure = small_adventure(note_depth=3)
    text = build_context(adventure, count, 10_000, pending="Вы бежите.").text
    assert text.split("\n") == ["Вы — рыцарь.", "Лес у реки.", "[Примечание автора: Тон мрачный.]",
                                "Вы стоите у старого замка.", "Вы бежите.", ""]


def test_counter_is_the_model_tokenizer(tiny, count):
    text = "Вы открываете дверь, и в лицо вам бьёт холодный ветер."
    assert count(text) == model_tokens(tiny, text)


def test_too_long_memory_is_a_usage_error(count):
    adventure = small_adventure()
    adventure.memory = "Очень длинная память героя. " * 40
    with pytest.raises(UsageError, match="shorten the memory"):
        build_context(adventure, count, 108)


def test_settings_are_validated():
    with pytest.raises(UsageError, match="drop_chunk"):
        AdventureSettings(drop_chunk=0)
    with pytest.raises(UsageError, match="preset"):
        AdventureSettings(preset="wild")
