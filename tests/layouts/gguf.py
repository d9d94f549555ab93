"""A GGUF file as the community publishes ruGPT-3.5-13B (`oblivious/ruGPT-3.5-13B-GGUF`), in miniature.

Made by rugpt's own converter from a tiny GPT-2 checkpoint folder (tests/conftest.py's
`build_tiny_model`): GGUF architecture gpt2, the tokenizer as `tokenizer.ggml.*` metadata (tokens,
merges, special ids), weights in one llama.cpp type. Needs the `gguf` package.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def build_gguf(folder: Path, source_folder: Path, quant: str = "q8_0") -> Path:
    """Convert checkpoint `source_folder` to `folder/<source name>-<quant>.gguf` and return that path."""
    from rugpt.engines.gguf_convert import convert

    folder.mkdir(parents=True, exist_ok=True)
    converted = convert(source_folder, quant, cache=folder / "convert-cache")
    target = folder / f"{Path(source_folder).name}-{quant}.gguf"
    shutil.move(converted, target)
    shutil.rmtree(folder / "convert-cache")
    return target
