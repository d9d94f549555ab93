"""PromptFormat: where the trainable prompt tokens go among the fields of a data row (the ruPrompts syntax).

    <P>             one trainable token
    <P*N>           N trainable tokens
    <P>text</P>     one trainable token per token of `text`, each starting from that token's embedding
    {field}         the value of a field of the row ({{ and }} are literal braces)
    anything else   literal text

Every trainable token is written as the same prompt token ("<|P|>", as in ruPrompts); the patched
embedding layer replaces the k-th one in a row with the k-th row of the provider's matrix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rugpt.errors import RugptError, UsageError

PROMPT_TOKEN = "<|P|>"
PROMPT_TOKEN_FOR_KEY = "<|[{key}]P|>"  # MultiPrompt gives every prompt its own token, as ruPrompts does

_REPEATED = re.compile(r"<P\*(\d+)>")
_FIELD = re.compile(r"\{\s*([^\W\d]\w*)\s*\}")
_SLOT_HELP = "use <P>, <P*N> with N >= 1, or <P>text</P>"


class MissingFieldError(RugptError, KeyError):
    """A row lacks a field the format needs; the message names the field and what the row has."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Slot:
    """`count` trainable tokens; for <P>text</P>, `init_text` and a count known once a tokenizer has split it."""

    count: int | None
    init_text: str | None = None


Segment = Text | Field | Slot


def parse_template(template: str, prompt_token: str = PROMPT_TOKEN) -> list[Segment]:
    """Split a template into literal text, fields and slots; a malformed slot or field is a UsageError
    (a ValueError) naming its position."""
    segments: list[Segment] = []
    literal: list[str] = []
    i = 0

    def flush() -> None:
        if literal:
            segments.append(Text("".join(literal)))
            literal.clear()

    while i < len(template):
        rest = template[i:]
        if rest.startswith(prompt_token):  # a compiled template (ruPrompts' prompt.json) holds the token itself
            flush()
            segments.append(Slot(1))
            i += len(prompt_token)
        elif rest.startswith("<P*"):
            match = _REPEATED.match(template, i)
            if not match or int(match.group(1)) < 1:
                raise UsageError(f"malformed slot at position {i} of {template!r}: {_snippet(template, i)!r}; "
                                 f"{_SLOT_HELP}")
            flush()
            segments.append(Slot(int(match.group(1))))
            i = match.end()
        elif rest.startswith("<P>"):
            flush()
            slot, i = _parse_p(template, i)
            segments.append(slot)
        elif rest.startswith("</P>"):
            raise UsageError(f"'</P>' at position {i} of {template!r} closes no '<P>'; {_SLOT_HELP}")
        elif rest.startswith(("{{", "}}")):
            literal.append(rest[0])
            i += 2
        elif rest[0] == "{":
            match = _FIELD.match(template, i)
            if not match:
                raise UsageError(f"malformed field at position {i} of {template!r}: {_snippet(template, i)!r}; "
                                 f"write {{name}} with a name of letters, digits and _, or {{{{ for a literal brace")
            flush()
            segments.append(Field(match.group(1)))
            i = match.end()
        elif rest[0] == "}":
            raise UsageError(f"'}}' at position {i} of {template!r} closes no field; write }}}} for a literal brace")
        else:
            literal.append(rest[0])
            i += 1
    flush()
    return segments


def _parse_p(template: str, i: int) -> tuple[Slot, int]:
    """At '<P>': a single slot, or <P>text</P> when '</P>' comes before any other slot or field."""
    start = i + len("<P>")
    close = template.find("</P>", start)
    others = (template.find(marker, start) for marker in ("<P", "{", PROMPT_TOKEN))
    nearest_other = min((p for p in others if p != -1), default=len(template))
    if close == -1 or close > nearest_other:
        return Slot(1), start
    text = template[start:close]
    if not text.strip():
        raise UsageError(f"empty '<P></P>' at position {i} of {template!r}: put the text to start from inside, "
                         f"or write <P*N>")
    return Slot(None, text), close + len("</P>")


