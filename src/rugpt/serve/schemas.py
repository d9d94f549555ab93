"""OpenAI's request and response shapes for completions, chat completions and models, plus rugpt's extras.

Unknown fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working; fields that
would change the answer and are not implemented (logprobs, tools, ...) are refused with a 400 instead
of being silently dropped.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rugpt.generation import Preset

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "tool_choice", "functions",
               "function_call", "response_format", "audio", "modalities", "prediction")
MAX_STOP_STRINGS = 4


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a last chunk with token counts before [DONE]")


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model id (see /v1/models); other ids are a 404")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (default: the server's)")
    temperature: float | None = Field(None, ge=0, le=2, description="sampling temperature; 0 is greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    n: int = Field(1, ge=1, description="completions per prompt; choice i samples with seed + i")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text (not included)")
    seed: int | None = Field(None, description="random seed: the same request gives the same text")
    stream: bool = Field(False, description="send tokens as server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
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
    prompt: str | list[str] = Field(..., description="text to continue, or a list of texts")


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

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ---------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
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


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
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
    logprobs: None = None
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
