"""`rugpt serve`: options become ServerSettings (help text from their descriptions); bad values exit with 2."""

from typer.testing import CliRunner

import rugpt.serve
from rugpt.cli import app

runner = CliRunner()


def fake_run_server(started: list):
    def run_server(settings, routers=()):
        started.append(settings)
        started.extend(routers)

    return run_server


def test_serve_turns_options_into_settings(monkeypatch, tiny_model_dir):
    started = []
    monkeypatch.setattr(rugpt.serve, "run_server", fake_run_server(started))
    result = runner.invoke(app, ["serve", "--model", str(tiny_model_dir), "--port", "8123", "--api-key", "k1",
                                 "--max-waiting", "8", "--max-queue-seconds", "2.5", "--max-inflight-per-key", "3",
                                 "--no-play"])
    assert result.exit_code == 0, result.output
    [settings] = started
    assert settings.host == "127.0.0.1" and settings.port == 8123 and settings.api_keys == ["k1"]
    assert (settings.max_waiting, settings.max_queue_seconds, settings.max_inflight_per_key) == (8, 2.5, 3)


def test_serve_reads_api_keys_from_the_environment(monkeypatch):
    started = []
    monkeypatch.setattr(rugpt.serve, "run_server", fake_run_server(started))
    result = runner.invoke(app, ["serve", "--no-play"], env={"RUGPT_API_KEY": "first second"})
    assert result.exit_code == 0, result.output
    assert started[0].api_keys == ["first", "second"]


def test_serve_refuses_bad_settings_in_one_line():
    result = runner.invoke(app, ["serve", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output


def test_serve_help_comes_from_the_settings():
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "--max-queue-seconds" in result.output and "answered 503" in result.output


def test_serve_mounts_the_adventure_at_play(monkeypatch, tmp_path, tiny):
    from fastapi.testclient import TestClient

    from rugpt.serve import ServerSettings, create_app

    started = []
    monkeypatch.setattr(rugpt.serve, "run_server", fake_run_server(started))
    result = runner.invoke(app, ["serve", "--play-db", str(tmp_path / "play.sqlite3")])
    assert result.exit_code == 0, result.output
    settings, router = started
    with TestClient(create_app(ServerSettings(), loaded=tiny, routers=[router])) as client:
        assert client.get("/play").status_code == 200
        created = client.post("/play/api/adventures", json={"scenario": "detective"})
        assert created.status_code == 201 and created.json()["token"]
    assert (tmp_path / "play.sqlite3").exists()


def test_a_field_added_to_server_settings_is_an_option_and_reaches_the_server(monkeypatch):
    from pydantic import Field

    import rugpt.serve.settings

    class WithKnob(rugpt.serve.settings.ServerSettings):
        knob_count: int = Field(3, ge=1, description="a knob a test added")

    monkeypatch.setattr(rugpt.serve.settings, "ServerSettings", WithKnob)
    shown = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "2000"}).output
    assert "--knob-count" in shown and "a knob a test added [default: 3]" in shown
    started = []
    monkeypatch.setattr(rugpt.serve, "run_server", fake_run_server(started))
    result = runner.invoke(app, ["serve", "--knob-count", "5", "--no-play"])
    assert result.exit_code == 0, result.output
    assert started[0].knob_count == 5
    refused = runner.invoke(app, ["serve", "--knob-count", "0", "--no-play"])
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        "error: --knob-count: Input should be greater than or equal to 1"]


def test_serve_checks_the_engine_and_log_level_against_their_choices(monkeypatch):
    from rugpt.engines import EngineChoice

    started = []
    monkeypatch.setattr(rugpt.serve, "run_server", fake_run_server(started))
    bad = runner.invoke(app, ["serve", "--engine", "warp"])
    allowed = ", ".join(c.value for c in EngineChoice)
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [
        f"error: --engine='warp' is not allowed; use one of {allowed}"]
    assert runner.invoke(app, ["serve", "--log-level", "loud"]).exit_code == 2 and not started
    good = runner.invoke(app, ["serve", "--engine", "fast-int8", "--log-level", "debug", "--no-play"])
    assert good.exit_code == 0, good.output
    assert started[0].engine is EngineChoice.fast_int8 and started[0].log_level == "debug"
    shown = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "2000"}).output
    assert "[choices: critical, error, warning, info, debug]" in shown and "pip install 'rugpt[cluster]'" in shown