def _snippet(template: str, i: int) -> str:
    end = template.find(">", i)
    return template[i : end + 1] if end != -1 and end - i < 20 else template[i : i + 12]


class PromptFormat:
    """Arranges trainable prompt tokens and the fields of a row (see the module docstring for the syntax).

    >>> f = PromptFormat("<P*4>{passage}<P*4>{question}<P*4>")
    >>> f(passage="Земля круглая.", question="Круглая ли Земля?")[:10]
    '<|P|><|P|>'

    `<P>text</P>` needs a tokenizer to know how many tokens it makes: pass `tokenizer=` or call
    `initialize(tokenizer)` (Prompt.patch does it) before formatting.
    """

    def __init__(self, template: str, compiled_template: str | None = None, tokenizer=None):
        if not isinstance(template, str) or not template:
            raise UsageError(f"template={template!r} must be a non-empty string such as '<P*8>{{text}}<P*4>'")
        self.template = template
        self.prompt_token = PROMPT_TOKEN
        self.key: str | None = None
        self._prompt_token_ids: list[int] = []
        self._init_tokens: dict[int, int] = {}
        self._segments = parse_template(compiled_template or template)
        if not any(isinstance(s, Slot | Field) for s in self._segments):
            raise UsageError(f"format {template!r} has neither trainable slots (<P>, <P*N>, <P>text</P>) nor fields "
                             f"({{name}}): there is nothing to tune and nothing to fill in")
        if tokenizer is not None:
            self.initialize(tokenizer)

    # --- what the format holds -------------------------------------------------------------------------------

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the fields, in order of first appearance."""
        return tuple(dict.fromkeys(s.name for s in self._segments if isinstance(s, Field)))

    @property
    def has_slots(self) -> bool:
        return any(isinstance(s, Slot) for s in self._segments)

    @property
    def is_initialized(self) -> bool:
        """True once every slot's token count is known (always, unless <P>text</P> awaits a tokenizer)."""
        return all(s.count is not None for s in self._segments if isinstance(s, Slot))

    @property
    def prompt_length(self) -> int | None:
        """How many trainable tokens the format holds; None until <P>text</P> slots have been tokenized."""
        if not self.is_initialized:
            return None
        return sum(s.count for s in self._segments if isinstance(s, Slot))

    @property
    def init_tokens(self) -> dict[int, int]:
        """Prompt position → token id whose embedding that position starts from (from <P>text</P>)."""
        return dict(self._init_tokens)

    @property
    def compiled_template(self) -> str:
        """The template with every slot written as prompt tokens: a str.format string."""
        self._require_initialized()
        parts = []
        for s in self._segments:
            if isinstance(s, Slot):
                parts.append(self.prompt_token * s.count)
            elif isinstance(s, Field):
                parts.append("{" + s.name + "}")
            else:
                parts.append(s.text.replace("{", "{{").replace("}", "}}"))
        return "".join(parts)

    @property
    def prompt_tokens(self) -> list[str]:
        return [self.prompt_token]

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self._prompt_token_ids)

    # --- set-up with a tokenizer ------------------------------------------------------------------------------

    def initialize(self, tokenizer) -> None:
        """Count the tokens of each <P>text</P> with `tokenizer` and remember their ids for initialisation."""
        if self.is_initialized:
            return
        segments, init_tokens, position = [], {}, 0
        for s in self._segments:
            if isinstance(s, Slot) and s.count is None:
                ids = tokenizer(s.init_text, add_special_tokens=False)["input_ids"]
                init_tokens.update({position + k: token_id for k, token_id in enumerate(ids)})
                s = Slot(len(ids), s.init_text)
            if isinstance(s, Slot):
                position += s.count
            segments.append(s)
        self._segments, self._init_tokens = segments, init_tokens

    def set_key(self, key: str | None) -> None:
        """Use the prompt token of `key` (MultiPrompt) or, with None, the plain one."""
        self.key = key
        self.prompt_token = PROMPT_TOKEN if key is None else PROMPT_TOKEN_FOR_KEY.format(key=key)

    def add_tokens(self, tokenizer) -> list[int]:
        """Add the prompt token to `tokenizer` (a no-op if it is there) and return its id."""
        tokenizer.add_tokens([self.prompt_token])
        self._prompt_token_ids = [tokenizer.convert_tokens_to_ids(self.prompt_token)]
        return self.prompt_token_ids

    # --- formatting -------------------------------------------------------------------------------------------

    def __call__(self, items: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                 return_ranges: bool = False, **fields: Any):
        """Format one row (keyword fields or a dict) or a batch (a list of dicts).

        With `return_ranges=True` also returns, per row, each field's character span as a slice.
        """
        if items is None:
            items = fields
        if isinstance(items, list):
            return self.batch_format(items, return_ranges)
        return self.format(items, return_ranges)

    def format(self, item: Mapping[str, Any], return_ranges: bool = False):
        self._require_initialized()
        parts: list[str] = []
        ranges: dict[str, slice] = {}
        length = 0
        for s in self._segments:
            if isinstance(s, Field):
                text = self._value(item, s.name)
                ranges.setdefault(s.name, slice(length, length + len(text)))
            else:
                text = self.prompt_token * s.count if isinstance(s, Slot) else s.text
            parts.append(text)
            length += len(text)
        formatted = "".join(parts)
        return (formatted, ranges) if return_ranges else formatted

    def batch_format(self, items: list[Mapping[str, Any]], return_ranges: bool = False):
        results = []
        for index, item in enumerate(items):
            try:
                results.append(self.format(item, return_ranges))
            except MissingFieldError as exc:
                raise MissingFieldError(f"item {index}: {exc}") from None
        if return_ranges:
            return [r[0] for r in results], [r[1] for r in results]
        return results

    def truncate(self, item: Mapping[str, Any], tokenizer, max_tokens: int, field: str,
                 reserve_tokens: int = 0) -> dict[str, Any]:
        """A copy of `item` whose `field` is cut at its end, on a token boundary, so that the formatted row
        plus `reserve_tokens` (say, the answer) fits in `max_tokens`.

        The tokenizer must know the prompt token (after `add_tokens`). Raises UsageError when even an
        empty field would not fit.
        """
        if field not in self.fields:
            raise UsageError(f"truncation field {field!r} is not in the format {self.template!r}; "
                             f"its fields are: {', '.join(self.fields) or 'none'}")
        item = dict(item)
        while True:  # re-tokenizing a cut text can merge differently, so check again; the field shrinks each round
            text, ranges = self.format(item, return_ranges=True)
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            excess = len(encoding["input_ids"]) + reserve_tokens - max_tokens
            if excess <= 0:
                return item
            span = ranges[field]
            starts = [start for start, end in encoding["offset_mapping"] if span.start <= start < span.stop]
            if len(starts) < excess:
                raise UsageError(f"the row does not fit max_tokens={max_tokens} even with {field!r} empty: "
                                 f"{len(encoding['input_ids']) - len(starts) + reserve_tokens} tokens without it")
            item[field] = text[span.start : starts[len(starts) - excess]]

    def as_dict(self) -> dict[str, str]:
        """What ruPrompts writes under "format" in prompt.json."""
        return {"template": self.template, "compiled_template": self.compiled_template}

    def _value(self, item: Mapping[str, Any], name: str) -> str:
        value = item.get(name) if isinstance(item, Mapping) else None
        if value is None:
            have = ", ".join(sorted(item)) if isinstance(item, Mapping) else type(item).__name__
            raise MissingFieldError(f"field {name!r} is missing: the format {self.template!r} needs "
                                    f"{', '.join(self.fields)}; the row has {have or 'no fields'}")
        text = str(value)
        if self.prompt_token in text or PROMPT_TOKEN in text:
            raise UsageError(f"field {name!r} contains the prompt token {self.prompt_token!r}, which only the "
                             f"format may place")
        return text

    def _require_initialized(self) -> None:
        if not self.is_initialized:
            raise UsageError(f"format {self.template!r} has <P>text</P> slots whose length depends on the tokenizer: "
                             f"call prompt.patch(model, tokenizer) or format.initialize(tokenizer) first")

    def __repr__(self) -> str:
        return f"PromptFormat({self.template!r})"
