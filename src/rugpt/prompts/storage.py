"""Where trained prompts live: a folder with prompt.json and the provider's weights as safetensors.

prompt.json keeps ruPrompts' keys ("format", "config") and adds "provider" (type and sizes), so an
LSTM or MLP provider is rebuilt as itself. Folders saved by ruPrompts (prompt_provider.bin) load too,
through compat.py. A name that is not a local folder is fetched from the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rugpt.atomic import atomic_write_dir
from rugpt.errors import DataError, ModelNotFound, UsageError
from rugpt.prompts.compat import PROMPT_FILE, RUPROMPTS_WEIGHTS_FILE, is_ruprompts_folder, read_prompt_json
from rugpt.prompts.providers import BasePromptProvider, provider_from_dict

log = logging.getLogger(__name__)

WEIGHTS_FILE = "prompt_provider.safetensors"


@dataclass(frozen=True)
class SavedPrompt:
    """A saved prompt folder and the size of each file in it."""

    path: Path
    files: dict[str, int]

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())

    def __str__(self) -> str:
        listing = ", ".join(f"{name} {_human(size)}" for name, size in self.files.items())
        return f"{self.path} ({_human(self.size_bytes)}: {listing})"


def write_prompt_dir(folder: Path | str, spec: dict[str, Any], provider: BasePromptProvider) -> SavedPrompt:
    """Write prompt.json and the provider's weights; a crash midway never leaves a half-written folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.is_file():
        raise UsageError(f"cannot save a prompt to {str(folder)!r}: it is a file, give a folder")
    tensors = {name: t.detach().cpu().contiguous() for name, t in provider.state_dict().items()}
    with atomic_write_dir(folder) as tmp:
        (tmp / PROMPT_FILE).write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "provider": provider.kind})
    saved = SavedPrompt(folder, {name: (folder / name).stat().st_size for name in (PROMPT_FILE, WEIGHTS_FILE)})
    log.info("saved prompt to %s", saved)
    return saved


def read_prompt_dir(folder: Path) -> tuple[dict[str, Any], BasePromptProvider]:
    """prompt.json and the provider with its trained weights, from a rugpt or a ruPrompts folder."""
    from rugpt.prompts.compat import read_ruprompts_weights

    spec = read_prompt_json(folder)
    if (folder / WEIGHTS_FILE).is_file():
        return spec, _read_rugpt_weights(folder, spec)
    if is_ruprompts_folder(folder):
        return spec, read_ruprompts_weights(folder)
    raise ModelNotFound(f"prompt folder {str(folder)!r} has prompt.json but no weights: expected {WEIGHTS_FILE} "
                        f"(rugpt) or {RUPROMPTS_WEIGHTS_FILE} (ruPrompts)")


def _read_rugpt_weights(folder: Path, spec: dict[str, Any]) -> BasePromptProvider:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(spec.get("provider"), dict):
        raise DataError(f"{str(folder / PROMPT_FILE)!r} has no \"provider\" object saying which provider to build")
    provider = provider_from_dict(spec["provider"])
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise DataError(f"cannot read {str(folder / WEIGHTS_FILE)!r}: {exc}") from None
    try:
        provider.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"weights in {str(folder / WEIGHTS_FILE)!r} do not fit the provider described in "
                        f"prompt.json: {str(exc).splitlines()[0]}") from None
    return provider


def resolve_prompt_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or taken from the cache) with only prompt files."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / PROMPT_FILE).is_file():
            raise ModelNotFound(f"{str(path)!r} is not a saved prompt: it has no {PROMPT_FILE}")
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFound(f"prompt {name!r} is neither a folder here nor a hub id like "
                            f"'konodyuk/prompt_rugpt3large_joke'")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        folder = snapshot_download(repo_id, allow_patterns=[PROMPT_FILE, WEIGHTS_FILE, RUPROMPTS_WEIGHTS_FILE])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "this machine is offline (HF_HUB_OFFLINE=1)" if offline else f"the hub said: {str(exc).splitlines()[0]}"
        raise ModelNotFound(f"prompt {repo_id!r} is not a local folder and could not be fetched: {why}; download it "
                            f"on a connected machine with `hf download {repo_id}` or pass a local folder") from None
    folder = Path(folder)
    if not (folder / PROMPT_FILE).is_file():
        raise ModelNotFound(f"hub repository {repo_id!r} holds no {PROMPT_FILE}: it is not a saved prompt")
    return folder


def push_folder(folder: Path, repo_id: str, private: bool | None, token: str | None, message: str) -> str:
    """Upload a saved prompt folder to a hub model repository (created if needed); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
        raise UsageError(f"cannot push the prompt to {repo_id!r}: {str(exc).splitlines()[0]} (log in with "
                         f"`hf auth login`, and be online)") from None
    return str(url)


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KB" if size < 1024**2 else f"{size / 1024**2:.1f} MB"
