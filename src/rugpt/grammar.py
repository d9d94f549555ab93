"""Output held to a grammar: JSON that parses and matches a schema, enforced token by token with llguidance.

Why llguidance (issue 15): of the grammar libraries made for this (llguidance, xgrammar, outlines-core) it
had the lowest measured per-token overhead in a batch, needs no precompiled vocabulary index (a mask is
computed from the tokenizer's token trie as the row goes), and reads an HF fast tokenizer directly.

A `JsonGrammar` is compiled once per request: the schema is checked there, so a bad one is the caller's
error with llguidance's reason (`UsageError`, a 400 on the server). Each row then gets its own
`GrammarMatcher`, a cheap copy, which gives the tokens allowed next (`allowed`, fed to the row's sampler)
and follows the picked token (`accept`); `done` says the JSON is complete and nothing may follow. Rows with
and without a grammar share a batch: only rows with a matcher pay for a mask.

JSON is generated compact (no whitespace between tokens of the JSON): a small model given the freedom of
whitespace can fill its budget with it, and compact JSON parses the same.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from rugpt.errors import UsageError

# Each matcher's mask comes as int32 words of 32 bits; this unpacks them into one bool per token.
_BIT = torch.arange(32, dtype=torch.int32)
_COMPACT = {"whitespace_flexible": False}
_lock = threading.Lock()
_ll_tokenizers: dict[int, tuple[Any, Any]] = {}  # id(HF tokenizer) → (it, its LLTokenizer); building takes ~1 s


class GrammarError(UsageError):
    """A schema llguidance cannot enforce, or a row whose grammar could go no further."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise UsageError("JSON output (response_format) needs llguidance: pip install 'rugpt[serve]'") from None
    return llguidance


def ll_tokenizer(tokenizer):
    """llguidance's view of a Hugging Face fast tokenizer, built once per tokenizer."""
    llguidance = _llguidance()
    with _lock:
        cached = _ll_tokenizers.get(id(tokenizer))
        if cached is None or cached[0] is not tokenizer:
            try:
                cached = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
            except ValueError as exc:  # a slow (Python) tokenizer
                raise UsageError(f"JSON output needs a fast tokenizer: {exc}") from None
            _ll_tokenizers[id(tokenizer)] = cached
        return cached[1]


class JsonGrammar:
    """JSON matching `schema` (None: any JSON object), compiled for `tokenizer`; `matcher()` for each row.

    `strict=False` lets llguidance skip schema keywords it does not implement (as a best effort, like OpenAI's
    non-strict mode); `strict=True` refuses such a schema instead, so what comes out always validates.
    """

    def __init__(self, tokenizer, schema: dict | None = None, strict: bool = False):
        llguidance = _llguidance()
        self.schema = schema if schema is not None else {"type": "object"}
        self._tokenizer = ll_tokenizer(tokenizer)
        self.vocab_size = self._tokenizer.vocab_size
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                self.schema, defaults=_COMPACT | {"lenient": not strict})
        except ValueError as exc:
            raise GrammarError(f"the JSON schema cannot be read: {exc}") from None
        self._prototype = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if self._prototype.is_error():
            raise GrammarError(f"the JSON schema cannot be enforced: {self._prototype.get_error()}")

    @classmethod
    def from_response_format(cls, tokenizer, kind: str, schema: dict | None = None, strict: bool | None = None
                             ) -> JsonGrammar:
        """OpenAI's response_format: 'json_object' (any object) or 'json_schema' (this schema)."""
        return cls(tokenizer, None if kind == "json_object" else schema, bool(strict))

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._prototype.deep_copy(), self.vocab_size)


class GrammarMatcher:
    """One row's place in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher, self.vocab_size = matcher, vocab_size
        self._words = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens that may come next (end-of-text once the JSON is complete)."""
        self._check()
        words = self._words[0]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        self._check()
        return ((words[:, None] >> _BIT) & 1).bool().flatten()[: self.vocab_size]

    def accept(self, token: int) -> None:
        """Follow the picked `token`; GrammarError if the grammar cannot take it."""
        if not self._matcher.consume_token(token):
            self._check()
            raise GrammarError(f"token {token} does not fit the grammar")

    @property
    def done(self) -> bool:
        """The JSON is complete and the grammar allows nothing more."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"the JSON grammar could not go on: {self._matcher.get_error()}")
