"""`create_app(settings)`: the FastAPI app of `rugpt serve`, built directly by tests; `run_server` starts uvicorn.

Other routers plug in with `create_app(settings, routers=[...])`; their handlers reach the shared model
and scheduler through `request.app.state.service` (a GenerationService: `complete`, `stream`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import rugpt
from rugpt.engines import create_engine
from rugpt.engines.base import DecodeEngine
from rugpt.models import LoadedModel, load
from rugpt.serve.errors import APIError, document_every_route, install_handlers
from rugpt.serve.metrics import ServerMetrics
from rugpt.serve.routes import require_key
from rugpt.serve.routes import router as openai_router
from rugpt.serve.scheduler import BatchScheduler
from rugpt.serve.schemas import Health
from rugpt.serve.service import GenerationService
from rugpt.serve.settings import ServerSettings
from rugpt.serve.trained import TrainedPrompts
from rugpt.speculative import Speculator

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
TIMED_ROUTES = ("/v1/completions", "/v1/chat/completions")


def create_app(settings: ServerSettings | None = None, *, loaded: LoadedModel | None = None,
               engine: DecodeEngine | None = None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The server's app. The model loads now (errors surface before serving); the decode thread runs while
    the app's lifespan does.

    `loaded` reuses a loaded model and `engine` a ready decode engine (its max_rows is the batch size);
    `routers` are included as they are, e.g. a game's pages, sharing `app.state.service`.
    """
    settings = settings or ServerSettings()
    loaded = loaded or load(settings.model, device=settings.device)
    prompts = TrainedPrompts.load(settings.prompts_dir, loaded) if settings.prompts_dir else None
    engine = engine or create_engine(loaded, settings.engine, max_rows=settings.max_batch)
    metrics = ServerMetrics()
    speculator = Speculator(settings.speculate, loaded, settings.engine) if settings.speculate else None
    scheduler = BatchScheduler(engine, loaded.tokenizer, metrics, max_waiting=settings.max_waiting,
                               max_queue_seconds=settings.max_queue_seconds,
                               max_inflight_per_key=settings.max_inflight_per_key,
                               prefix_cache_bytes=int(settings.prefix_cache_mb * 2**20),
                               prefill_chunk=settings.prefill_chunk,
                               prefill_chunks_per_step=settings.prefill_chunks_per_step,
                               speculator=speculator)
    service = GenerationService(settings, loaded, scheduler, prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log.info("serving %s on the %s engine, batches of up to %d", service.model_id, engine.name, engine.max_rows)
        try:
            yield
        finally:
            await scheduler.stop(settings.shutdown_grace)

    app = FastAPI(title="rugpt", version=rugpt.__version__, lifespan=lifespan,
                  description="OpenAI-compatible generation with Russian GPT models, decoded in shared batches.")
    app.state.settings, app.state.loaded, app.state.metrics = settings, loaded, metrics
    app.state.scheduler, app.state.service = scheduler, service
    install_handlers(app)
    app.include_router(openai_router)
    app.include_router(_pages_router())
    for extra in routers:
        app.include_router(extra)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)
    _document_errors(app)
    return app


def _document_errors(app: FastAPI) -> None:
    """The OpenAPI page lists every status a route really answers (serve/errors.py), and no 422."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_every_route(plain())
        return app.openapi_schema

    app.openapi = openapi


def _pages_router() -> APIRouter:
    pages = APIRouter()

    @pages.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @pages.get("/health", response_model=Health,
                responses={503: {"model": Health, "description": "starting, stopping, or the decode loop failed"}})
    async def health(request: Request) -> JSONResponse:
        """200 while the server takes requests, 503 while it starts, stops or after its decode loop failed."""
        state = request.app.state
        ready = state.scheduler.ready
        body = {"status": "ok" if ready else "unavailable", "model": state.service.model_id,
                "engine": state.scheduler.engine.name, "max_batch": state.scheduler.max_batch}
        return JSONResponse(body, status_code=200 if ready else 503)

    # security: the counters describe other clients' traffic: behind the API key when the server has keys.
    @pages.get("/metrics", include_in_schema=False, dependencies=[Depends(require_key)])
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return pages


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with 413, by Content-Length up front or while a chunked body arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServerMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # security: a body without Content-Length is cut off at the cap too
                self.metrics.rejections.labels("body_too_large").inc()
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.rejections.labels("body_too_large").inc()
        await APIError(413, self._message(), code="request_too_large").response()(scope, receive, send)

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes"


class RequestMetrics:
    """Counts answers by route and status, and times generation requests to their last byte (streams too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in TIMED_ROUTES else "other"
        began, status = time.monotonic(), 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            if route != "other":
                self.metrics.latency.labels(route).observe(time.monotonic() - began)


def run_server(settings: ServerSettings, routers: Sequence[APIRouter] = ()) -> None:
    """Serve until interrupted; running requests get `shutdown_grace` seconds to finish."""
    import uvicorn

    app = create_app(settings, routers=routers)
    # uvicorn waits for open connections at shutdown with no limit unless told one: never hang on a stream.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace)))
