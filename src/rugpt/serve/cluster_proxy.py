"""What Ray's HTTP proxy adds around the replicas, made to look like one rugpt server.

Ray Serve's proxy answers some requests itself, in plain text: 429 when every replica and its own queue
are full (its backpressure, `max_queued_requests`), 503 while no replica is up, 408 past its timeout, 500
when the replica serving a request died. This middleware, loaded into the proxy by Ray's
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH hook (set by cluster.py before Ray starts), gives those answers
OpenAI's error shape, keeping their status and Retry-After; the app's own answers are JSON and pass as
they are.

It also keeps rugpt's request ids: Ray names every request it proxies with an `x-request-id` header (a
UUID) and adds that header to the answer again. A generation request without one gets rugpt's kind of
id here, before Ray looks (so Ray's logs and rugpt's DELETE /v1/requests/{id} use the same id), and the
answer carries the header once.
"""

from __future__ import annotations

import json
import secrets

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_PREFIX = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}  # as routes.py names them
RAY_STATUS = {
    408: ("server_error", "timeout", "the request took longer than the cluster's limit"),
    429: ("rate_limit_error", "queue_full", "the server is busy: every replica and the queue in front of them are "
                                            "full; retry later"),
    500: ("server_error", "replica_failed", "the replica serving this request failed; retry"),
    503: ("server_error", "not_ready", "no replica is ready to serve; retry later"),
}


def openai_error(status: int, ray_message: str) -> bytes:
    """Ray's plain-text answer as OpenAI's error body; Ray's own words follow rugpt's, for the logs."""
    kind, code, message = RAY_STATUS.get(status, ("server_error", None, "the cluster could not serve the request"))
    detail = f"{message} (Ray Serve: {ray_message.strip()[:300]})" if ray_message.strip() else message
    return json.dumps({"error": {"message": detail, "type": kind, "param": None, "code": code}},
                      ensure_ascii=False).encode()


class OpenAIShapedProxy:
    """Pure ASGI: rugpt-style request ids in, one `x-request-id` out, Ray's text errors as OpenAI errors."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        prefix = REQUEST_ID_PREFIX.get(scope["path"])
        if prefix and not any(name.lower() == b"x-request-id" for name, _ in scope["headers"]):
            scope = dict(scope, headers=[*scope["headers"], (b"x-request-id", f"{prefix}-{secrets.token_hex(12)}"
                                                             .encode())])
        rewriting: dict | None = None  # the held start message of a Ray error, while its body arrives
        body, started = b"", False

        async def reshaped(message: Message) -> None:
            nonlocal rewriting, body, started
            started = True
            if message["type"] == "http.response.start":
                headers = _one_request_id(message.get("headers", []))
                content_type = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
                if message["status"] >= 400 and content_type.startswith(b"text/plain"):
                    rewriting = dict(message, headers=headers)
                    return
                await send(dict(message, headers=headers))
                return
            if rewriting is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            payload = openai_error(rewriting["status"], body.decode("utf-8", "replace"))
            headers = [(k, v) for k, v in rewriting["headers"] if k.lower() not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            await send(dict(rewriting, headers=headers))
            await send({"type": "http.response.body", "body": payload, "more_body": False})
            rewriting = None

        failure = ""
        try:
            await self.app(scope, receive, reshaped)
        except Exception as exc:
            if started:
                raise
            failure = type(exc).__name__
        if not started:  # Ray ends a request whose replica died without an answer: OpenAI's 500, not uvicorn's text
            payload = openai_error(500, failure)
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload, "more_body": False})


def _one_request_id(headers) -> list:
    """The first `x-request-id` (the app's, or the client's echoed by Ray) and no repeats of it."""
    kept, seen = [], False
    for name, value in headers:
        if bytes(name).lower() == b"x-request-id":
            if seen:
                continue
            seen = True
        kept.append((name, value))
    return kept


def middlewares() -> list[Middleware]:
    """Ray's proxy callback: the middlewares its HTTP proxy wraps around every application."""
    return [Middleware(OpenAIShapedProxy)]
