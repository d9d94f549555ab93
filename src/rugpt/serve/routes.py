"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, and cancelling by id."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rugpt.sampling import TokenLogprobs
from rugpt.serve.errors import GENERATION_ERRORS, APIError, bad_request, documented
from rugpt.serve.jobs import Finished, Piece, Started
from rugpt.serve.logprobs import Offsets, chat_logprobs, completion_logprobs
from rugpt.serve.scheduler import Ticket
from rugpt.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from rugpt.serve.service import GenerationService, QueueUpdate

# security: a client-chosen request id is short and plain, so it cannot inject into headers or logs.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")
STARTED_AT = int(time.time())
STREAMED = {200: {"description": "the completion, or with `stream: true` server-sent events of its chunks",
                  # Described per event, as SSE-aware clients and fuzzers read a stream: `data` holds one JSON
                  # chunk, the last one `[DONE]`.
                  "content": {"text/event-stream": {"schema": {
                      "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                                       "id": {"type": "string"}, "retry": {"type": "integer"}}}}}}}


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


@router.get("/v1/models", response_model=ModelList, responses=documented(401))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(service_of(request))])


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=documented(401, 404))
async def get_model(model_id: str, request: Request) -> ModelCard:
    service = service_of(request)
    service.check_model(model_id)
    return _model_card(service)


@router.post("/v1/completions", response_model=Completion, responses=documented(*GENERATION_ERRORS) | STREAMED)
async def completions(body: CompletionRequest, request: Request, key: str | None = Depends(require_key)):
    """Continue a prompt (or each of a list of prompts, texts or token ids), OpenAI's legacy completions API.

    `echo` puts each prompt before its completion, with its tokens' log-probs when `logprobs` is set (the first
    token's is null); `max_tokens: 0` with `echo` only scores the prompt, as lm-evaluation-harness asks."""
    service = service_of(request)
    service.check_model(body.model)
    if body.echo and body.trained_prompt is not None:
        raise bad_request("echo shows the prompt as the model reads it: leave out trained_prompt", param="echo")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens=0 generates nothing: give echo: true to score the prompt, or max_tokens >= 1",
                          param="max_tokens")
    prompts, echoes = _completion_prompts(service, body)
    return await _serve(request, body, prompts, key, chat=False, budget=body.max_tokens, echoes=echoes)


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses=documented(*GENERATION_ERRORS) | STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request, key: str | None = Depends(require_key)):
    """Answer a conversation: the messages become the model's prompt by rugpt's one chat format."""
    service = service_of(request)
    service.check_model(body.model)
    return await _serve(request, body, [service.encode(service.render_chat(body.messages), body.trained_prompt)],
                        key, chat=True, budget=body.token_budget)


@router.delete("/v1/requests/{request_id}", responses=documented(401, 404))
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


def _completion_prompts(service: GenerationService, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and the text echo shows for it."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is an empty list: give at least one prompt", param="prompt")
    if isinstance(prompt[0], str):
        return [service.encode(text, body.trained_prompt) for text in prompt], list(prompt)
    ids = [service.check_ids(list(p), body.trained_prompt) for p in prompt]
    return ids, [service.tokenizer.decode(p, skip_special_tokens=True) for p in ids]


async def _serve(request: Request, body, prompts: list[list[int]], key: str | None, chat: bool, budget: int | None,
                 echoes: list[str] | None = None):
    service = service_of(request)
    top = ((body.top_logprobs or 0) if body.logprobs else None) if chat else body.logprobs  # None: no log-probs
    echoed = None
    if echoes is not None and body.echo:
        scores = [await service.prompt_logprobs(ids, top) if top is not None else None for ids in prompts]
        echoed = [_Echo(text, ids, score) for text, ids, score in zip(echoes, prompts, scores, strict=True)]
    if budget == 0:  # echo only: nothing to decode
        if body.n > service.settings.max_n:
            raise bad_request(f"n={body.n} is more than this server allows ({service.settings.max_n})", param="n")
        request_id = _request_id(request, "cmpl")
        shape = _Shape(request_id, service, chat, prompts, body.n, top, echoed)
        finished = [Finished(r, "", (), "length") for r in range(len(prompts) * body.n)]
        if body.stream:
            return StreamingResponse(_echo_only_sse(shape, finished, body.include_usage),
                                     media_type="text/event-stream",
                                     headers={"x-request-id": request_id, "Cache-Control": "no-cache"})
        return JSONResponse(shape.full(finished), headers={"x-request-id": request_id})
    settings = service.settings_from(body, budget, service.chat_format.stop if chat else ())
    grammar = await service.grammar(body.response_format)
    decode = service.build(prompts, settings, body.trained_prompt, body.stream, budget_given=budget is not None,
                           logprobs=top, grammar=grammar)
    ticket = service.submit(decode, key, _request_id(request, "chatcmpl" if chat else "cmpl"), body.priority)
    shape = _Shape(ticket.id, service, chat, prompts, settings.num_return_sequences, top, echoed)
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
                for index in range(ticket.rows):
                    for chunk in shape.opening(index):
                        yield chunk
            elif isinstance(event, Piece):
                text = shape.clean_piece(event.index, event.text)
                if text or event.logprobs:
                    yield shape.chunk(event.index, text or None, logprobs=event.logprobs)
            elif isinstance(event, Finished):
                finished.append(event)
                yield shape.chunk(event.index, finish_reason=event.reason, logprobs=event.logprobs)
        if include_usage:
            yield shape.usage_chunk(finished)
        yield "data: [DONE]\n\n"
    except APIError as exc:  # the 200 status is already sent: the error travels as an event, as OpenAI's does
        yield f"data: {json.dumps(exc.body(), ensure_ascii=False)}\n\n"
    finally:
        if len(finished) < ticket.rows:
            ticket.cancel("disconnect")


