"""The errors of rugpt.prompts, each also the exception type ruPrompts raised in the same place.

ruPrompts raised `UserWarning` for a step out of order (attach before initialize, save before
initialize), typeguard's `TypeError` for an argument of the wrong type, and `KeyError` for an unknown
prompt key. Code written for it catches those types; rugpt's CLI and server catch `RugptError`. Each
class below is both, so the same raise serves both kinds of caller.
"""

from __future__ import annotations

from rugpt.errors import RugptError, UsageError


class PromptUsageError(UsageError, UserWarning):
    """A prompt used out of order or in a way that cannot work, where ruPrompts raised UserWarning."""


class PromptTypeError(UsageError, TypeError):
    """An argument of the wrong type or outside its fixed choices, where ruPrompts' typeguard raised TypeError."""


class PromptKeyError(UsageError, KeyError):
    """MultiPrompt has no prompt under this key (ruPrompts: KeyError)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class MissingFieldError(RugptError, KeyError):
    """A row lacks a field the format needs; the message names the field and what the row has."""

    def __str__(self) -> str:
        return str(self.args[0])
