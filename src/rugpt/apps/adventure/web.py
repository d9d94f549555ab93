"""The /play page and its JSON API, as a FastAPI router any app can include.

On `rugpt serve` it completes on the server's batching scheduler (`app.state.service`); anywhere else
it takes a `PlayBackend` (e.g. `PlayBackend.from_generator`). Each adventure is reached only with its
token, sent in the `X-Adventure-Token` header.

Files come and go as they are (a request body of raw bytes, an attachment back): Tavern cards (PNG, JSON,
.charx), KoboldAI saves, lorebooks (SillyTavern World Info, AI Dungeon story cards) and rugpt's own JSON.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from rugpt.apps.adventure import formats
from rugpt.apps.adventure.context import TokenCounter
from rugpt.apps.adventure.engine import MAX_INPUT, Game
from rugpt.apps.adventure.scenario import list_scenarios, load_scenario
from rugpt.apps.adventure.state import ActionKind, Adventure, export_adventure
from rugpt.apps.adventure.store import AdventureNotFound, AdventureStore, token_hash
from rugpt.errors import DataError, RugptError, UsageError
from rugpt.generation import GenerationSettings

PAGE = Path(__file__).parent / "static" / "play.html"
TOKEN_HEADER = "X-Adventure-Token"
AsyncCompleter = Callable[[str, GenerationSettings], Awaitable[str]]


@dataclass
class PlayBackend:
    """What the page needs of a model: its own tokenizer (for budgets), its context length, a completer,
    and, for a model of another language, the translation bridge (`translation.TranslationBridge`)."""

    count: TokenCounter
    context_length: int
    complete: AsyncCompleter
    bridge: Any = None

    @classmethod
    def from_service(cls, service: Any, bridge: Any = None) -> PlayBackend:
        """On `rugpt serve`: completions queue on the shared batching scheduler with everyone else's."""

        async def complete(prompt: str, settings: GenerationSettings) -> str:
            return (await service.complete(prompt, settings))[0].text

        return cls(TokenCounter(service.tokenizer), service.context, complete, bridge)

    @classmethod
    def from_generator(cls, generator: Any, bridge: Any = None) -> PlayBackend:
        """A local `Generator`, one completion at a time in a worker thread (no batching)."""
        lock = threading.Lock()

        def run(prompt: str, settings: GenerationSettings) -> str:
            with lock:
                return generator.generate(prompt, settings).text

        async def complete(prompt: str, settings: GenerationSettings) -> str:
            return await asyncio.to_thread(run, prompt, settings)

        return cls(TokenCounter(generator.tokenizer), generator.loaded.context_length, complete, bridge)


class NewAdventure(BaseModel):
    scenario: str = Field(..., max_length=64, description="a built-in scenario: fantasy, detective, ...")


class Action(BaseModel):
    kind: ActionKind = Field(ActionKind.do, description="do, say, story or continue")
    text: str = Field("", max_length=MAX_INPUT, description="what the player typed")


class Edit(BaseModel):
    index: int = Field(..., ge=0, description="which turn (0 is the first)")
    action: str | None = Field(None, max_length=4 * MAX_INPUT)
    output: str | None = Field(None, max_length=4 * MAX_INPUT)


class HeaderChange(BaseModel):
    title: str | None = Field(None, max_length=200)
    memory: str | None = Field(None, max_length=4000)
    authors_note: str | None = Field(None, max_length=1000)
    cards: list[dict] | None = Field(None, max_length=100)


