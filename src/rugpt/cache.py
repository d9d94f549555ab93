"""Where rugpt keeps files it derives and can always make again (converted models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$RUGPT_CACHE, else $XDG_CACHE_HOME/rugpt, else ~/.cache/rugpt."""
    if os.environ.get("RUGPT_CACHE"):
        return Path(os.environ["RUGPT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "rugpt"
