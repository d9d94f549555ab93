"""Prompts saved by ruPrompts itself: prompt.json + prompt_provider.bin (a torch-saved tensor).

The published prompts for ruGPT-3 Large (konodyuk/prompt_rugpt3large_joke, _proverb, _qa_sberquad, ...)
are in this layout. ruPrompts saved only the provider's output rows, whatever the provider (an LSTM's
too), so they come back as a TensorPromptProvider holding those rows: the same embeddings, ready to use
and to train further.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from rugpt.errors import DataError
from rugpt.prompts.prompt_provider import TensorPromptProvider

PROMPT_FILE = "prompt.json"
RUPROMPTS_WEIGHTS_FILE = "prompt_provider.bin"


def read_json(path: Path) -> Any:
    """A JSON file's content; a file that cannot be read or parsed is a DataError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None


def read_prompt_json(folder: Path) -> dict[str, Any]:
    """prompt.json of a saved prompt, checked to hold a format with a template."""
    path = folder / PROMPT_FILE
    spec = read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("format"), dict) or "template" not in spec["format"]:
        raise DataError(f"{str(path)!r} is not a saved prompt: it needs a \"format\" object with a \"template\"")
    return spec


def read_tensor_file(path: Path) -> Any:
    """What a torch-saved file holds, read through torch's weights-only loader.

    # security: weights_only=True builds tensors and plain containers only, never arbitrary objects, so a
    # malicious .bin cannot run code when it is read; rugpt never unpickles in full (see rugpt.weights.read_bin).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        named = [line for line in lines if "GLOBAL" in line or "nsupported" in line] or lines or [type(exc).__name__]
        raise DataError(f"refused {str(path)!r}: it holds objects other than tensors, and rugpt reads pickled "
                        f"weights only through torch's weights-only loader ({named[0].rstrip('.')})") from None
    except (OSError, RuntimeError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read {str(path)!r} as torch weights: {first}") from None


def read_rows(path: Path) -> torch.Tensor:
    """The [tokens, hidden] float tensor of a prompt_provider.bin."""
    rows = read_tensor_file(path)
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or not rows.is_floating_point():
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise DataError(f"{str(path)!r} holds {shape}, not the [tokens, hidden] float tensor ruPrompts saves")
    return rows


def read_ruprompts_weights(folder: Path) -> TensorPromptProvider:
    """The rows in prompt_provider.bin as a TensorPromptProvider."""
    return TensorPromptProvider.from_pretrained(read_rows(folder / RUPROMPTS_WEIGHTS_FILE))


def is_ruprompts_folder(folder: Path) -> bool:
    return (folder / RUPROMPTS_WEIGHTS_FILE).is_file()
