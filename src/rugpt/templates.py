"""The one template rule of rugpt: classify, recommend and fine-tune templates (and ruPrompts-style prompt formats)
all read `{name}` as a field and `{{` / `}}` as literal braces — Python's format-string syntax, without
conversions or format specs. A field a template needs but a row lacks is an error naming both.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass

from rugpt.errors import UsageError

SYNTAX = "write fields as {name} and literal braces as {{ and }}"


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and `{field}` slots, in order."""

    text: str

    def __post_init__(self) -> None:
        self.parts()  # a malformed template is refused when it is made, not when it is first filled

    def parts(self) -> list[tuple[str, str | None]]:
        """(literal text, field name or None) pairs, as string.Formatter splits the template."""
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise UsageError(f"template {self.text!r} is malformed ({exc}): {SYNTAX}") from None
        out = []
        for literal, name, spec, conversion in parsed:
            if name is not None and (not name.isidentifier() or spec or conversion):
                raise UsageError(f"template {self.text!r} has the field {{{name}}}: fields are plain names; {SYNTAX}")
            out.append((literal, name))
        return out

    @property
    def fields(self) -> list[str]:
        return [name for _, name in self.parts() if name is not None]

    def require(self, needed: set[str] = frozenset(), allowed: set[str] | None = None) -> Template:
        """Check the template has every field of `needed` and no field outside `allowed` (None: any)."""
        fields = self.fields
        missing = sorted(needed - set(fields))
        if missing:
            raise UsageError(f"template {self.text!r} lacks {', '.join('{' + m + '}' for m in missing)}")
        extra = sorted(set(fields) - allowed) if allowed is not None else []
        if extra:
            allowed_text = ", ".join("{" + a + "}" for a in sorted(allowed)) or "none"
            raise UsageError(f"template {self.text!r} has unknown field(s) {', '.join('{' + e + '}' for e in extra)}; "
                             f"allowed: {allowed_text}")
        return self

    def pieces(self, values: dict) -> Iterator[tuple[str, str | None]]:
        """(text, field name or None) in order, with fields filled from `values`; a missing value raises KeyError."""
        for literal, name in self.parts():
            if literal:
                yield literal, None
            if name is not None:
                if values.get(name) is None:
                    raise KeyError(name)
                yield str(values[name]), name

    def fill(self, values: dict, where: str = "") -> str:
        """The template with its fields filled; a field missing from `values` is a UsageError naming it."""
        try:
            return "".join(text for text, _ in self.pieces(values))
        except KeyError as exc:
            known = ", ".join(sorted(values)) or "none"
            prefix = f"{where}: " if where else ""
            raise UsageError(f"{prefix}no value for {{{exc.args[0]}}} in template {self.text!r} "
                             f"(given: {known})") from None

    def split_at(self, name: str, values: dict) -> tuple[str, str]:
        """The filled text before and after the one `{name}` field (which stays unfilled)."""
        before, after, seen = [], [], False
        for literal, field in self.parts():
            (after if seen else before).append(literal)
            if field == name:
                if seen:
                    raise UsageError(f"template {self.text!r} has {{{name}}} more than once")
                seen = True
            elif field is not None:
                (after if seen else before).append(Template._value(values, field, self.text))
        if not seen:
            raise UsageError(f"template {self.text!r} lacks {{{name}}}")
        return "".join(before), "".join(after)

    @staticmethod
    def _value(values: dict, name: str, text: str) -> str:
        if values.get(name) is None:
            raise UsageError(f"no value for {{{name}}} in template {text!r} (given: {', '.join(sorted(values))})")
        return str(values[name])
