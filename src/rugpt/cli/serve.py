"""`rugpt serve`: the OpenAI-compatible HTTP server (and the text adventure at /play)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rugpt.cli.app import ModelOpt, command, err
from rugpt.errors import UsageError


def _serve_help(name: str) -> str:
    from rugpt.serve.settings import describe

    return describe(name)


@command
def serve(
    model: ModelOpt = None,
    host: Annotated[Optional[str], typer.Option(help=_serve_help("host"))] = None,
    port: Annotated[Optional[int], typer.Option(help=_serve_help("port"))] = None,
    engine: Annotated[Optional[str], typer.Option(help=_serve_help("engine"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_serve_help("device"))] = None,
    served_name: Annotated[Optional[str], typer.Option(help=_serve_help("served_name"))] = None,
    api_key: Annotated[Optional[list[str]], typer.Option(
        envvar="RUGPT_API_KEY", help=_serve_help("api_keys") + " (repeatable; or RUGPT_API_KEY, space-separated)",
        show_envvar=False)] = None,
    prompts_dir: Annotated[Optional[Path], typer.Option(help=_serve_help("prompts_dir"))] = None,
    max_batch: Annotated[Optional[int], typer.Option(help=_serve_help("max_batch"))] = None,
    max_waiting: Annotated[Optional[int], typer.Option(help=_serve_help("max_waiting"))] = None,
    max_queue_seconds: Annotated[Optional[float], typer.Option(help=_serve_help("max_queue_seconds"))] = None,
    max_inflight_per_key: Annotated[Optional[int], typer.Option(help=_serve_help("max_inflight_per_key"))] = None,
    request_timeout: Annotated[Optional[float], typer.Option(help=_serve_help("request_timeout"))] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(help=_serve_help("max_prompt_tokens"))] = None,
    max_tokens_limit: Annotated[Optional[int], typer.Option(help=_serve_help("max_tokens_limit"))] = None,
    default_max_tokens: Annotated[Optional[int], typer.Option(help=_serve_help("default_max_tokens"))] = None,
    max_n: Annotated[Optional[int], typer.Option(help=_serve_help("max_n"))] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option(help=_serve_help("max_body_bytes"))] = None,
    shutdown_grace: Annotated[Optional[float], typer.Option(help=_serve_help("shutdown_grace"))] = None,
    log_level: Annotated[Optional[str], typer.Option(help=_serve_help("log_level"))] = None,
    play_db: Annotated[Optional[Path], typer.Option(help="SQLite file of the /play text adventures "
                                                    "(default: ~/.local/share/rugpt/adventures.sqlite3)")] = None,
    play: Annotated[bool, typer.Option("--play/--no-play", help="serve the text adventure at /play")] = True,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with a batching queue and a web playground at /."""
    given = {name: value for name, value in locals().items()
             if value is not None and name not in ("api_key", "play_db", "play")}
    given["api_keys"] = list(api_key or [])
    from pydantic import ValidationError

    from rugpt.serve import ServerSettings, run_server

    try:
        settings = ServerSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        err.print(f"[yellow]warning:[/yellow] serving on {settings.host} without --api-key: anyone who can reach "
                  f"this address can use the model", markup=True)
    run_server(settings, routers=[_play_router(play_db)] if play else [])


def _play_router(db: Path | None):
    """The text adventure's /play pages, composed here so that the server never imports the apps."""
    from rugpt.apps.adventure.store import AdventureStore
    from rugpt.apps.adventure.web import create_play_router

    return create_play_router(AdventureStore(db))
