"""Prompt formats: where the trainable prompt tokens go among the fields of a row (ruprompts.prompt_format).

    <P>             one trainable token
    <P*N>           N trainable tokens
    <P>text</P>     one trainable token per token of `text`, each starting from that token's embedding
    {field}         the value of a field of the row ({{ and }} are literal braces)
    anything else   literal text

Every trainable token is written as the same prompt token ("<|P|>", or "<|[key]P|>" under a MultiPrompt
key); the patched embedding layer replaces the k-th one in a row with the k-th row of the provider.

As in ruPrompts, a format is usable once `initialize(tokenizer)` has run (Prompt.patch does it), or when
it was built with `compiled_template=` (a loaded prompt): before that `is_initialized` is False,
`prompt_length` and `init_tokens` are None and formatting raises UserWarning. rugpt adds: templates are
checked when built (a malformed slot names its position), a missing field names the row's fields,
`fields`, and `truncate` (cut one field so a row fits).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rugpt.errors import UsageError
from rugpt.prompts.errors import MissingFieldError, PromptUsageError

# ruPrompts' module constants, with the same values.
PROMPT_TOKEN = "<|P|>"
PROMPT_TOKEN_FOR_KEY = "<|[{key}]P|>"
PROMPT_TOKEN_SERIAL = "<|P[{serial}]|>"
PROMPT_TOKEN_SERIAL_FOR_KEY = "<|[{key}]P[{serial}]|>"
PROMPT_TOKEN_SHORT = "<P>"
PROMPT_TOKEN_REPEATED_REGEX = re.compile(r"<P\*(\d+)>")
PROMPT_LITERAL_REGEX = re.compile(r"<P>(?P<sequence>.+?)</P>")

_FIELD = re.compile(r"\{\s*([^\W\d]\w*)\s*\}")
_SLOT_HELP = "use <P>, <P*N> with N >= 1, or <P>text</P>"

__all__ = ["BasePromptFormat", "MissingFieldError", "PromptFormat", "PromptFormatSafe", "PROMPT_TOKEN",
           "PROMPT_TOKEN_FOR_KEY"]


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
        if rest.startswith(prompt_token):  # a compiled template (prompt.json) holds the token itself
            flush()
            segments.append(Slot(1))
            i += len(prompt_token)
        elif rest.startswith("<P*"):
            match = PROMPT_TOKEN_REPEATED_REGEX.match(template, i)
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


class BasePromptFormat(abc.ABC):
    """Base class for all prompt formats (ruPrompts' interface)."""

    def __call__(self, items: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                 return_ranges: bool = False, **kwargs: Any):
        """Format one row (a dict, or keyword fields) or a batch (a list of dicts).

        Returns the string, or with `return_ranges=True` the string and each field's character span as a
        slice; for a list, a list of strings (and a list of span dicts).
        """
        if items is None:
            items = kwargs
        if isinstance(items, list):
            return self.batch_format(items, return_ranges)
        return self.format(items, return_ranges)

    @abc.abstractmethod
    def format(self, item: Mapping[str, Any], return_ranges: bool = False):
        """Format one row into a string (and its field spans with `return_ranges=True`)."""

    def batch_format(self, items: list[Mapping[str, Any]], return_ranges: bool = False):
        results = []
        for index, item in enumerate(items):
            try:
                results.append(self.format(item, return_ranges=return_ranges))
            except MissingFieldError as exc:
                raise MissingFieldError(f"item {index}: {exc}") from None
        if return_ranges:
            return [r[0] for r in results], [r[1] for r in results]
        return results

    @property
    @abc.abstractmethod
    def prompt_length(self) -> int | None:
        """Count of prompt tokens."""

    @abc.abstractmethod
    def as_dict(self) -> dict[str, Any]:
        """Such a dict `d` that `type(self)(**d)` is an identical format."""

    @abc.abstractmethod
    def initialize(self, tokenizer) -> None: ...

    @abc.abstractmethod
    def add_tokens(self, tokenizer) -> list[int]: ...

    @abc.abstractmethod
    def set_key(self, key: str | None) -> None: ...

    @property
    @abc.abstractmethod
    def is_initialized(self) -> bool: ...

    @property
    @abc.abstractmethod
    def prompt_tokens(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def prompt_token_ids(self) -> list[int]: ...

    @property
    @abc.abstractmethod
    def init_tokens(self) -> dict[int, int] | None: ...


class PromptFormat(BasePromptFormat):
    """Arranges trainable prompt tokens and the fields of a row (see the module docstring for the syntax).

    >>> f = PromptFormat("<P*4>{passage}<P*4>{question}<P*4>")
    >>> f.initialize(tokenizer)      # or PromptFormat(..., tokenizer=tokenizer), or Prompt.patch
    >>> f(passage="Земля круглая.", question="Круглая ли Земля?")[:10]
    '<|P|><|P|>'
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
        self._is_initialized = compiled_template is not None
        if not any(isinstance(s, Slot | Field) for s in self._segments):
            raise UsageError(f"format {template!r} has neither trainable slots (<P>, <P*N>, <P>text</P>) nor fields "
                             f"({{name}}): there is nothing to tune and nothing to fill in")
        if tokenizer is not None:
            self.initialize(tokenizer)

    # --- what the format holds -------------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        return self._is_initialized

    @property
    def prompt_length(self) -> int | None:
        """How many trainable tokens the format holds; None until initialized."""
        if not self.is_initialized:
            return None
        return sum(s.count for s in self._segments if isinstance(s, Slot))

    @property
    def init_tokens(self) -> dict[int, int] | None:
        """Prompt position → the token id whose embedding it starts from (<P>text</P>); None until initialized."""
        if not self.is_initialized:
            return None
        return dict(self._init_tokens)

    @property
    def compiled_template(self) -> str:
        """The template with every slot written as prompt tokens: a str.format string."""
        self._require_initialized("compile")
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

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the fields, in order of first appearance (rugpt)."""
        return tuple(dict.fromkeys(s.name for s in self._segments if isinstance(s, Field)))

    @property
    def has_slots(self) -> bool:
        return any(isinstance(s, Slot) for s in self._segments)

    # --- set-up with a tokenizer ------------------------------------------------------------------------------

    def initialize(self, tokenizer) -> None:
        """Compile the template: count the tokens of each <P>text</P> with `tokenizer` and remember their ids
        as the start values of those positions. A no-op when already initialized."""
        if not self._is_initialized:
            segments, init_tokens, position = [], {}, 0
            for s in self._segments:
                if isinstance(s, Slot) and s.count is None:
                    if tokenizer is None:
                        raise UsageError(f"format {self.template!r} has <P>text</P> slots: initialize it with the "
                                         f"model's tokenizer")
                    ids = tokenizer(s.init_text, add_special_tokens=False)["input_ids"]
                    init_tokens.update({position + k: token_id for k, token_id in enumerate(ids)})
                    s = Slot(len(ids), s.init_text)
                if isinstance(s, Slot):
                    position += s.count
                segments.append(s)
            self._segments, self._init_tokens, self._is_initialized = segments, init_tokens, True
        self.set_key(self.key)

    def set_key(self, key: str | None = None) -> None:
        """Use the prompt token of `key` (MultiPrompt) or, with None, the plain one."""
        self.key = key
        self.prompt_token = PROMPT_TOKEN if key is None else PROMPT_TOKEN_FOR_KEY.format(key=key)

    def add_tokens(self, tokenizer) -> list[int]:
        """Add the prompt token to `tokenizer` (a no-op if it is there); returns [its id]."""
        tokenizer.add_tokens([self.prompt_token])
        self._prompt_token_ids = [tokenizer.convert_tokens_to_ids(self.prompt_token)]
        return self.prompt_token_ids

    # ruPrompts' compilation steps, as string functions.
    @staticmethod
    def build_repeated_tokens(template: str, **kwargs: Any) -> str:
        return PROMPT_TOKEN_REPEATED_REGEX.sub(lambda m: PROMPT_TOKEN * int(m.group(1)), template)

    @staticmethod
    def build_initialized_tokens(template: str, tokenizer, **kwargs: Any) -> tuple[str, dict[int, int]]:
        init_tokens: dict[int, int] = {}
        while match := PROMPT_LITERAL_REGEX.search(template):
            ids = tokenizer(match["sequence"], add_special_tokens=False)["input_ids"]
            before = template[: match.start()]
            offset = before.count(PROMPT_TOKEN) + before.count(PROMPT_TOKEN_SHORT)
            init_tokens.update({offset + k: token_id for k, token_id in enumerate(ids)})
            template = template.replace(match.group(), PROMPT_TOKEN * len(ids), 1)
        return template, init_tokens

    @staticmethod
    def build_regular_tokens(template: str, **kwargs: Any) -> str:
        return template.replace(PROMPT_TOKEN_SHORT, PROMPT_TOKEN)

    # --- formatting -------------------------------------------------------------------------------------------

    def format(self, item: Mapping[str, Any], return_ranges: bool = False):
        self._require_initialized("apply")
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

    def truncate(self, item: Mapping[str, Any], tokenizer, max_tokens: int, field: str,
                 reserve_tokens: int = 0) -> dict[str, Any]:
        """A copy of `item` whose `field` is cut at its end, on a token boundary, so that the formatted row
        plus `reserve_tokens` (say, the answer) fits in `max_tokens` (rugpt; for text, e.g. at inference).

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
        if not self.is_initialized:
            raise PromptUsageError("PromptFormat should be initialized before serialization: call "
                                   "format.initialize(tokenizer) or prompt.patch(model, tokenizer) first")
        return {"template": self.template, "compiled_template": self._plain_compiled()}

    def _plain_compiled(self) -> str:
        """The compiled template with the plain prompt token, whatever key is set (as saved files hold it)."""
        token, self.prompt_token = self.prompt_token, PROMPT_TOKEN
        try:
            return self.compiled_template
        finally:
            self.prompt_token = token

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

    def _require_initialized(self, what: str) -> None:
        if not self.is_initialized:
            raise PromptUsageError(f"cannot {what} the non-initialized prompt format {self.template!r}: call "
                                   f"prompt.patch(model, tokenizer) or format.initialize(tokenizer) first "
                                   f"(ruPrompts: 'Applying a non-initialized prompt')")

    def __repr__(self) -> str:
        return f"PromptFormat({self.template!r})"


class PromptFormatSafe(BasePromptFormat):
    """Declared by ruPrompts 0.1.4 but never implemented there: abstract, so building one is a TypeError there
    and here (and `Prompt.from_pretrained(..., as_safe=True)` with it); use PromptFormat."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("PromptFormatSafe is not implemented (in ruPrompts 0.1.4 neither); use PromptFormat")
