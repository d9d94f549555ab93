"""World info as the formats mean it: selective logic, constant entries in the stable part, insertion order,
priority under a token budget, scan depth, recursion; the note's template; card texts in the context."""

import pytest
from _adventure_helpers import small_adventure

from rugpt.apps.adventure.context import TokenCounter, build_context, expand_macros
from rugpt.apps.adventure.state import ActionKind, Turn
from rugpt.apps.adventure.worldinfo import Lorebook, Position, SelectiveLogic, WorldCard, triggered_cards
from rugpt.errors import DataError


@pytest.fixture
def count(tiny):
    return TokenCounter(tiny.tokenizer)


def card(text: str, *keys: str, **fields) -> WorldCard:
    return WorldCard(keys, text, **fields)


@pytest.mark.parametrize("logic, fires", [
    # text: «дракон» (primary), «ночь» present, «факел» absent
    (SelectiveLogic.and_any, True), (SelectiveLogic.and_all, False),
    (SelectiveLogic.not_any, False), (SelectiveLogic.not_all, True),
])
def test_secondary_keys_follow_sillytaverns_logic(logic, fires):
    entry = card("Дракон.", "дракон", secondary_keys=("ночь", "факел"), logic=logic)
    assert triggered_cards([entry], "Ночью дракон летит над лесом.") == ([0] if fires else [])


def test_selective_logic_on_texts_with_every_and_no_secondary_key():
    both = "Ночью дракон боится факела."
    none = "Днём дракон спит."
    for logic, on_both, on_none in [(SelectiveLogic.and_any, True, False), (SelectiveLogic.and_all, True, False),
                                    (SelectiveLogic.not_any, False, True), (SelectiveLogic.not_all, False, True)]:
        entry = card("Дракон.", "дракон", secondary_keys=("ночь", "факел"), logic=logic)
        assert (triggered_cards([entry], both) == [0]) is on_both, logic
        assert (triggered_cards([entry], none) == [0]) is on_none, logic
    no_primary = card("Дракон.", "дракон", secondary_keys=("ночь",), logic=SelectiveLogic.not_any)
    assert triggered_cards([no_primary], "Тихая ночь.") == []


def test_secondary_keys_are_ignored_when_not_selective():
    entry = card("Дракон.", "дракон", secondary_keys=("факел",), selective=False)
    assert triggered_cards([entry], "Дракон спит.") == [0]


def test_disabled_and_constant_entries_never_trigger_by_keys():
    entries = [card("Выкл.", "дракон", enabled=False), card("Всегда.", "дракон", constant=True)]
    assert triggered_cards(entries, "Дракон спит.") == []


def test_latin_keys_match_as_substrings_and_case_sensitive_ones_exactly():
    entries = [card("Dragons.", "dragon"), card("Case.", "Mirror", case_sensitive=True)]
    assert triggered_cards(entries, "Two DRAGONS fly over the Mirror lake.") == [0, 1]
    assert triggered_cards(entries, "the mirror lake") == []


def test_regex_keys_are_never_compiled():
    entry = card("Regex.", "/(a+)+$/")  # catastrophic backtracking if it were compiled
    assert triggered_cards([entry], "a" * 5000 + "!") == []


def test_recursive_scanning_follows_entries_text():
    entries = [card("Змей живёт у ведьмы.", "змей"), card("Ведьма на болоте.", "ведьма")]
    assert triggered_cards(entries, "Вы видите змея.") == [0]
    assert triggered_cards(entries, "Вы видите змея.", recursive=True) == [0, 1]


def test_an_enabled_entry_without_keys_must_be_constant():
    with pytest.raises(DataError, match="has no keys; give it at least one key or make it constant"):
        WorldCard((), "Без ключей.")
    assert WorldCard((), "Всегда.", constant=True).constant
    assert not WorldCard((), "Выключено.", enabled=False).enabled


def test_card_json_keeps_only_what_differs_from_defaults():
    assert card("Текст.", "ключ").to_dict() == {"keys": ["ключ"], "text": "Текст."}
    rich = card("Текст.", "ключ", secondary_keys=("б",), logic=SelectiveLogic.not_all, order=3, priority=9,
                position=Position.before_char, extra={"sillytavern": {"uid": 4}})
    assert WorldCard.from_dict(rich.to_dict()) == rich


