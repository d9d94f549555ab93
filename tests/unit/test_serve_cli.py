"""`rugpt serve`: options become ServerSettings (help text from their descriptions); bad values exit with 2."""

from typer.testing import CliRunner

import rugpt.serve
from rugpt.cli import app

runner = CliRunner()


def test_serve_turns_options_into_settings(monkeypatch, tiny_model_dir):
    started = []
    monkeypatch.setattr(rugpt.serve, "run_server", started.append)
    result = runner.invoke(app, ["serve", "--model", str(tiny_model_dir), "--port", "8123", "--api-key", "k1",
                                 "--max-waiting", "8", "--max-queue-seconds", "2.5", "--max-inflight-per-key", "3"])
    assert result.exit_code == 0, result.output
    [settings] = started
    assert settings.host == "127.0.0.1" and settings.port == 8123 and settings.api_keys == ["k1"]
    assert (settings.max_waiting, settings.max_queue_seconds, settings.max_inflight_per_key) == (8, 2.5, 3)


def test_serve_reads_api_keys_from_the_environment(monkeypatch):
    started = []
    monkeypatch.setattr(rugpt.serve, "run_server", started.append)
    result = runner.invoke(app, ["serve"], env={"RUGPT_API_KEY": "first second"})
    assert result.exit_code == 0, result.output
    assert started[0].api_keys == ["first", "second"]


def test_serve_refuses_bad_settings_in_one_line():
    result = runner.invoke(app, ["serve", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output


def test_serve_help_comes_from_the_settings():
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "--max-queue-seconds" in result.output and "answered 503" in result.output
