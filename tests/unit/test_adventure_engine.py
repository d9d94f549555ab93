"""The game: actions, retry, undo, redo, edit, exact replay, and the plan → complete → commit steps."""

import pytest
from _adventure_helpers import scripted, seeds, small_adventure

from rugpt.apps.adventure.context import TokenCounter
from rugpt.apps.adventure.engine import Game, local_completer
from rugpt.apps.adventure.scenario import list_scenarios, load_scenario
from rugpt.apps.adventure.state import ActionKind, settings_record
from rugpt.errors import DataError, UsageError
from rugpt.generation import Generator


@pytest.fixture
def game(tiny):
    return Game(small_adventure(), TokenCounter(tiny.tokenizer), tiny.context_length, seeds=seeds())


def story(game: Game) -> list[str]:
    return [t.block() for t in game.adventure.story]


def test_actions_enter_the_story_and_output_is_trimmed(game):
    do = game.act("do", "я беру меч", scripted)
    say = game.act(ActionKind.say, "кто здесь?", scripted)
    raw = game.act("story", "Из тьмы  выходит стражник.", scripted)
    more = game.act("continue", "", scripted)
    assert [t.action for t in (do, say, raw, more)] == [
        "Вы берёте меч.", "Вы говорите: «Кто здесь?»", "Из тьмы выходит стражник.", ""]
    assert do.output == "Ход со случайным числом 100. Ветер воет."
    assert do.player_text == "я беру меч" and do.kind is ActionKind.do
    assert game.adventure.length == 4


def test_each_turn_keeps_its_seed_and_settings(game):
    turn = game.act("do", "я жду", scripted)
    assert turn.seed == 100
    assert turn.settings == settings_record(game.adventure.settings.generation(100))
    assert turn.generation().max_new_tokens == 20


def test_empty_action_is_refused(game):
    with pytest.raises(UsageError, match="needs some text"):
        game.act("do", "   ", scripted)
    with pytest.raises(ValueError):
        game.act("dance", "я танцую", scripted)


def test_undo_and_redo(game):
    first = game.act("do", "я иду", scripted)
    second = game.act("do", "я стою", scripted)
    assert game.undo() == second and story(game) == [first.block()]
    assert game.undo() == first and story(game) == []
    with pytest.raises(UsageError, match="nothing to undo"):
        game.undo()
    assert game.redo() == first and game.redo() == second
    with pytest.raises(UsageError, match="nothing to redo"):
        game.redo()


def test_a_new_turn_ends_the_redo_stack(game):
    game.act("do", "я иду", scripted)
    game.act("do", "я стою", scripted)
    game.undo()
    game.act("do", "я бегу", scripted)
    assert [t.action for t in game.adventure.turns] == ["Вы идёте.", "Вы бежите."]
    with pytest.raises(UsageError):
        game.redo()


def test_retry_rewrites_only_the_last_turn_with_a_new_seed(game):
    first = game.act("do", "я иду", scripted)
    second = game.act("do", "я стою", scripted)
    again = game.retry(scripted)
    assert game.adventure.story == [first, again]
    assert again.action == second.action and again.seed != second.seed
    assert again.output == f"Ход со случайным числом {again.seed}. Ветер воет."


def test_retry_needs_a_turn(game):
    with pytest.raises(UsageError, match="nothing to retry"):
        game.retry(scripted)


def test_edit_any_turn(game):
    game.act("do", "я иду", scripted)
    game.act("do", "я стою", scripted)
    game.edit(0, output="Вы приходите к реке.")
    game.edit(1, action="Вы садитесь.")
    assert story(game) == ["Вы идёте.\nВы приходите к реке.", "Вы садитесь.\nХод со случайным числом 101. Ветер воет."]
    with pytest.raises(UsageError, match="turn 6 does not exist; the story has turns 1 to 2"):
        game.edit(5, output="x")  # index 5 is the player's turn 6: messages count turns from 1, as the terminal


def test_commit_refuses_a_plan_made_before_another_change(game):
    game.act("do", "я иду", scripted)
    pending = game.plan("do", "я стою")
    game.undo()
    with pytest.raises(UsageError, match="changed"):
        game.commit(pending, "Текст.")


def test_a_failed_completion_changes_nothing(game):
    game.act("do", "я иду", scripted)

    def broken(prompt, settings):
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        game.act("do", "я стою", broken)
    assert story(game) == ["Вы идёте.\nХод со случайным числом 100. Ветер воет."]


def test_replay_with_the_stored_seed_gives_the_same_text(tiny):
    # A hot temperature, so that the random tiny model's texts differ from seed to seed.
    adventure = small_adventure(preset="creative", temperature=3.0)
    game = Game(adventure, TokenCounter(tiny.tokenizer), tiny.context_length, seeds=seeds())
    complete = local_completer(Generator(tiny))
    for action in ("я открываю дверь", "я иду к реке", "я жду"):
        game.act("do", action, complete)
    game.act("continue", "", complete)
    outputs = [turn.output for turn in game.adventure.story]
    assert all(outputs) and len(set(outputs)) == 4
    for index, output in enumerate(outputs):
        assert game.replay(index, complete) == output
    retried = game.retry(complete)  # a new seed, a new text; and it too replays exactly
    assert retried.output != outputs[3] and game.replay(3, complete) == retried.output


def test_update_checks_everything_before_changing_anything(game):
    game.update(memory="Вы — старый рыцарь.", cards=[{"keys": ["река"], "text": "Река глубокая."}])
    assert game.adventure.memory == "Вы — старый рыцарь." and game.adventure.cards[0].keys == ("река",)
    with pytest.raises(UsageError, match="max_new_tokens"):
        game.update(memory="другая", settings={"max_new_tokens": 100})
    with pytest.raises(DataError):
        game.update(memory="третья", cards=[{"keys": [], "text": "без ключей"}])
    assert game.adventure.memory == "Вы — старый рыцарь."
    with pytest.raises(UsageError, match="cannot change"):
        game.update(world="Другой мир")


def test_builtin_scenarios_are_complete():
    scenarios = {s.name: s for s in list_scenarios()}
    assert {"fantasy", "detective", "space", "postapocalypse"} <= set(scenarios)
    for scenario in scenarios.values():
        assert scenario.title and scenario.world and scenario.memory and scenario.opening and len(scenario.cards) >= 3
    with pytest.raises(UsageError, match="fantasy"):
        load_scenario("nope")
