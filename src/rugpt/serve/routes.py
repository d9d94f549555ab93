"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, and cancelling by id."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rugpt.serve.errors import APIError, bad_request
from rugpt.serve.jobs import Finished, Piece, Started
from rugpt.serve.scheduler import Ticket
from rugpt.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from rugpt.serve.service import GenerationService, QueueUpdate

# security: a client-chosen request id is short and plain, so it cannot inject into headers or logs.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")
STARTED_AT = int(time.time())


def service_of(request: Request) -> GenerationService:
    return request.app.state.service


def require_key(request: Request) -> str | None:
    """The caller's API key (None when the server has none); 401 otherwise."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # security: compare with every key in constant time, so response timing reveals nothing about a key.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        request.app.state.metrics.rejections.labels("unauthorized").inc()
        raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


router = APIRouter(dependencies=[Depends(require_key)])


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(service_of(request))])


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    service = service_of(request)
    service.check_model(model_id)
    return _model_card(service)


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, key: str | None = Depends(require_key)):
    """Continue a prompt (or each of a list of prompts), OpenAI's legacy completions API."""
    service = service_of(request)
    service.check_model(body.model)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise bad_request("prompt is an empty list: give at least one prompt", param="prompt")
    return await _serve(request, body, texts, key, chat=False, budget=body.max_tokens)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, key: str | None = Depends(require_key)):
    """Answer a conversation: the messages become the model's prompt by rugpt's one chat format."""
    service = service_of(request)
    service.check_model(body.model)
    return await _serve(request, body, [service.render_chat(body.messages)], key, chat=True, budget=body.token_budget)


@router.delete("/v1/requests/{request_id}")
async def cancel_request(request_id: str, request: Request, key: str | None = Depends(require_key)) -> dict:
    """Cancel a waiting or running request by the id from its `x-request-id` header (or its response id)."""
    scheduler = service_of(request).scheduler
    exists, owner = scheduler.owner(request_id)
    # security: only the key that sent a request may cancel it; a stranger's id looks like an unknown one.
    if not exists or (key is not None and not hmac.compare_digest((owner or "").encode(), key.encode())):
        raise APIError(404, f"no waiting or running request with id {request_id!r}", type="not_found_error",
                       code="request_not_found")
    scheduler.cancel(request_id, "client")
    return {"id": request_id, "object": "request", "status": "cancelled"}


async def _serve(request: Request, body, texts: list[str], key: str | None, chat: bool, budget: int | None):
    service = service_of(request)
    settings = service.settings_from(body, budget, service.chat_format.stop if chat else ())
    prompts = [service.encode(text, body.trained_prompt) for text in texts]
    decode = service.build(prompts, settings, body.trained_prompt, body.stream, budget_given=budget is not None)
    ticket = service.submit(decode, key, _request_id(request, "chatcmpl" if chat else "cmpl"))
    shape = _Shape(ticket.id, service.model_id, chat, sum(len(ids) for ids in prompts))
    headers = _queue_headers(ticket)
    deadline = service.deadline()
    if body.stream:
        events = _sse(service, ticket, shape, deadline, body.include_usage)
        headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not hold events back
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    finished = await _unless_disconnected(request, ticket, service.collect(ticket, deadline))
    return JSONResponse(shape.full(finished), headers=headers)


def _request_id(request: Request, prefix: str) -> str:
    given = request.headers.get("x-request-id")
    if given is None:
        return f"{prefix}-{secrets.token_hex(12)}"
    if not REQUEST_ID.match(given):
        raise bad_request("X-Request-Id must be 8 to 64 characters of letters, digits, '.', '_', ':' or '-'",
                          param="X-Request-Id")
    return given


def _queue_headers(ticket: Ticket) -> dict[str, str]:
    headers = {"x-request-id": ticket.id, "x-queue-position": str(ticket.position_at_submit)}
    if ticket.expected_wait_at_submit is not None:
        headers["x-queue-expected-wait"] = f"{ticket.expected_wait_at_submit:.2f}"
    return headers


async def _unless_disconnected(request: Request, ticket: Ticket, work: Awaitable[list[Finished]]) -> list[Finished]:
    """Await `work`; if the client hangs up first, its rows leave the batch before the next step."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            ticket.cancel("disconnect")
            task.cancel()
            raise APIError(499, "the client closed the connection", code="client_closed_request")
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(service: GenerationService, ticket: Ticket, shape: _Shape, deadline: float,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: comment lines while waiting, a chunk per piece, the finish reasons, then [DONE]."""
    finished: list[Finished] = []
    try:
        async for event in service.follow(ticket, deadline, tick=1.0):
            if isinstance(event, QueueUpdate):
                wait = "unknown" if event.expected_wait is None else f"{event.expected_wait:.1f}s"
                yield f": queue position {event.position}, expected wait {wait}\n\n"
            elif isinstance(event, Started):
                yield ": started\n\n"
                if shape.chat:
                    for index in range(ticket.rows):
                        yield shape.chunk(index, role=True)
            elif isinstance(event, Piece):
                text = shape.clean_piece(event.index, event.text)
                if text:
                    yield shape.chunk(event.index, text)
            elif isinstance(event, Finished):
                finished.append(event)
                yield shape.chunk(event.index, finish_reason=event.reason)
        if include_usage:
            yield shape.usage_chunk(finished)
        yield "data: [DONE]\n\n"
    except APIError as exc:  # the 200 status is already sent: the error travels as an event, as OpenAI's does
        yield f"data: {json.dumps(exc.body(), ensure_ascii=False)}\n\n"
    finally:
        if len(finished) < ticket.rows:
            ticket.cancel("disconnect")


class _Shape:
    """Builds the response bodies of one request, as a completion or a chat completion."""

    def __init__(self, request_id: str, model: str, chat: bool, prompt_tokens: int):
        self.id, self.model, self.chat, self.prompt_tokens = request_id, model, chat, prompt_tokens
        self._began: set[int] = set()  # chat rows whose first visible text has been sent

    def usage(self, finished: list[Finished]) -> Usage:
        completion = sum(f.tokens for f in finished)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    def full(self, finished: list[Finished]) -> dict:
        if self.chat:
            choices = [ChatChoice(index=f.index, message=AssistantMessage(content=f.text.strip()),
                                  finish_reason=f.reason) for f in finished]
            body = ChatCompletion(id=self.id, model=self.model, choices=choices, usage=self.usage(finished))
        else:
            choices = [CompletionChoice(index=f.index, text=f.text, finish_reason=f.reason) for f in finished]
            body = Completion(id=self.id, model=self.model, choices=choices, usage=self.usage(finished))
        return body.model_dump()

    def clean_piece(self, index: int, text: str) -> str:
        """A chat answer starts after 'Ассистент:': drop the space the model writes first."""
        if not self.chat or index in self._began:
            return text
        text = text.lstrip()
        if text:
            self._began.add(index)
        return text

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
            body = ChatCompletionChunk(id=self.id, model=self.model, choices=[choice])
        else:
            choice = CompletionChoice(index=index, text=text or "", finish_reason=finish_reason)
            body = Completion(id=self.id, model=self.model, choices=[choice])
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    def usage_chunk(self, finished: list[Finished]) -> str:
        kind = ChatCompletionChunk if self.chat else Completion
        body = kind(id=self.id, model=self.model, choices=[], usage=self.usage(finished))
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"


def _model_card(service: GenerationService) -> ModelCard:
    names = service.prompts.names if service.prompts else []
    return ModelCard(id=service.model_id, created=STARTED_AT, context_length=service.context, trained_prompts=names)
