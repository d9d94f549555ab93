"""Server settings: one pydantic model whose field descriptions are both `rugpt serve --help` and the API docs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rugpt.engines import EngineChoice, describe_engines


class ServerSettings(BaseModel):
    """Everything `rugpt serve` can be told at start; requests can never change any of it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(None, description="alias, hub id or local folder of the model (default: bundled)")
    served_name: str | None = Field(
        None, description="model id clients see in /v1/models and send as `model` (default: the model's name)")
    engine: EngineChoice = Field(EngineChoice.auto, description="decode engine — " + describe_engines())
    device: str | None = Field(None, description="torch device (default: cuda if available, else cpu)")
    # security: loopback by default, so a model is never exposed to a network by accident.
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    api_keys: list[str] = Field(
        default_factory=list, repr=False,
        description="accepted API keys (Authorization: Bearer KEY); none means no authentication")
    prompts_dir: Path | None = Field(
        None, description="folder whose subfolders are trained prompts, chosen per request by folder name")
    max_batch: int = Field(16, ge=1, le=256, description="most sequences decoded together in one step")
    max_waiting: int = Field(64, ge=0, description="most requests waiting for a slot; more are answered 429")
    max_queue_seconds: float = Field(
        30.0, ge=0, description="a request that waits longer than this for a slot is answered 503 (0: no limit)")
    max_inflight_per_key: int = Field(
        0, ge=0, description="most requests of one API key running or waiting at once; more get 429 (0: no limit)")
    request_timeout: float = Field(300.0, gt=0, description="seconds a request may take in all, waiting included")
    prefix_cache_mb: float = Field(
        256.0, ge=0, description="memory for the keys and values of computed prompts, reused by prompts that "
                                 "start the same (a conversation's next turn, a shared system prompt); 0: off")
    prefill_chunk: int = Field(
        256, ge=0, description="a prompt enters in chunks of this many tokens, between decode steps of the "
                               "running rows, so they keep going while it arrives (0: whole prompts at once)")
    prefill_chunks_per_step: int = Field(
        1, ge=1, description="prompt chunks between two decode steps: more lets prompts in sooner, fewer "
                             "keeps the gaps between running rows' tokens shorter")
    speculate: str | None = Field(
        None, min_length=1,
        description="speculative decoding for every row: 'lookup' drafts from each row's prompt and text, or a "
                    "smaller model of the same tokenizer (name or path, loaded at start) drafts; each row drafts "
                    "only in rounds where its drafts are likely to pay, and gets the same text as without (greedy) "
                    "or the same distribution (sampling)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt in tokens (default: the model's context minus one)")
    max_tokens_limit: int = Field(1024, ge=1, description="largest `max_tokens` a request may ask for")
    default_max_tokens: int = Field(128, ge=1, description="`max_tokens` of a request that does not say")
    max_n: int = Field(4, ge=1, description="largest `n` (completions per prompt) a request may ask for")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body in bytes; more is 413")
    play_db: Path | None = Field(
        None, description="SQLite file of the /play text adventures (default: ~/.local/share/rugpt/adventures"
                          ".sqlite3); replicas on one machine share it, several machines need a shared store")
    shutdown_grace: float = Field(
        10.0, ge=0, description="seconds running requests may finish at shutdown before they are failed")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn's log level")

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: list[str]) -> list[str]:
        keys = [k.strip() for k in keys]
        if any(not k for k in keys):
            raise ValueError("an API key must not be empty")
        return keys

    @field_validator("prompts_dir")
    @classmethod
    def _prompts_dir_exists(cls, folder: Path | None) -> Path | None:
        if folder is not None and not folder.expanduser().is_dir():
            raise ValueError(f"prompts_dir {str(folder)!r} is not a folder")
        return folder.expanduser() if folder is not None else None
