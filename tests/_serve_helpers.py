"""Helpers for the server tests: a decode engine slowed down on purpose, an app, a client, a live uvicorn,
and a page of headless Chromium."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import torch

from rugpt.engines import create_engine


class SlowEngine:
    """A real engine whose steps take at least `step_delay` seconds and that never picks end-of-text,
    so a request runs exactly as long as a test needs; it also records how many rows each step had.

    A row whose prompt holds the id `poison` gets NaN logits from its first step on, as a broken trained
    prompt's embedding would give it: nothing can be sampled from them."""

    def __init__(self, inner, step_delay: float = 0.0, banned: int | None = None, poison: int | None = None):
        self.inner, self.step_delay, self.banned, self.poison = inner, step_delay, banned, poison
        self.step_sizes: list[int] = []
        self._poisoned: set[int] = set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, token_ids, embeds=None):
        row, logits = self.inner.prefill(token_ids, embeds)
        if self.poison is not None and self.poison in token_ids:
            self._poisoned.add(row)
        return row, self._ban(logits)

    def step(self, rows, token_ids):
        self.step_sizes.append(len(rows))
        if self.step_delay:
            time.sleep(self.step_delay)
        logits = self._ban(self.inner.step(rows, token_ids))
        with torch.inference_mode():
            for position, row in enumerate(rows):
                if row in self._poisoned:
                    logits[position] = float("nan")
        return logits

    def extend(self, row, token_ids, all_logits=False):
        return self._ban(self.inner.extend(row, token_ids, all_logits))

    def release(self, row):
        self.inner.release(row)

    def release_all(self):
        self.inner.release_all()

    def _ban(self, logits: torch.Tensor) -> torch.Tensor:
        if self.banned is not None:
            with torch.inference_mode():  # engines return inference tensors
                logits[..., self.banned] = float("-inf")
        return logits


def slow_engine(loaded, max_batch: int = 4, step_delay: float = 0.0, ban_eos: bool = True,
                poison: int | None = None) -> SlowEngine:
    inner = create_engine(loaded, "fast", max_rows=max_batch)
    return SlowEngine(inner, step_delay, loaded.tokenizer.eos_token_id if ban_eos else None, poison)


def make_app(loaded, max_batch: int = 4, step_delay: float = 0.0, ban_eos: bool = True, routers=(),
             poison: int | None = None, **settings):
    from rugpt.serve import ServerSettings, create_app

    settings.setdefault("shutdown_grace", 1.0)
    engine = slow_engine(loaded, max_batch, step_delay, ban_eos, poison)
    return create_app(ServerSettings(max_batch=max_batch, **settings), loaded=loaded, engine=engine,
                      routers=routers)


@asynccontextmanager
async def asgi_client(app, **kwargs) -> AsyncIterator[httpx.AsyncClient]:
    """A client that talks to `app` in-process, with the app's startup and shutdown run around it."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", **kwargs) as client:
            yield client


@contextmanager
def decode_thread(app) -> Iterator[None]:
    """The app's decode thread running outside any one event loop, so that each request may run in a loop
    of its own (`run(post(...))`, as hypothesis examples do); what the app's lifespan does, held open."""
    scheduler = app.state.scheduler
    scheduler.start()
    try:
        yield
    finally:
        asyncio.run(scheduler.stop(1.0))


async def post(app, path: str, body, **headers) -> httpx.Response:
    """POST `body` to the in-process app as JSON with non-ASCII escaped, so lone surrogates travel too."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}
                                 | headers)


def run(coro, timeout: float = 30.0):
    """Run a test coroutine with a hard time limit, so no test can hang."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextmanager
def live_server(app) -> Iterator[str]:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread; yields the base URL and stops it after."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not stop within 15 s"


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@contextmanager
def chromium_page(url: str, timeout_ms: int) -> Iterator:
    """A page of Debian's headless Chromium (driven by playwright, never a downloaded browser) opened at `url`."""
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                                             timeout=30_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            yield page
        finally:
            browser.close()


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus page (labels included in `name`), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
