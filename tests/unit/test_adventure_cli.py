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
