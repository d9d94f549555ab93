"""The generation service behind the routes: limits, prompt encoding, settings, and following a request.

It is also the API other routers use (`app.state.service`): `await service.complete(text, settings)` and
`async for piece in service.stream(text, settings)` decode on the shared batching scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from rugpt.chat_format import ChatFormat
from rugpt.errors import UsageError
from rugpt.generation import Completion, GenerationSettings
from rugpt.grammar import JsonGrammar
from rugpt.models import LoadedModel
from rugpt.sampling import TokenLogprobs
from rugpt.scoring import Scorer
from rugpt.serve.errors import APIError, api_error, bad_request, too_many
from rugpt.serve.jobs import DecodeRequest, Event, Failed, Finished, Piece, RowSpec, Started
from rugpt.serve.logprobs import TokenText
from rugpt.serve.scheduler import BatchScheduler, Refused, Ticket
from rugpt.serve.schemas import ChatMessage, JsonSchemaFormat, ResponseFormat, SamplingRequest, TextFormat
from rugpt.serve.settings import ServerSettings
from rugpt.serve.trained import TrainedPrompts, unknown_prompt_message

# security: a text this many characters per allowed token is refused before the tokenizer ever sees it.
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class QueueUpdate:
    """While a request waits: its place in the queue and the expected wait (None until the server has timings)."""

    position: int
    expected_wait: float | None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class GenerationService:
    """The loaded model, its trained prompts and the scheduler, with the server's limits applied."""

    def __init__(self, settings: ServerSettings, loaded: LoadedModel, scheduler: BatchScheduler,
                 prompts: TrainedPrompts | None = None):
        self.settings, self.loaded, self.scheduler, self.prompts = settings, loaded, scheduler, prompts
        self.tokenizer = loaded.tokenizer
        self.context = loaded.context_length
        self.max_prompt_tokens = min(settings.max_prompt_tokens or self.context - 1, self.context - 1)
        self.model_id = settings.served_name or Path(loaded.name).name
        self.chat_format = ChatFormat.resolve(self.tokenizer)  # the same prompt `rugpt chat` builds
        self.token_text = TokenText(self.tokenizer)
        self._scorer: Scorer | None = None
        self._scoring: asyncio.Semaphore | None = None  # one prompt-scoring forward at a time
        self._scoring_waiting = 0

    def render_chat(self, messages: list[ChatMessage]) -> str:
        """A conversation as the model's prompt (rugpt.chat_format; OpenAI's 'developer' role is a system one)."""
        return self.chat_format.render(self.tokenizer, [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages])

    # --- building a decode request ------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.model_id!r} "
                                f"(see GET /v1/models)", code="model_not_found", param="model")

    def encode(self, text: str, trained_prompt: str | None = None) -> list[int]:
        """Token ids of one prompt (under a trained prompt when named); an empty text starts from end-of-text."""
        if len(text) > self.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
            raise self._too_long(f"{len(text)} characters")
        if not _is_unicode(text):  # JSON can carry lone surrogates ("\ud800"); the tokenizer cannot take them
            raise bad_request("the prompt holds a lone surrogate (\\ud800-\\udfff), which is not a character; "
                              "send valid Unicode", param="prompt")
        if trained_prompt is not None:
            if self.prompts is None:
                raise bad_request(unknown_prompt_message(trained_prompt, []), param="trained_prompt")
            text = self.prompts.render(trained_prompt, text)
        elif self.prompts is not None:
            self.prompts.check_text(text)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
        if trained_prompt is None and max(ids) >= self.scheduler.engine.vocab_size:
            raise bad_request("the prompt holds a reserved token; remove it", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise self._too_long(f"{len(ids)} tokens")
        return ids

    def check_ids(self, ids: list[int], trained_prompt: str | None = None) -> list[int]:
        """A prompt given as token ids (what lm-evaluation-harness sends), checked against the vocabulary."""
        if trained_prompt is not None:
            raise bad_request("a trained_prompt takes text prompts, not token ids", param="trained_prompt")
        vocab = self.scheduler.engine.sampleable_vocab
        if not ids:
            raise bad_request("a prompt of token ids is empty: give at least one id", param="prompt")
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise bad_request(f"token id {bad[0]} is outside this model's vocabulary [0, {vocab})", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise self._too_long(f"{len(ids)} tokens")
        return ids

    async def grammar(self, response_format: ResponseFormat | None) -> JsonGrammar | None:
        """The grammar of OpenAI's response_format (None for plain text); a schema that cannot be enforced is a 400
        naming llguidance's reason. Compiling can take a while for a big schema: off the event loop."""
        if response_format is None or isinstance(response_format, TextFormat):
            return None
        spec = response_format.json_schema if isinstance(response_format, JsonSchemaFormat) else None
        try:
            return await asyncio.to_thread(JsonGrammar.from_response_format, self.tokenizer, response_format.type,
                                           spec.schema_ if spec else None, spec.strict if spec else None)
        except UsageError as exc:
            param = "response_format.json_schema.schema" if spec else "response_format"
            raise bad_request(str(exc), param=param, code="invalid_response_format") from None

    async def prompt_logprobs(self, ids: list[int], top: int) -> list[TokenLogprobs | None]:
        """Each prompt token's log-prob given those before it (None for the first), for echo; one forward pass
        over the prompt with the loaded model (rugpt.scoring), one at a time, off the event loop."""
        if self._scoring_waiting >= max(1, self.settings.max_waiting):
            raise too_many(f"the server is busy: {self._scoring_waiting} prompts are already waiting to be scored; "
                           f"retry later", None, "queue_full")
        self._scoring = self._scoring or asyncio.Semaphore(1)
        self._scorer = self._scorer or Scorer(self.loaded)
        self._scoring_waiting += 1
        try:
            async with self._scoring:
                return await asyncio.to_thread(self._scorer.prompt_logprobs, ids, top)
        finally:
            self._scoring_waiting -= 1

    def settings_from(self, body: SamplingRequest, max_tokens: int | None, extra_stop: tuple[str, ...] = ()
                      ) -> GenerationSettings:
        """GenerationSettings from OpenAI's fields and rugpt's extras; temperature 0 means greedy, as in OpenAI."""
        if body.n > self.settings.max_n:
            raise bad_request(f"n={body.n} is more than this server allows ({self.settings.max_n})", param="n")
        if max_tokens is not None and max_tokens > self.settings.max_tokens_limit:
            raise bad_request(f"max_tokens={max_tokens} is more than this server allows "
                              f"({self.settings.max_tokens_limit})", param="max_tokens")
        sampling = None if body.temperature is None else body.temperature > 0
        try:
            return GenerationSettings.from_preset(
                body.preset, max_new_tokens=max_tokens or self.settings.default_max_tokens, do_sample=sampling,
                temperature=body.temperature or None, top_p=body.top_p, top_k=body.top_k,
                repetition_penalty=body.repetition_penalty, no_repeat_ngram_size=body.no_repeat_ngram_size,
                num_return_sequences=body.n, seed=body.seed, stop=body.stop_strings() + extra_stop)
        except (UsageError, ValueError) as exc:
            raise bad_request(str(exc)) from None

    def build(self, prompts: list[list[int]], settings: GenerationSettings, trained_prompt: str | None = None,
              stream: bool = False, budget_given: bool = True, *, logprobs: int | None = None,
              grammar: JsonGrammar | None = None) -> DecodeRequest:
        """A decode request of `num_return_sequences` rows per prompt; row r samples with seed + r. Its rows report
        log-probs with `logprobs` alternatives (None: none) and are held to `grammar` (None: free text)."""
        if settings.num_beams > 1:
            raise bad_request("beam search (num_beams > 1, the 'precise' preset) is not served; "
                              "use greedy, balanced or creative", param="preset")
        rows = len(prompts) * settings.num_return_sequences
        if rows > self.scheduler.max_batch:
            raise bad_request(f"{len(prompts)} prompts × n={settings.num_return_sequences} makes {rows} sequences; "
                              f"this server decodes at most {self.scheduler.max_batch} at once", param="n")
        longest = max(len(ids) for ids in prompts)
        max_new = settings.max_new_tokens
        if longest + max_new > self.context:
            if budget_given:
                raise bad_request(
                    f"This model's maximum context length is {self.context} tokens. However, you requested "
                    f"{longest + max_new} tokens ({longest} in the prompt, {max_new} in the completion). Please "
                    f"reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
            max_new = self.context - longest  # the server's default budget shrinks to what fits
        seed = settings.seed
        per_row = [ids for ids in prompts for _ in range(settings.num_return_sequences)]
        specs = [RowSpec(ids, None if seed is None else seed + r) for r, ids in enumerate(per_row)]
        embed = self.prompts.embed if trained_prompt is not None and self.prompts is not None else None
        row_settings = dataclasses.replace(settings.row_settings(), max_new_tokens=max_new, logprobs=logprobs,
                                           grammar=grammar)
        return DecodeRequest(specs, row_settings, stream, embed)

    def _too_long(self, size: str) -> APIError:
        return bad_request(f"the prompt has {size}; this server takes at most {self.max_prompt_tokens} tokens "
                           f"(the model's context is {self.context})", param="prompt", code="context_length_exceeded")

    # --- following a submitted request --------------------------------------------------------------------------

    def submit(self, request: DecodeRequest, key: str | None = None, request_id: str | None = None,
               priority: int = 0) -> Ticket:
        """Queue `request`, lower `priority` first; APIError (429, 409, 503) when the scheduler cannot take it."""
        try:
            return self.scheduler.submit(request, key, request_id, priority=priority)
        except Refused as exc:
            raise api_error(exc) from None

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout

    async def follow(self, ticket: Ticket, deadline: float, tick: float | None = None
                     ) -> AsyncIterator[Event | QueueUpdate]:
        """The request's events until every row has finished; a QueueUpdate every `tick` seconds while it waits.

        Raises APIError when the scheduler fails the request or the deadline passes (then it is cancelled).
        """
        finished, started = 0, False
        if tick and ticket.position_at_submit:
            yield QueueUpdate(ticket.position_at_submit, ticket.expected_wait_at_submit)
        while finished < ticket.rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ticket.cancel("timeout")
                self.scheduler.metrics.rejections.labels("timeout").inc()
                raise APIError(504, f"the request took longer than this server's limit of "
                                    f"{self.settings.request_timeout:g} s", type="server_error", code="timeout")
            event = await ticket.next_event(min(remaining, tick) if tick and not started else remaining)
            if event is None:
                if tick and not started:
                    yield QueueUpdate(*ticket.queue_position())
                continue
            if isinstance(event, Failed):
                raise api_error(event.error)
            started = started or isinstance(event, Started)
            finished += isinstance(event, Finished)
            yield event

    async def collect(self, ticket: Ticket, deadline: float) -> list[Finished]:
        """Every row's Finished event, in row order."""
        done: dict[int, Finished] = {}
        async for event in self.follow(ticket, deadline):
            if isinstance(event, Finished):
                done[event.index] = event
        return [done[i] for i in range(ticket.rows)]

    # --- the API for other routers ------------------------------------------------------------------------------

    async def complete(self, prompt: str, settings: GenerationSettings | None = None, *, key: str | None = None,
                       trained_prompt: str | None = None) -> list[Completion]:
        """Continue `prompt` on the shared scheduler; one Completion per `num_return_sequences`.

        Raises APIError (429 when the queue is full, 503, 504, 400) like the OpenAI routes."""
        settings = settings or GenerationSettings()
        request = self.build([self.encode(prompt, trained_prompt)], settings, trained_prompt)
        ticket = self.submit(request, key)
        finished = await self.collect(ticket, self.deadline())
        return [Completion(f.text, list(f.token_ids), f.reason) for f in finished]

    async def stream(self, prompt: str, settings: GenerationSettings | None = None, *, key: str | None = None,
                     trained_prompt: str | None = None) -> AsyncIterator[str]:
        """Text pieces of one continuation as they are decoded; leaving the loop early cancels the request."""
        settings = settings or GenerationSettings()
        request = self.build([self.encode(prompt, trained_prompt)], settings, trained_prompt, stream=True)
        ticket = self.submit(request, key)
        try:
            async for event in self.follow(ticket, self.deadline()):
                if isinstance(event, Piece):
                    yield event.text
        finally:
            ticket.cancel("disconnect")