async def _echo_only_sse(shape: _Shape, finished: list[Finished], include_usage: bool) -> AsyncIterator[str]:
    for event in finished:
        for chunk in shape.opening(event.index):
            yield chunk
        yield shape.chunk(event.index, finish_reason=event.reason)
    if include_usage:
        yield shape.usage_chunk(finished)
    yield "data: [DONE]\n\n"


@dataclass(frozen=True)
class _Echo:
    """A completions prompt shown before its completion: its text, its ids and their log-probs if asked."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprobs | None] | None


class _Shape:
    """Builds the response bodies of one request, as a completion or a chat completion."""

    def __init__(self, request_id: str, service: GenerationService, chat: bool, prompts: list[list[int]], n: int,
                 top: int | None, echoed: list[_Echo] | None = None):
        self.id, self.model, self.chat = request_id, service.model_id, chat
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.names, self.eos = service.token_text, service.tokenizer.eos_token_id
        self.n, self.top, self.echoed = n, top, echoed
        self._began: set[int] = set()  # chat rows whose first visible text has been sent
        self._offsets: dict[int, Offsets] = {}  # completions rows' text offsets, as their chunks go out

    def usage(self, finished: list[Finished]) -> Usage:
        completion = sum(f.tokens for f in finished)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    def full(self, finished: list[Finished]) -> dict:
        if self.chat:
            choices = [ChatChoice(index=f.index, message=AssistantMessage(content=f.text.strip()),
                                  logprobs=self._chat_logprobs(f.logprobs), finish_reason=f.reason) for f in finished]
            body = ChatCompletion(id=self.id, model=self.model, choices=choices, usage=self.usage(finished))
        else:
            choices = []
            for f in finished:
                echo = self._echo(f.index)
                logprobs = self._echo_logprobs(f.index) if echo else None
                if self.top is not None:
                    logprobs = _joined(logprobs, self._completion_logprobs(f.index, f.logprobs))
                choices.append(CompletionChoice(index=f.index, text=(echo.text if echo else "") + f.text,
                                                logprobs=logprobs, finish_reason=f.reason))
            body = Completion(id=self.id, model=self.model, choices=choices, usage=self.usage(finished))
        return body.model_dump()

    def opening(self, index: int) -> Iterator[str]:
        """A streamed row's first chunks: chat's role, or completions' echoed prompt."""
        if self.chat:
            yield self.chunk(index, role=True)
        elif echo := self._echo(index):
            body = Completion(id=self.id, model=self.model, choices=[
                CompletionChoice(index=index, text=echo.text, logprobs=self._echo_logprobs(index))])
            yield f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    def clean_piece(self, index: int, text: str) -> str:
        """A chat answer starts after 'Ассистент:': drop the space the model writes first."""
        if not self.chat or index in self._began:
            return text
        text = text.lstrip()
        if text:
            self._began.add(index)
        return text

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              logprobs: Sequence[TokenLogprobs] = ()) -> str:
        if self.chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                     logprobs=self._chat_logprobs(logprobs) if logprobs else None)
            body = ChatCompletionChunk(id=self.id, model=self.model, choices=[choice])
        else:
            choice = CompletionChoice(index=index, text=text or "", finish_reason=finish_reason,
                                      logprobs=self._completion_logprobs(index, logprobs) if logprobs else None)
            body = Completion(id=self.id, model=self.model, choices=[choice])
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    def usage_chunk(self, finished: list[Finished]) -> str:
        kind = ChatCompletionChunk if self.chat else Completion
        body = kind(id=self.id, model=self.model, choices=[], usage=self.usage(finished))
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    def _echo(self, index: int) -> _Echo | None:
        return self.echoed[index // self.n] if self.echoed else None

    def _echo_logprobs(self, index: int) -> CompletionLogprobs | None:
        echo = self._echo(index)
        if echo is None or echo.logprobs is None:
            return None
        return completion_logprobs(self.names, echo.ids, echo.logprobs, self._offsets_of(index))

    def _completion_logprobs(self, index: int, entries: Sequence[TokenLogprobs]) -> CompletionLogprobs:
        return completion_logprobs(self.names, [e.token for e in entries], entries, self._offsets_of(index))

    def _offsets_of(self, index: int) -> Offsets:
        return self._offsets.setdefault(index, Offsets())

    def _chat_logprobs(self, entries: Sequence[TokenLogprobs]) -> ChatLogprobs | None:
        if self.top is None:
            return None
        # end-of-text ends the answer but is no part of it: chat shows the answer's tokens only
        return ChatLogprobs(content=chat_logprobs(self.names, [e for e in entries if e.token != self.eos]))


def _joined(first: CompletionLogprobs | None, second: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return second
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def _model_card(service: GenerationService) -> ModelCard:
    names = service.prompts.names if service.prompts else []
    return ModelCard(id=service.model_id, created=STARTED_AT, context_length=service.context, trained_prompts=names)
