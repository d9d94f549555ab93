"""`rugpt serve --replicas N`: the same server as N Ray Serve replicas behind Ray's HTTP proxy.

Ray Serve does what it is built for: routing each request to a replica with room, holding a bounded queue
in front of them (429 beyond it), autoscaling, restarting a replica whose process died or whose decode loop
failed its health check. rugpt adds what one server promised and N must keep (cluster_middleware.py):
per-key limits counted cluster-wide in one small ledger actor, cancelling by id on whichever replica runs
the request, metrics of every replica, adventures changed one turn at a time. docs/scale.md says what
carries over and what does not.

    rugpt serve --replicas 2                       # a local Ray instance, proxy on 127.0.0.1:8000
    rugpt serve --min-replicas 1 --max-replicas 4 --ray-address auto
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rugpt.errors import UsageError
from rugpt.serve.cluster_ledger import Ledger
from rugpt.serve.cluster_settings import ClusterSettings
from rugpt.serve.settings import ServerSettings

log = logging.getLogger(__name__)
APP_NAME = "rugpt"
DEPLOYMENT = "rugpt-server"
NAMESPACE = "rugpt"
LEDGER = "rugpt-ledger"
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
INSTALL_HINT = "pip install 'rugpt[cluster]'"
_ledger = None


def require_ray():
    """(ray, ray.serve), or a UsageError that says how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError(f"--replicas and the other cluster options need Ray Serve, which is not installed: "
                         f"{INSTALL_HINT}") from None
    return ray, serve


def with_absolute_paths(settings: ServerSettings) -> ServerSettings:
    """Replicas are other processes (or machines) with their own working folder: send them absolute paths."""
    update: dict = {}
    if settings.model and Path(settings.model).expanduser().exists():
        update["model"] = str(Path(settings.model).expanduser().resolve())
    if settings.prompts_dir is not None:
        update["prompts_dir"] = settings.prompts_dir.resolve()
    if settings.play_db is not None:
        update["play_db"] = settings.play_db.expanduser().resolve()
    return settings.model_copy(update=update)


def connect(cluster: ClusterSettings) -> None:
    """Join `cluster.ray_address`, or start a local Ray instance, unless this process is connected already."""
    ray, _ = require_ray()
    # Read by Ray's HTTP proxy when it starts: a cluster joined with --ray-address needs it set at `ray start`.
    os.environ.setdefault(PROXY_CALLBACK, "rugpt.serve.cluster_proxy.middlewares")
    if not ray.is_initialized():
        ray.init(address=cluster.ray_address, namespace=NAMESPACE, include_dashboard=False,
                 logging_level=logging.WARNING)


def deploy(settings: ServerSettings, cluster: ClusterSettings, routers: Sequence = (), build=None) -> str:
    """Start (or join) Ray, deploy the replicas and wait until they serve; returns the proxy's base URL.

    `routers` are zero-argument callables, each run on every replica to make a router (e.g. /play's, over
    a store file all replicas share); `build(settings, routers)` replaces `create_app` (tests use it).
    """
    ray, serve = require_ray()
    from rugpt.models import resolve
    from rugpt.serve.cluster_replica import ReplicaServer

    resolve(settings.model)  # an unknown model or a missing folder fails here, once, before Ray starts
    settings = with_absolute_paths(settings)
    connect(cluster)
    global _ledger  # a named actor lives while a handle does: this process keeps one
    _ledger = ray.remote(Ledger).options(name=LEDGER, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                                         max_restarts=-1, max_task_retries=-1, max_concurrency=1000).remote()
    ray.get(_ledger.replicas.remote(), timeout=120)
    # security: the proxy binds to --host, 127.0.0.1 unless told otherwise, as the one-process server does.
    serve.start(http_options={"host": settings.host, "port": settings.port,
                              "request_timeout_s": settings.request_timeout + settings.shutdown_grace + 5})
    deployment = serve.deployment(ReplicaServer, name=DEPLOYMENT, **cluster.deployment_options(settings))
    began = time.monotonic()
    try:
        serve.run(deployment.bind(settings, cluster, list(routers), LEDGER, NAMESPACE, build), name=APP_NAME,
                  route_prefix="/", blocking=False)
    except RuntimeError as exc:  # Ray's message is every failed replica's traceback: say the cause in one line
        shutdown()
        raise UsageError(f"the replicas could not start: {_cause(str(exc))} (the Ray logs under "
                         f"/tmp/ray/session_latest/logs have the details)") from None
    log.info("%d replica(s) serving after %.0f s", cluster.replicas, time.monotonic() - began)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def _cause(report: str) -> str:
    """The last exception line of a traceback report ('ModelNotFound: ...'), else its first line."""
    found = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|NotFound|Full): .+)$", report, re.MULTILINE)
    found = [line.strip() for line in found if "Traceback (most recent call last)" not in line]
    return found[-1] if found else report.strip().splitlines()[0][:300]


def shutdown() -> None:
    """Remove rugpt's application (its replicas get --shutdown-grace) and the ledger; leave a joined cluster up."""
    ray, serve = require_ray()
    try:
        serve.delete(APP_NAME)
        ray.kill(ray.get_actor(LEDGER, namespace=NAMESPACE))
    except Exception as exc:  # already gone, or the cluster went away first
        log.debug("shutdown: %s", exc)


def run_cluster(settings: ServerSettings, cluster: ClusterSettings, routers: Sequence = ()) -> None:
    """Serve until interrupted (Ctrl-C), then take the replicas down; a local Ray instance stops with us."""
    ray, _ = require_ray()
    url = deploy(settings, cluster, routers)
    low, high = cluster.replica_bounds()
    count = f"{low}" if low == high else f"{low} to {high}"
    print(f"rugpt: {count} replica(s) serving at {url} (Ctrl-C stops them)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
        ray.shutdown()
