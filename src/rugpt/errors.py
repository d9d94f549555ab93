"""One exception type per kind of user error. The CLI prints them as one line and exits with code 2."""


class RugptError(Exception):
    """Base class of every error a user can cause and fix."""


class UsageError(RugptError, ValueError):
    """A bad argument or setting: the message names it, shows the bad value and what is allowed."""


class ModelNotFound(RugptError, LookupError):
    """A model name, hub id or folder that cannot be loaded here; the message says how to get it."""


class DataError(RugptError, ValueError):
    """Input data that cannot be read or parsed: the message names the file and line or offset."""


class DiskFull(RugptError, OSError):
    """Files that do not fit on this machine's disk: the message names the sizes, the folder and what to free."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library errors can run to pages), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
