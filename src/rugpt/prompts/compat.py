"""Reading prompts saved by ruPrompts itself: prompt.json + prompt_provider.bin (a torch-saved tensor).

The published prompts for ruGPT-3 Large (konodyuk/prompt_rugpt3large_joke, _proverb, _qa_sberquad, ...)
are in this layout. ruPrompts saved only the provider's output, so they come back as a
TensorPromptProvider, ready to use and to train further.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from rugpt.errors import DataError
from rugpt.prompts.providers import TensorPromptProvider

PROMPT_FILE = "prompt.json"
RUPROMPTS_WEIGHTS_FILE = "prompt_provider.bin"


def read_prompt_json(folder: Path) -> dict[str, Any]:
    """prompt.json of a saved prompt, checked to hold a format with a template."""
    path = folder / PROMPT_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("format"), dict) or "template" not in spec["format"]:
        raise DataError(f"{str(path)!r} is not a saved prompt: it needs a \"format\" object with a \"template\"")
    return spec


def read_ruprompts_weights(folder: Path) -> TensorPromptProvider:
    """The tensor in prompt_provider.bin as a TensorPromptProvider.

    # security: weights_only=True lets torch.load build tensors and plain containers only, never
    # arbitrary objects, so a malicious .bin cannot run code when it is read.
    """
    path = folder / RUPROMPTS_WEIGHTS_FILE
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"cannot read {str(path)!r} as a tensor file (only plain tensors are loaded, never "
                        f"pickled objects): {str(exc).splitlines()[0]}") from None
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2 or not weights.is_floating_point():
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise DataError(f"{str(path)!r} holds {shape}, not the [tokens, hidden] float tensor ruPrompts saves")
    return TensorPromptProvider.from_tensor(weights)


def is_ruprompts_folder(folder: Path) -> bool:
    return (folder / RUPROMPTS_WEIGHTS_FILE).is_file()