class _PlayRoute(APIRoute):
    """Turns the library's errors into 4xx answers in OpenAI's error shape, on any app."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except AdventureNotFound as exc:
                return _error(404, str(exc), "not_found_error")
            except RugptError as exc:
                return _error(400, str(exc), "invalid_request_error")

        return handle


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def render(adventure: Adventure) -> dict:
    """What the page shows: the adventure without its redo stack, lorebooks by name and size only."""
    turns = [{"index": i, "number": i + 1, "kind": t.kind.value, "action": t.action, "output": t.output,
              "seed": t.seed} for i, t in enumerate(adventure.story)]
    header = {k: v for k, v in adventure.header().items() if k != "translations"}
    header["lorebooks"] = [{"name": b.name, "entries": len(b.cards)} for b in adventure.lorebooks]
    return {**header, "turns": turns, "can_undo": adventure.length > 0,
            "can_redo": adventure.length < len(adventure.turns)}


async def read_upload(request: Request) -> bytes:
    """The request body, refused as soon as it is larger than an import may be."""
    most = formats.MAX_FILE_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > most:
        raise DataError(f"the file has {int(declared):,} bytes; the most rugpt imports is {most:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:  # security: a body without Content-Length is cut off here too
            raise DataError(f"the file has more than {most:,} bytes; the most rugpt imports is {most:,} bytes")
        chunks.append(chunk)
    if not size:
        raise DataError("the upload is empty: send the file's bytes as the request body")
    return b"".join(chunks)


def attachment(data: bytes, fmt: formats.Format, title: str) -> Response:
    name = (title.strip() or "adventure")[:80] + formats.file_suffix(fmt)
    disposition = f"attachment; filename=\"adventure{formats.file_suffix(fmt)}\"; filename*=UTF-8''{quote(name)}"
    return Response(data, media_type=formats.media_type(fmt), headers={"Content-Disposition": disposition})


def create_play_router(store: AdventureStore, backend: PlayBackend | None = None, prefix: str = "/play",
                       dependencies: list | None = None, bridge: Any = None) -> APIRouter:
    """The page at `prefix` and its API under `prefix`/api; without `backend`, the app's `state.service`
    (and `bridge`, a `translation.TranslationBridge`, to play a model of another language)."""
    router = APIRouter(prefix=prefix, route_class=_PlayRoute, dependencies=dependencies or [], tags=["play"])
    locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def backend_of(request: Request) -> PlayBackend:
        if backend is not None:
            return backend
        state = request.app.state
        if getattr(state, "play_backend", None) is None:
            state.play_backend = PlayBackend.from_service(state.service, bridge)
        return state.play_backend

    def checked(token: str | None) -> str:
        # security: the token is the only key to an adventure; a missing or unknown one reveals nothing.
        if not token or len(token) > 128:
            raise AdventureNotFound(f"send the adventure's token in the {TOKEN_HEADER} header")
        return token

    async def load(token: str | None) -> Adventure:
        return await asyncio.to_thread(store.load, checked(token))

    async def play(request: Request, token: str | None, step: Callable[[Game, PlayBackend], Awaitable[None]]) -> dict:
        """Load the adventure, run one step under its lock (one change at a time per adventure), render it."""
        async with locks.setdefault(token_hash(checked(token)), asyncio.Lock()):
            adventure = await load(token)  # loaded under the lock: what the request before ours saved
            model = backend_of(request)
            game = Game(adventure, model.count, model.context_length, store, bridge=model.bridge)
            await step(game, model)
        return render(adventure)

    async def generate(game: Game, model: PlayBackend, kind: ActionKind | None, text: str = "") -> None:
        if kind is None:
            pending = await asyncio.to_thread(game.plan_retry)
        else:
            pending = await asyncio.to_thread(game.plan, kind, text)
        output = await model.complete(pending.prompt, pending.settings)
        await asyncio.to_thread(game.commit, pending, output)

    @router.get("", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    @router.get("/api/scenarios")
    async def scenarios() -> list[dict]:
        return [{"name": s.name, "title": s.title, "genre": s.genre, "summary": s.summary} for s in list_scenarios()]

    @router.post("/api/adventures", status_code=201)
    async def create(body: NewAdventure) -> dict:
        if not body.scenario.isidentifier():  # security: a name only, never a path to some file on the server
            raise UsageError(f"scenario={body.scenario[:64]!r} must be the name of a built-in scenario")
        adventure = Adventure.from_scenario(load_scenario(body.scenario))
        token = await asyncio.to_thread(store.create, adventure)
        return {"token": token, "adventure": render(adventure)}

    @router.post("/api/adventures/import", status_code=201)
    async def import_(request: Request, filename: str = Query("upload.json", max_length=200),
                      greeting: int = Query(0, ge=0, le=100)) -> dict:
        """A new adventure from a file sent as the body: a card (PNG, JSON, .charx), a KoboldAI save, an export."""
        name = Path(filename).name or "upload.json"
        imported = await asyncio.to_thread(formats.read_bytes, await read_upload(request), name, greeting)
        if imported.lore_only:
            raise UsageError(f"{name} is a lorebook: open a game first, then add it under «Лорбуки»")
        token = await asyncio.to_thread(store.create, imported.adventure)
        return {"token": token, "adventure": render(imported.adventure)}

    @router.get("/api/adventure")
    async def state(x_adventure_token: str | None = Header(None)) -> dict:
        return render(await load(x_adventure_token))

    @router.get("/api/adventure/export", response_model=None)
    async def export(format: formats.Format = Query(formats.Format.rugpt, description="the file's format"),
                     x_adventure_token: str | None = Header(None)) -> dict | Response:
        adventure = await load(x_adventure_token)
        await asyncio.to_thread(store.load_origin, adventure)
        if format is formats.Format.rugpt:
            return export_adventure(adventure)
        data = await asyncio.to_thread(formats.export_bytes, adventure, format)
        return attachment(data, format, adventure.title)

    @router.post("/api/adventure/lorebooks")
    async def add_lorebook(request: Request, filename: str = Query("lorebook.json", max_length=200),
                           x_adventure_token: str | None = Header(None)) -> dict:
        """A lorebook file (SillyTavern World Info, AI Dungeon story cards) joins the adventure's world info."""
        imported = await asyncio.to_thread(formats.read_bytes, await read_upload(request),
                                           Path(filename).name or "lorebook.json")

        async def step(game: Game, model: PlayBackend) -> None:
            books = formats.with_lorebooks(game.adventure, [imported])
            await asyncio.to_thread(game.update, lorebooks=books)

        return await play(request, x_adventure_token, step)

    @router.delete("/api/adventure/lorebooks/{index}")
    async def remove_lorebook(index: int, request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        async def step(game: Game, model: PlayBackend) -> None:
            books = list(game.adventure.lorebooks)
            if not 0 <= index < len(books):
                raise UsageError(f"lorebook {index} does not exist; the adventure has {len(books)}")
            del books[index]
            await asyncio.to_thread(game.update, lorebooks=books)

        return await play(request, x_adventure_token, step)

    @router.get("/api/adventure/context")
    async def context(request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        model = backend_of(request)
        game = Game(await load(x_adventure_token), model.count, model.context_length, bridge=model.bridge)
        built = await asyncio.to_thread(game.context)
        return {"text": built.text, "tokens": built.tokens, "budget": built.budget}

    @router.patch("/api/adventure")
    async def change(body: HeaderChange, request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        fields = body.model_dump(exclude_none=True)

        async def step(game: Game, model: PlayBackend) -> None:
            await asyncio.to_thread(game.update, **fields)

        return await play(request, x_adventure_token, step)

    @router.delete("/api/adventure", status_code=204)
    async def delete(x_adventure_token: str | None = Header(None)) -> Response:
        adventure = await load(x_adventure_token)
        await asyncio.to_thread(store.delete, adventure)
        return Response(status_code=204)

    @router.post("/api/adventure/act")
    async def act(body: Action, request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        return await play(request, x_adventure_token, lambda game, model: generate(game, model, body.kind, body.text))

    @router.post("/api/adventure/retry")
    async def retry(request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        return await play(request, x_adventure_token, lambda game, model: generate(game, model, None))

    @router.post("/api/adventure/undo")
    async def undo(request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        return await play(request, x_adventure_token, _sync(Game.undo))

    @router.post("/api/adventure/redo")
    async def redo(request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        return await play(request, x_adventure_token, _sync(Game.redo))

    @router.post("/api/adventure/edit")
    async def edit(body: Edit, request: Request, x_adventure_token: str | None = Header(None)) -> dict:
        change = _sync(lambda game: game.edit(body.index, action=body.action, output=body.output))
        return await play(request, x_adventure_token, change)

    return router


def _sync(method: Callable[[Game], object]) -> Callable[[Game, PlayBackend], Awaitable[None]]:
    """A step that needs no model, run off the event loop (it writes to SQLite)."""

    async def step(game: Game, model: PlayBackend) -> None:
        await asyncio.to_thread(method, game)

    return step
