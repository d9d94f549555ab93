"""`rugpt play` in the terminal, driven through typer's runner with a tiny random model."""

import pytest
from typer.testing import CliRunner

from conftest import build_tiny_model
from rugpt.cli import app


@pytest.fixture(scope="module")
def model_512(tmp_path_factory):
    """A tiny random model with the bundled model's 512-token context, so real scenarios fit."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-512"), n_positions=512)


def play(*args: str, input: str = "/quit\n"):
    return CliRunner().invoke(app, ["play", *args], input=input)


def test_play_save_and_resume(model_512, tmp_path):
    db = str(tmp_path / "games.sqlite3")
    first = play("-s", "fantasy", "-m", str(model_512), "--db", db,
                 input="я открываю дверь\n\"кто здесь?\n/undo\n/redo\n/edit 1 Дверь скрипит.\n/quit\n")
    assert first.exit_code == 0, first.output
    assert "Вы открываете дверь." in first.output and "Вы говорите: «Кто здесь?»" in first.output
    assert "Тень над Вышеградом" in first.output and "Игра сохранена" in first.output
    listed = play("--list", "--db", db)
    assert "Тень над Вышеградом" in listed.output and "detective" in listed.output
    again = play("--resume", "1", "-m", str(model_512), "--db", db, input="/quit\n")
    assert again.exit_code == 0, again.output
    assert "Дверь скрипит." in again.output and "Вы говорите: «Кто здесь?»" in again.output


def test_commands_report_mistakes_and_go_on(model_512, tmp_path):
    result = play("-s", "space", "-m", str(model_512), "--db", str(tmp_path / "g.sqlite3"),
                  input="/undo\n/fly\n/edit x\n/memory Вы — пилот.\n/context\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "nothing to undo" in result.output and "неизвестная команда /fly" in result.output
    assert "Память:" in result.output and "Вы — пилот." in result.output and "токенов" in result.output


def test_unknown_scenario_is_one_line_and_exit_2(tmp_path):
    result = play("-s", "western", "--db", str(tmp_path / "g.sqlite3"))
    assert result.exit_code == 2 and "scenario='western' is unknown" in result.output


# --- the community's files at the command line


def write_card(folder, name: str = "miron.png") -> str:
    from _adventure_helpers import b64_json, card_v2, png_with_text

    path = folder / name
    path.write_bytes(png_with_text({"chara": b64_json(card_v2())}))
    return str(path)


def test_numbers_are_the_same_in_the_story_and_in_undo(model_512, tmp_path):
    result = play("-s", "fantasy", "-m", str(model_512), "--db", str(tmp_path / "g.sqlite3"),
                  input="я осматриваю окно\n/undo\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "1. Вы осматриваете окно." in result.output and "отменён ход 1: Вы осматриваете окно." in result.output


def test_a_png_card_is_played_and_exported_for_other_tools(model_512, tmp_path):
    import json

    from rugpt.apps.adventure import formats

    db = str(tmp_path / "g.sqlite3")
    result = play("--import", write_card(tmp_path), "-m", str(model_512), "--db", db,
                  input=f"я сажусь за стол\n/export {tmp_path / 'back.png'}\n/export {tmp_path / 'k.json'} koboldai\n"
                        "/quit\n")
    assert result.exit_code == 0, result.output
    assert "Мирон" in result.output and "1. Вы садитесь за стол." in result.output
    card = formats.read_bytes((tmp_path / "back.png").read_bytes(), "back.png").adventure
    assert card.title == "Мирон" and card.origin.document["x_unknown_top"] == "top"
    save = json.loads((tmp_path / "k.json").read_text())
    assert "> Вы садитесь за стол." in "".join(save["actions"]) and save["prompt"].startswith("Мирон кивает")


def test_import_and_export_without_playing_converts(tmp_path):
    import json

    from _adventure_helpers import kobold_save

    save = tmp_path / "gorod.json"
    save.write_text(json.dumps(kobold_save(), ensure_ascii=False))
    result = play("--import", str(save), "--export", str(tmp_path / "gorod.png"), "--db", str(tmp_path / "g.sqlite3"))
    assert result.exit_code == 0 and "(png)" in result.output, result.output
    assert not (tmp_path / "g.sqlite3").exists()  # a conversion saves nothing
    again = play("--import", str(tmp_path / "gorod.png"), "--export", str(tmp_path / "again.json"),
                 "--format", "koboldai")
    assert again.exit_code == 0, again.output
    back = json.loads((tmp_path / "again.json").read_text())
    assert back["prompt"] == kobold_save()["prompt"] and back["memory"].startswith("Вы — наёмник Ратибор.")


def test_lorebooks_join_a_scenario_and_a_saved_game(model_512, tmp_path):
    import json

    from _adventure_helpers import story_cards, world_info

    (tmp_path / "bolota.json").write_text(json.dumps(world_info(), ensure_ascii=False))
    (tmp_path / "aid.json").write_text(json.dumps(story_cards(), ensure_ascii=False))
    db = str(tmp_path / "g.sqlite3")
    result = play("-s", "fantasy", "--import", str(tmp_path / "bolota.json"), "-m", str(model_512), "--db", db,
                  input=f"/lore {tmp_path / 'aid.json'}\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "bolota" in result.output and "aid" in result.output
    lonely = play("--import", str(tmp_path / "bolota.json"), "--db", db)
    assert lonely.exit_code == 2 and "is a lorebook" in lonely.output


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n", "truncated PNG"),
    (None, "a PNG without a character card"),
])
def test_a_bad_file_is_one_line_exit_2_and_saved_games_stay(model_512, tmp_path, content, message):
    from _adventure_helpers import png_with_text

    from rugpt.apps.adventure.store import AdventureStore

    db = tmp_path / "g.sqlite3"
    assert play("-s", "space", "-m", str(model_512), "--db", str(db), input="я жду\n/quit\n").exit_code == 0
    before = db.read_bytes()
    bad = tmp_path / "face.png"
    bad.write_bytes(content if content is not None else png_with_text({"Comment": "just a face"}))
    result = play("--import", str(bad), "-m", str(model_512), "--db", str(db))
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    store = AdventureStore(db)
    assert [a.title for a in store.list_adventures()] == ["Станция «Предел»"] and store.load_by_id(1).length == 1
    store.close()
    assert db.read_bytes() == before
