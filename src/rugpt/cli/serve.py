"""`rugpt serve`: the OpenAI-compatible HTTP server (and the text adventure at /play)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from rugpt.cli.app import command, err
from rugpt.cli.options import FromSettings, Opt

SERVER = FromSettings("rugpt.serve.settings:ServerSettings", opts={
    "model": Opt("--model", "-m"),
    "api_keys": Opt("--api-key", envvar="RUGPT_API_KEY", help="; or RUGPT_API_KEY, space-separated")})
# Without --replicas and the options after it, one process without Ray: no default is shown for it.
CLUSTER = FromSettings("rugpt.serve.cluster_settings:ClusterSettings", opts={"replicas": Opt(show_default=False)},
                       panel="Scale out (Ray Serve; pip install 'rugpt[cluster]')")


@command
def serve(
    given: Annotated[dict, SERVER],
    play: Annotated[bool, typer.Option("--play/--no-play", help="serve the text adventure at /play")] = True,
    cluster_given: Annotated[dict, CLUSTER] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with a batching queue and a web playground at /."""
    from rugpt.serve.cluster_settings import cluster_from_options

    cluster = cluster_from_options(cluster_given)
    settings = SERVER.bind().create(given)  # the class as it is now, with its fields' options
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        err.print(f"[yellow]warning:[/yellow] serving on {settings.host} without --api-key: anyone who can reach "
                  f"this address can use the model", markup=True)
    if cluster is not None:  # Ray Serve replicas, each making its own routers, in processes of their own
        from rugpt.serve.cluster import run_cluster, with_absolute_paths

        settings = with_absolute_paths(settings)
        run_cluster(settings, cluster, [functools.partial(_play_router, settings.play_db)] if play else [])
        return
    import rugpt.serve

    rugpt.serve.run_server(settings, routers=[_play_router(settings.play_db)] if play else [])


def _play_router(db: Path | None):
    """The text adventure's /play pages, composed here so that the server never imports the apps."""
    from rugpt.apps.adventure.store import AdventureStore
    from rugpt.apps.adventure.web import create_play_router

    return create_play_router(AdventureStore(db))
