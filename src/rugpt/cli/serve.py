"""`rugpt serve`: the OpenAI-compatible HTTP server (and the text adventure at /play)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from rugpt.cli.app import ModelOpt, command, err
from rugpt.errors import UsageError


def _serve_help(name: str) -> str:
    from rugpt.serve.settings import describe

    return describe(name)


CLUSTER = "Scale out (Ray Serve; pip install 'rugpt[cluster]')"


def _cluster_help(name: str) -> str:
    from rugpt.serve.cluster_settings import describe_cluster

    return describe_cluster(name)


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
    play_db: Annotated[Optional[Path], typer.Option(help=_serve_help("play_db"))] = None,
    play: Annotated[bool, typer.Option("--play/--no-play", help="serve the text adventure at /play")] = True,
    replicas: Annotated[Optional[int], typer.Option(help=_cluster_help("replicas"), rich_help_panel=CLUSTER)] = None,
    min_replicas: Annotated[Optional[int], typer.Option(help=_cluster_help("min_replicas"), rich_help_panel=CLUSTER)
                            ] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help=_cluster_help("max_replicas"), rich_help_panel=CLUSTER)
                            ] = None,
    ray_address: Annotated[Optional[str], typer.Option(help=_cluster_help("ray_address"), rich_help_panel=CLUSTER)
                           ] = None,
    max_ongoing_per_replica: Annotated[Optional[int], typer.Option(
        help=_cluster_help("max_ongoing_per_replica"), rich_help_panel=CLUSTER)] = None,
    max_queued: Annotated[Optional[int], typer.Option(help=_cluster_help("max_queued"), rich_help_panel=CLUSTER)
                          ] = None,
    cpus_per_replica: Annotated[Optional[float], typer.Option(
        help=_cluster_help("cpus_per_replica"), rich_help_panel=CLUSTER)] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(
        help=_cluster_help("gpus_per_replica"), rich_help_panel=CLUSTER)] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with a batching queue and a web playground at /."""
    given = {name: value for name, value in locals().items()
             if value is not None and name not in ("api_key", "play")}
    given["api_keys"] = list(api_key or [])
    from rugpt.serve.cluster_settings import CLUSTER_OPTIONS, cluster_from_options

    cluster = cluster_from_options({name: given.pop(name, None) for name in CLUSTER_OPTIONS})
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
    if cluster is not None:  # Ray Serve replicas, each making its own routers, in processes of their own
        from rich.markup import escape

        from rugpt.serve.cluster import run_cluster, with_absolute_paths

        settings = with_absolute_paths(settings)
        try:
            run_cluster(settings, cluster, [functools.partial(_play_router, settings.play_db)] if play else [])
        except UsageError as exc:  # its install hint holds [cluster], which the error line's markup would eat
            raise UsageError(escape(str(exc))) from None
        return
    run_server(settings, routers=[_play_router(settings.play_db)] if play else [])


def _play_router(db: Path | None):
    """The text adventure's /play pages, composed here so that the server never imports the apps."""
    from rugpt.apps.adventure.store import AdventureStore
    from rugpt.apps.adventure.web import create_play_router

    return create_play_router(AdventureStore(db))
