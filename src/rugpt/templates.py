"""The one template rule of rugpt: classify, recommend and fine-tune templates (and ruPrompts-style prompt formats)
all read `{name}` as a field and `{{` / `}}` as literal braces — Python's format-string syntax, without
conversions or format specs. A field a template needs but a row lacks is an error naming both; in fine-tuning
data the same words, after the file and line, as a DataError. One parser (`Template.parts`) and one renderer
(`Template.pieces`), on which `fill`, `split_at` and fine-tuning's rows (rugpt.training.data) are built.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from rugpt.errors import RugptError, UsageError

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

    def pieces(self, values: dict, where: str = "", error: type[RugptError] = UsageError,
               unfilled: str | None = None) -> list[tuple[str, str | None]]:
        """(text, field name or None) in order, with fields filled from `values` (the `unfilled` one left empty).

        A field whose value is missing (or None) raises `error` naming it, the template and the values given,
        after `where` (e.g. file:line): DataError where the values come from a data file, else UsageError."""
        out = []
        for literal, name in self.parts():
            if literal:
                out.append((literal, None))
            if name is None:
                continue
            if name != unfilled and values.get(name) is None:
                given = ", ".join(sorted(key for key, value in values.items() if value is not None)) or "none"
                raise error(f"{where}: " * bool(where) + f"no value for {{{name}}} in template {self.text!r} "
                            f"(given: {given})")
            out.append(("" if name == unfilled else str(values[name]), name))
        return out

    def fill(self, values: dict, where: str = "", error: type[RugptError] = UsageError) -> str:
        """The template with its fields filled; a missing value raises as in `pieces`."""
        return "".join(text for text, _ in self.pieces(values, where, error))

    def split_at(self, name: str, values: dict) -> tuple[str, str]:
        """The filled text before and after the one `{name}` field (which stays unfilled)."""
        if self.require({name}).fields.count(name) > 1:
            raise UsageError(f"template {self.text!r} has {{{name}}} more than once")
        pieces = self.pieces(values, unfilled=name)
        at = next(i for i, (_, field) in enumerate(pieces) if field == name)
        return "".join(text for text, _ in pieces[:at]), "".join(text for text, _ in pieces[at + 1:])
