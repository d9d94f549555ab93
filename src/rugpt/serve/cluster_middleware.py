"""Where a replica of `rugpt serve --replicas N` differs from the one-process server: a middleware around the
same app that keeps its guarantees across replicas.

- `--max-inflight-per-key` counts a key's requests on every replica (a lease from the cluster's ledger for
  each generation request, returned when its answer ends); the replica's own scheduler no longer counts.
- `DELETE /v1/requests/{id}` reaches the replica that runs the request: a request this replica does not
  hold is looked for on every replica (Ray Serve's broadcast to the deployment).
- `/metrics` shows every replica's series, each with a `replica` label, and `rugpt_cluster_replicas`.
- A change to an adventure under /play (anything but a read) holds that adventure's lock across replicas,
  as one server's per-adventure lock does, so two turns that land on two replicas never overwrite each other.
- Every answer names its replica in `x-rugpt-replica`.

The replica reaches the others through a `ClusterLink` (cluster_replica.py's over Ray; the tests' in memory).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Protocol

from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from rugpt.serve.cluster_proxy import REQUEST_ID_PREFIX
from rugpt.serve.errors import APIError, too_many
from rugpt.serve.routes import require_key
from rugpt.serve.settings import ServerSettings

GENERATION_ROUTES = tuple(REQUEST_ID_PREFIX)
CANCEL_PREFIX = "/v1/requests/"
ADVENTURE_PREFIX = "/play/api/adventure"
ADVENTURE_TOKEN = b"x-adventure-token"
REPLICA_HEADER = b"x-rugpt-replica"
Families = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]  # name, help, type, samples


class ClusterLink(Protocol):
    """What a replica asks of the rest of the cluster."""

    replica_id: str

    async def acquire(self, lease: str, key_hash: str, limit: int) -> bool: ...

    def release(self, lease: str) -> None: ...

    async def cancel_everywhere(self, request_id: str, key_hash: str | None) -> bool: ...

    async def metrics_everywhere(self) -> list[tuple[str, Families]]: ...

    async def lock(self, name: str, timeout: float) -> str | None: ...

    def unlock(self, name: str, lock_id: str) -> None: ...


def key_hash(key: str) -> str:
    # security: only the key's hash leaves the replica (to the ledger, to other replicas).
    return hashlib.sha256(key.encode()).hexdigest()


def cancel_here(scheduler, request_id: str, owner_hash: str | None) -> bool:
    """Cancel a request this replica runs, when `owner_hash` (None: the server has no keys) is its key's hash."""
    exists, owner = scheduler.owner(request_id)
    # security: only the key that sent a request may cancel it, as on one server.
    if not exists or (owner_hash is not None and not hmac.compare_digest(key_hash(owner or ""), owner_hash)):
        return False
    return scheduler.cancel(request_id, "client")


def families_of(registry: CollectorRegistry) -> Families:
    """A registry's series as plain data, to travel between replicas."""
    return [(m.name, m.documentation, m.type, [(s.name, dict(s.labels), s.value) for s in m.samples])
            for m in registry.collect()]


def render_merged(replicas: list[tuple[str, Families]]) -> bytes:
    """One Prometheus page of several replicas' series, each sample labelled with its replica."""
    merged: dict[str, Metric] = {}
    for replica, families in replicas:
        for name, documentation, kind, samples in families:
            metric = merged.setdefault(name, Metric(name, documentation, kind))
            for sample, labels, value in samples:
                metric.add_sample(sample, {**labels, "replica": replica}, value)
    count = Metric("rugpt_cluster_replicas", "replicas that answered this scrape", "gauge")
    count.add_sample("rugpt_cluster_replicas", {}, float(len(replicas)))
    merged[count.name] = count

    class _Snapshot:
        def collect(self):
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry)


class ClusterMiddleware:
    """Pure ASGI around a replica's app (see the module docstring)."""

    def __init__(self, app: ASGIApp, link: ClusterLink, settings: ServerSettings):
        self.app, self.link, self.settings = app, link, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replica = self.link.replica_id.encode()

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (REPLICA_HEADER, replica)])
            await send(message)

        path, method = scope["path"], scope["method"]
        try:
            if method == "POST" and path in GENERATION_ROUTES:
                await self._generation(scope, receive, tagged)
            elif method == "DELETE" and path.startswith(CANCEL_PREFIX):
                await self._cancel(scope, receive, tagged, path[len(CANCEL_PREFIX):])
            elif method == "GET" and path == "/metrics":
                await self._metrics(scope, receive, tagged)
            elif method != "GET" and path.startswith(ADVENTURE_PREFIX) and _header(scope, ADVENTURE_TOKEN):
                await self._adventure(scope, receive, tagged)
            else:
                await self.app(scope, receive, tagged)
        except APIError as exc:
            await exc.response()(scope, receive, tagged)

    async def _generation(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit, key = self.settings.max_inflight_per_key, self._matched_key(scope)
        if not limit or key is None:
            await self.app(scope, receive, send)
            return
        lease = f"{self.link.replica_id}-{time.monotonic_ns()}-{id(scope)}"
        try:
            granted = await self.link.acquire(lease, key_hash(key), limit)
        except Exception as exc:  # never serve past a limit unchecked: the ledger is back within seconds
            raise APIError(503, f"the cluster cannot count this key's requests right now ({type(exc).__name__}); "
                                f"retry", type="server_error", code="cluster_unavailable") from None
        if not granted:
            self._state(scope).metrics.rejections.labels("per_key_limit").inc()
            raise too_many(f"this API key already has {limit} requests running or waiting on this cluster's "
                           f"replicas (the per-key limit); wait for one to finish", None, "per_key_limit")
        try:
            await self.app(scope, receive, send)
        finally:  # the answer ended, streamed or not, finished, failed or cut off
            self.link.release(lease)

    async def _cancel(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        exists, _ = self._state(scope).scheduler.owner(request_id)
        if exists:  # ours: the route answers as on one server
            await self.app(scope, receive, send)
            return
        key = require_key(Request(scope))  # 401 as the route would answer it
        if not await self.link.cancel_everywhere(request_id, None if key is None else key_hash(key)):
            raise APIError(404, f"no waiting or running request with id {request_id!r}", type="not_found_error",
                           code="request_not_found")
        body = {"id": request_id, "object": "request", "status": "cancelled"}
        await JSONResponse(body)(scope, receive, send)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        require_key(Request(scope))  # security: behind the API key, as on one server (401 otherwise)
        page = render_merged(await self.link.metrics_everywhere())
        await Response(page, media_type=CONTENT_TYPE_LATEST)(scope, receive, send)

    async def _adventure(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = "adventure:" + hashlib.sha256(_header(scope, ADVENTURE_TOKEN)).hexdigest()
        lock_id = await self.link.lock(name, self.settings.request_timeout)
        if lock_id is None:
            raise APIError(503, "another change to this adventure is still running; retry", type="server_error",
                           code="adventure_busy")
        try:
            await self.app(scope, receive, send)
        finally:
            self.link.unlock(name, lock_id)

    def _matched_key(self, scope: Scope) -> str | None:
        """The caller's API key when it is one of the server's (else the route answers 401); None without keys."""
        scheme, _, token = _header(scope, b"authorization").decode("latin-1").partition(" ")
        token = token.strip()
        matched = False
        for key in self.settings.api_keys:  # security: constant time, every key, as routes.require_key does
            matched |= hmac.compare_digest(token.encode(), key.encode())
        return token if scheme.lower() == "bearer" and matched else None

    @staticmethod
    def _state(scope: Scope):
        return scope["app"].state


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return b""
