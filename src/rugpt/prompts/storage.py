"""Where trained prompts live: a folder with prompt.json and the provider's weights.

save_pretrained writes what ruPrompts writes — prompt.json ("format", "config") and prompt_provider.bin
(the provider's output rows, torch-saved), so the folder also loads in ruPrompts and in plain
transformers code (docs/prompt_tuning.md) — and adds "provider" (type and sizes) to prompt.json and the
provider's own weights as prompt_provider.safetensors, so an LSTM or MLP provider comes back as itself.
Files go into the folder one by one, each written atomically, prompt.json last; other files in it (a
Trainer checkpoint's) stay. A folder holding a PEFT prompt-tuning adapter loads too (peft_adapter.py).
A name that is not a local folder is fetched from the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rugpt.atomic import atomic_write_bytes
from rugpt.errors import DataError, ModelNotFound, UsageError
from rugpt.prompts.compat import PROMPT_FILE, RUPROMPTS_WEIGHTS_FILE, is_ruprompts_folder, read_prompt_json
from rugpt.prompts.errors import PromptUsageError
from rugpt.prompts.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, is_peft_folder
from rugpt.prompts.prompt_provider import BasePromptProvider, provider_from_dict

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
    """Write the provider's rows (.bin), its own weights (.safetensors, for rugpt's providers) and prompt.json."""
    import io

    import torch
    from safetensors.torch import save

    folder = Path(folder)
    if folder.is_file():
        raise PromptUsageError(f"save_directory should be a directory, got file instead: {str(folder)!r}")
    folder.mkdir(parents=True, exist_ok=True)
    rows = io.BytesIO()
    torch.save(provider().detach().cpu().contiguous(), rows)
    written = {RUPROMPTS_WEIGHTS_FILE: rows.getvalue()}
    if getattr(provider, "kind", None) is not None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in provider.state_dict().items()}
        written[WEIGHTS_FILE] = save(tensors, metadata={"format": "pt", "provider": provider.kind})
    else:  # a provider of the user's own is saved as its rows, as ruPrompts saves every provider
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    written[PROMPT_FILE] = json.dumps(spec, ensure_ascii=False, indent=1).encode("utf-8")
    for name, data in written.items():  # prompt.json last: a folder with it has the weights it describes
        atomic_write_bytes(folder / name, data)
    saved = SavedPrompt(folder, {name: (folder / name).stat().st_size for name in written})
    log.info("saved prompt to %s", saved)
    return saved


def read_prompt_dir(folder: Path) -> tuple[dict[str, Any], BasePromptProvider]:
    """prompt.json and the provider with its trained weights, from a rugpt, ruPrompts or PEFT folder."""
    from rugpt.prompts.compat import read_ruprompts_weights
    from rugpt.prompts.peft_adapter import read_peft_dir

    has_weights = (folder / WEIGHTS_FILE).is_file() or is_ruprompts_folder(folder)
    if is_peft_folder(folder) and (not has_weights or not (folder / PROMPT_FILE).is_file()):
        return read_peft_dir(folder)
    spec = read_prompt_json(folder)
    if (folder / WEIGHTS_FILE).is_file() and isinstance(spec.get("provider"), dict):
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
        if not (path / PROMPT_FILE).is_file() and not is_peft_folder(path):
            raise ModelNotFound(f"{str(path)!r} is not a saved prompt: it has no {PROMPT_FILE} (nor a PEFT "
                                f"{ADAPTER_CONFIG})")
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
        folder = snapshot_download(repo_id, allow_patterns=[PROMPT_FILE, WEIGHTS_FILE, RUPROMPTS_WEIGHTS_FILE,
                                                            ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "this machine is offline (HF_HUB_OFFLINE=1)" if offline else f"the hub said: {str(exc).splitlines()[0]}"
        raise ModelNotFound(f"prompt {repo_id!r} is not a local folder and could not be fetched: {why}; download it "
                            f"on a connected machine with `hf download {repo_id}` or pass a local folder") from None
    folder = Path(folder)
    if not (folder / PROMPT_FILE).is_file() and not is_peft_folder(folder):
        raise ModelNotFound(f"hub repository {repo_id!r} holds no {PROMPT_FILE} (nor a PEFT {ADAPTER_CONFIG}): it "
                            f"is not a saved prompt")
    return folder


def push_folder(folder: Path, repo_id: str, private: bool | None, token: str | None, message: str,
                create_pr: bool = False) -> str:
    """Upload a saved prompt folder to a hub model repository (created if needed); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, create_pr=create_pr)
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
        raise UsageError(f"cannot push the prompt to {repo_id!r}: {str(exc).splitlines()[0]} (log in with "
                         f"`hf auth login`, and be online)") from None
    return str(url)


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KB" if size < 1024**2 else f"{size / 1024**2:.1f} MB"
