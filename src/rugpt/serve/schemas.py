"""OpenAI's request and response shapes for completions, chat completions and models, plus rugpt's extras.

Unknown fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working; fields that
would change the answer and are not implemented (tools, logit_bias, ...) are refused with a 400 instead
of being silently dropped. Log-probs, echo and response_format follow OpenAI's shapes exactly (and, for
completions, what lm-evaluation-harness's `local-completions` model sends: token-id prompts, echo, logprobs).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import JsonValue as _JsonValue

from rugpt.generation import Preset

# Names declared by one endpoint (logprobs, echo, ...) are fields there and refused here on the other.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "tool_choice", "functions",
               "function_call", "audio", "modalities", "prediction")
MAX_STOP_STRINGS = 4
PRIORITY_RANGE = 2**31  # a priority is a 32-bit signed integer, as in vLLM


class TextFormat(BaseModel):
    type: Literal["text"] = "text"


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    name: str = Field("response", max_length=64, description="a name for the schema (a-z, A-Z, 0-9, _ and -)")
    description: str | None = None
    schema_: dict[str, _JsonValue] = Field(
        default_factory=dict, alias="schema", description="the JSON schema the output must match")
    strict: bool | None = Field(None, description="refuse schema keywords that cannot be enforced")

    model_config = ConfigDict(populate_by_name=True)


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a last chunk with token counts before [DONE]")


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model id (see /v1/models); other ids are a 404")
    max_tokens: int | None = Field(
        None, ge=0, description="most tokens to generate (default: the server's); 0 only with echo")
    temperature: float | None = Field(None, ge=0, le=2, description="sampling temperature; 0 is greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    n: int = Field(1, ge=1, description="completions per prompt; choice i samples with seed + i")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text (not included)")
    seed: int | None = Field(None, description="random seed: the same request gives the same text")
    stream: bool = Field(False, description="send tokens as server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    response_format: ResponseFormat | None = Field(
        None, discriminator="type",
        description="'json_object' or 'json_schema': the output is JSON (matching the schema), enforced while "
                    "decoding; it may be cut short when max_tokens runs out (finish_reason 'length')")
    priority: int = Field(0, ge=-PRIORITY_RANGE, lt=PRIORITY_RANGE,
                          description="lower starts first among waiting requests; equal priorities in arrival order")
    presence_penalty: float = Field(0.0, description="not implemented: only 0 is accepted; use repetition_penalty")
    frequency_penalty: float = Field(0.0, description="not implemented: only 0 is accepted; use repetition_penalty")
    # rugpt's extras
    top_k: int | None = Field(None, ge=0, description="sample from the k likeliest tokens; 0 turns it off")
    repetition_penalty: float | None = Field(None, gt=0, description="> 1 discourages repeats; 1 is off")
    no_repeat_ngram_size: int | None = Field(None, ge=0, description="forbid repeating n-grams of this size")
    preset: Preset | None = Field(None, description="starting settings: greedy, balanced or creative")
    trained_prompt: str | None = Field(
        None, description="name of a trained prompt the server was started with (--prompts-dir)")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> SamplingRequest:
        extra = self.model_extra or {}
        asked = [name for name in UNSUPPORTED if extra.get(name) not in (None, False, 0, [], {})]
        if asked:
            raise ValueError(f"{', '.join(asked)} is not supported by this server; leave it out")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings; got {stops!r}")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text to continue, a list of texts, or token ids (one list, or a list of lists)")
    echo: bool = Field(False, description="put the prompt before the completion (with its log-probs if asked)")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="report each token's log-prob and this many likeliest alternatives")


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = ""
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool = Field(False, description="report each answer token's log-prob")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="with logprobs: this many likeliest alternatives at each token")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1 for a chat completion")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ---------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions' log-probs: one entry per token (an echoed prompt's first token has null ones)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length" or (rugpt) "cancelled"


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rugpt"
    context_length: int
    trained_prompts: list[str] = Field(default_factory=list, description="names usable as `trained_prompt`")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer, in OpenAI's shape."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    engine: str
    max_batch: int
