"""One replica of `rugpt serve --replicas N`: the server's own FastAPI app as a Ray Serve ingress deployment.

Each replica builds the app as `rugpt serve` does (model, engine, batching scheduler, routers), wraps it in
ClusterMiddleware and hands it to Ray's HTTP proxy. It reaches the other replicas through Ray: the ledger
actor for per-key counts and adventure locks, a broadcast to its own deployment to cancel a request or to
collect metrics. Importing this module needs Ray; cluster.py imports it only once Ray is there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence

import ray
from fastapi import APIRouter, FastAPI
from ray import serve

from rugpt.serve.cluster_ledger import REPORT_EVERY
from rugpt.serve.cluster_middleware import ClusterMiddleware, Families, cancel_here, families_of
from rugpt.serve.cluster_settings import ClusterSettings
from rugpt.serve.settings import ServerSettings

log = logging.getLogger(__name__)
LEDGER_TIMEOUT = 5.0  # seconds a call to the ledger may take (it restarts within that after a crash)
BROADCAST_TIMEOUT = 10.0
BROADCAST_TRIES = 3
AppBuilder = Callable[[ServerSettings, Sequence[APIRouter]], FastAPI]
RouterFactory = Callable[[], APIRouter]


def build_app(settings: ServerSettings, routers: Sequence[APIRouter]) -> FastAPI:
    """The app of one replica: exactly what `rugpt serve` builds in one process."""
    from rugpt.serve.app import create_app

    return create_app(settings, routers=routers)


class RayLink:
    """A replica's way to the ledger actor and to the other replicas of its deployment."""

    def __init__(self, ledger_name: str, namespace: str):
        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        self._deployment, self._app_name = context.deployment, context.app_name
        self._ledger = ray.get_actor(ledger_name, namespace=namespace)
        self._handle = None  # to this replica's own deployment, made on first use
        self._leases: dict[str, str] = {}  # this replica's leases, reported every second
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report, name="rugpt-ledger-report", daemon=True)
        self._reporter.start()

    def _report(self) -> None:
        while not self._stop.is_set():
            try:
                ray.get(self._ledger.report.remote(self.replica_id, os.getpid(), dict(self._leases)),
                        timeout=LEDGER_TIMEOUT)
            except Exception as exc:  # the ledger is restarting; the next report tells it what we hold
                log.warning("cannot report to the cluster ledger: %s", exc)
            self._stop.wait(REPORT_EVERY)

    def close(self) -> None:
        self._stop.set()

    async def _call(self, method, *args, timeout: float = LEDGER_TIMEOUT):
        return await asyncio.wait_for(asyncio.wrap_future(method.remote(*args).future()), timeout)

    async def acquire(self, lease: str, key_hash: str, limit: int) -> bool:
        granted = await self._call(self._ledger.acquire, self.replica_id, lease, key_hash, limit)
        if granted:
            self._leases[lease] = key_hash
        return granted

    def release(self, lease: str) -> None:
        self._leases.pop(lease, None)
        self._ledger.release.remote(self.replica_id, lease)

    async def lock(self, name: str, timeout: float) -> str | None:
        return await self._call(self._ledger.lock, name, self.replica_id, timeout, timeout=timeout + LEDGER_TIMEOUT)

    def unlock(self, name: str, lock_id: str) -> None:
        self._ledger.unlock.remote(name, lock_id)

    async def _broadcast(self, method: str, *args, enough=None) -> list:
        """Answers of every replica to `method`. A handle learns the replicas a moment after it is made, so a
        broadcast that reached fewer replicas than the ledger knows is sent again (its methods are idempotent)."""
        if self._handle is None:
            self._handle = serve.get_deployment_handle(self._deployment, self._app_name)
        expected = len(await self._call(self._ledger.replicas))
        answers: list = []
        for attempt in range(BROADCAST_TRIES):
            try:
                results = await self._handle.broadcast(method, *args).results_async(
                    timeout_s=BROADCAST_TIMEOUT, return_exceptions=True)
            except TimeoutError:
                log.warning("a replica did not answer %s within %g s", method, BROADCAST_TIMEOUT)
                results = []
            answers = [r for r in results if not isinstance(r, BaseException)]
            if len(answers) >= expected or (enough is not None and enough(answers)):
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        return answers

    async def cancel_everywhere(self, request_id: str, key_hash: str | None) -> bool:
        answers = await self._broadcast("cancel_request", request_id, key_hash, enough=lambda a: True in a)
        return True in answers

    async def metrics_everywhere(self) -> list[tuple[str, Families]]:
        return sorted(await self._broadcast("metrics_families"))


@serve.ingress()
class ReplicaServer:
    """A Ray Serve replica serving rugpt's app; its extra methods are what other replicas broadcast to it."""

    def __init__(self, settings: ServerSettings, cluster: ClusterSettings, routers: Sequence[RouterFactory],
                 ledger_name: str, namespace: str, build: AppBuilder | None = None):
        import torch

        torch.set_num_threads(cluster.torch_threads())
        # The ledger counts each key's requests across replicas; the scheduler's own count would see one replica.
        local = settings.model_copy(update={"max_inflight_per_key": 0})
        self.link = RayLink(ledger_name, namespace)
        app = (build or build_app)(local, [make() for make in routers])
        app.add_middleware(ClusterMiddleware, link=self.link, settings=settings)
        self.rugpt_app = app
        log.info("replica %s (pid %d) ready", self.link.replica_id, os.getpid())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.rugpt_app

    async def cancel_request(self, request_id: str, key_hash: str | None) -> bool:
        return cancel_here(self.rugpt_app.state.scheduler, request_id, key_hash)

    async def metrics_families(self) -> tuple[str, Families]:
        return self.link.replica_id, families_of(self.rugpt_app.state.metrics.registry)

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: here, one whose decode loop has died."""
        scheduler = self.rugpt_app.state.scheduler
        if not scheduler.ready:
            raise RuntimeError("the replica's decode loop is not running")

    def __del__(self) -> None:
        link = getattr(self, "link", None)
        if link is not None:
            link.close()