def test_constant_entries_join_the_stable_beginning(count):
    adventure = small_adventure()
    adventure.cards += [card("Всегда ночь.", constant=True, position=Position.before_char),
                        card("Идёт война.", constant=True)]
    context = build_context(adventure, count, 10_000, pending="Вы ждёте.")
    lines = context.text.split("\n")
    assert lines[:4] == ["[Всегда ночь.]", "Вы — рыцарь.", "Лес у реки.", "[Идёт война.]"]
    assert context.constants == [2, 3] and context.stable_prefix.startswith("[Всегда ночь.]\nВы — рыцарь.")
    for i in range(8):  # the beginning stays, turn after turn
        adventure.turns.append(Turn(ActionKind.do, "ждать", f"Вы ждёте {i}.", "Тихо.", 0, {}))
        adventure.length += 1
        assert build_context(adventure, count, 10_000, pending="Вы ждёте.").text.startswith(context.stable_prefix)


def test_insertion_order_places_entries_and_priority_decides_under_the_budget(count):
    adventure = small_adventure(lore_tokens=None, card_share=0.5)
    adventure.cards = [card("Первая запись о драконе, длинная и подробная.", "дракон", order=30, priority=1),
                       card("Вторая запись.", "дракон", order=10, priority=50),
                       card("Третья запись.", "дракон", order=20)]
    context = build_context(adventure, count, 10_000, pending="Вы видите дракона.")
    text = context.text
    assert context.cards == [1, 2, 0]  # by insertion order, lowest first
    assert text.index("[Вторая") < text.index("[Третья") < text.index("[Первая")
    cost = {i: count(f"[{adventure.cards[i].text}]") + 1 for i in range(3)}
    adventure.settings.lore_tokens = cost[1] + cost[2]  # room for two: the lowest priority (1) is left out
    assert build_context(adventure, count, 10_000, pending="Вы видите дракона.").cards == [1, 2]
    adventure.settings.lore_tokens = cost[1]
    assert build_context(adventure, count, 10_000, pending="Вы видите дракона.").cards == [1]


def test_v3_decorators_stay_out_of_the_context(count):
    adventure = small_adventure()
    adventure.cards = [card("@@depth 4\n@@@instruct_depth 4\nДракон спит в пещере.", "дракон")]
    text = build_context(adventure, count, 10_000, pending="Вы видите дракона.").text
    assert "[Дракон спит в пещере.]" in text and "@@" not in text
    assert adventure.cards[0].text.startswith("@@depth 4")  # kept for the export


def test_scan_depth_counts_turns(count):
    adventure = small_adventure(scan_turns=1)
    adventure.turns = [Turn(ActionKind.do, "", "Вы видите дракона.", "Он спит.", 0, {}),
                       Turn(ActionKind.do, "", "Вы ждёте.", "Тихо.", 0, {})]
    adventure.length = 2
    assert build_context(adventure, count, 10_000, pending="Вы ждёте.").cards == []
    adventure.settings.scan_turns = 2
    assert build_context(adventure, count, 10_000, pending="Вы ждёте.").cards == [0]


def test_lorebooks_are_active_together(count):
    adventure = small_adventure()
    adventure.lorebooks = [Lorebook("a", (card("Болото топкое.", "болото"),)),
                           Lorebook("b", (card("Мост старый.", "мост"),))]
    context = build_context(adventure, count, 10_000, pending="Вы идёте через болото к мосту.")
    assert context.cards == [2, 3] and "[Болото топкое.]" in context.text and "[Мост старый.]" in context.text


def test_the_note_uses_its_template_and_depth(count):
    adventure = small_adventure(note_depth=1)
    adventure.note_template = "[Author's note: <|>]"
    lines = build_context(adventure, count, 10_000, pending="Вы бежите.").text.rstrip("\n").split("\n")
    assert lines[-2:] == ["[Author's note: Тон мрачный.]", "Вы бежите."]


def test_card_texts_take_their_places(count):
    adventure = small_adventure()
    adventure.character, adventure.system_prompt = "Мирон", "Пиши по-русски."
    adventure.personality, adventure.examples = "хитрый", "<START>\n{{user}}: Привет.\n{{char}}: Здорово."
    adventure.post_history = "Отвечай коротко."
    adventure.opening = "{{char}} кивает {{user}}."
    text = build_context(adventure, count, 10_000, pending="Вы садитесь.").text
    assert text.split("\n")[:6] == ["Пиши по-русски.", "Вы — рыцарь.", "хитрый", "Лес у реки.", "Вы: Привет.",
                                    "Мирон: Здорово."]
    assert "Мирон кивает Вы." in text and text.endswith("Вы садитесь.\nОтвечай коротко.\n")
    assert expand_macros(adventure, "<BOT> и <USER>") == "Мирон и Вы"
