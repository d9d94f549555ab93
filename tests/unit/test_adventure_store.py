"""SQLite persistence: one transaction per change, crash safety, tokens, export and import."""

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _adventure_helpers import scripted, seeds, small_adventure

from rugpt.apps.adventure.engine import Game
from rugpt.apps.adventure.state import export_adventure, import_adventure
from rugpt.apps.adventure.store import AdventureNotFound, AdventureStore
from rugpt.errors import DataError


class WordCount:
    """A token counter that needs no tokenizer: the store tests are about saving, not budgets."""

    def __call__(self, text: str) -> int:
        return len(text.split())


def new_game(store: AdventureStore) -> tuple[Game, str]:
    adventure = small_adventure()
    token = store.create(adventure)
    return Game(adventure, WordCount(), 1024, store, seeds=seeds()), token


def test_turns_survive_reopening(tmp_path):
    store = AdventureStore(tmp_path / "a.sqlite3")
    game, token = new_game(store)
    game.act("do", "я иду", scripted)
    game.act("say", "привет", scripted)
    game.undo()
    store.close()
    reopened = AdventureStore(tmp_path / "a.sqlite3").load(token)
    assert export_adventure(reopened) == export_adventure(game.adventure)
    assert reopened.length == 1 and len(reopened.turns) == 2  # the undone turn is there for redo


def test_a_committed_turn_survives_a_crash(tmp_path):
    path = tmp_path / "crash.sqlite3"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from _adventure_helpers import scripted, small_adventure
        from rugpt.apps.adventure.engine import Game
        from rugpt.apps.adventure.store import AdventureStore
        store = AdventureStore({str(path)!r})
        adventure = small_adventure()
        print(store.create(adventure), flush=True)
        game = Game(adventure, lambda text: len(text.split()), 1024, store)
        game.act("do", "я иду", scripted)
        game.act("do", "я жду", scripted)
        os._exit(1)  # no close, no cleanup: as if the process were killed
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    adventure = AdventureStore(path).load(run.stdout.strip())
    assert [t.action for t in adventure.story] == ["Вы идёте.", "Вы ждёте."]


def test_a_failed_save_rolls_back_the_whole_change(tmp_path):
    store = AdventureStore(tmp_path / "a.sqlite3")
    game, token = new_game(store)
    game.act("do", "я иду", scripted)
    adventure = game.adventure
    adventure.length = 0
    adventure.memory = "изменено"
    with pytest.raises(IndexError):
        store.save(adventure, changed=[5])  # fails after the header was written, inside the transaction
    saved = store.load(token)
    assert saved.length == 1 and saved.memory == "Вы — рыцарь."


def test_tokens_keep_players_apart(tmp_path):
    store = AdventureStore(tmp_path / "a.sqlite3")
    first, first_token = new_game(store)
    second, second_token = new_game(store)
    first.act("do", "я иду", scripted)
    second.act("do", "я сплю", scripted)
    assert first_token != second_token and len(first_token) >= 43
    assert store.load(first_token).story[0].action == "Вы идёте."
    assert store.load(second_token).story[0].action == "Вы спите."
    for wrong in ("", first_token[:-1], first_token + "x", "1", "' OR 1=1 --"):
        with pytest.raises(AdventureNotFound):
            store.load(wrong)


def test_the_file_holds_no_token(tmp_path):
    path = tmp_path / "a.sqlite3"
    store = AdventureStore(path)
    _, token = new_game(store)
    store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert token.encode() not in stored


def test_export_import_round_trip(tmp_path):
    store = AdventureStore(tmp_path / "a.sqlite3")
    game, _ = new_game(store)
    game.act("do", "я иду", scripted)
    game.act("story", "Начинается дождь.", scripted)
    game.undo()
    data = json.loads(json.dumps(export_adventure(game.adventure), ensure_ascii=False))
    copy = import_adventure(data)
    assert export_adventure(copy) == export_adventure(game.adventure)
    token = store.create(copy)
    assert export_adventure(store.load(token)) == export_adventure(game.adventure)


@pytest.mark.parametrize("change", [
    {"format": "other"},
    {"version": 99},
    {"length": 7},
    {"turns": [{"kind": "dance", "seed": 1}]},
    {"memory": 5},
    {"memory": "x" * 30_000},
    {"settings": {"max_turns": 0}},
    {"cards": [{"keys": [], "text": "нет ключей"}]},
])
def test_import_rejects_bad_data(change):
    data = export_adventure(small_adventure()) | change
    with pytest.raises(DataError):
        import_adventure(data)


def test_threads_sharing_one_store_see_only_whole_turns(tmp_path):
    store = AdventureStore(tmp_path / "a.sqlite3")
    games = [new_game(store) for _ in range(4)]

    def play(game_and_token) -> None:
        game, token = game_and_token
        for i in range(10):
            game.act("do", f"я делаю шаг {i}", scripted)
            assert store.load(token).length == i + 1  # never a half-saved turn

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(play, games))
    for game, token in games:
        assert export_adventure(store.load(token)) == export_adventure(game.adventure)
