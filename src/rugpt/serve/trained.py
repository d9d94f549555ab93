"""Trained prompts the server was started with: every subfolder of --prompts-dir, chosen per request by name.

All of them are patched onto the one model at once (`rugpt.prompts.MultiPrompt`: each prompt has its own
token), so rows with different trained prompts, or none, share a batch: a row's prompt embeddings are
computed in the decode thread and passed to the engine's prefill.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rugpt.errors import UsageError
from rugpt.models import LoadedModel

log = logging.getLogger(__name__)


class TrainedPrompts:
    """Named trained prompts patched onto a loaded model; `render` formats a text, `embed` embeds its ids."""

    def __init__(self, multi, loaded: LoadedModel):
        self._multi, self._loaded = multi, loaded
        self.names: list[str] = sorted(multi.prompts)
        # The text forms of the prompt tokens: a request's own text must never smuggle one in.
        self.reserved = [token for fmt in multi.formats.values() for token in fmt.prompt_tokens]

    @classmethod
    def load(cls, folder: Path, loaded: LoadedModel) -> TrainedPrompts:
        """Load every subfolder of `folder` as a prompt named after it and patch them onto `loaded`."""
        try:
            from rugpt.prompts import MultiPrompt
        except ImportError as exc:
            raise UsageError(f"--prompts-dir needs rugpt.prompts, which cannot be imported here: {exc}") from None
        # security: prompts come only from this folder, chosen at start; a request names one, never a path.
        subfolders = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subfolders:
            raise UsageError(f"--prompts-dir {str(folder)!r} has no subfolders; save each trained prompt "
                             f"into its own subfolder (Prompt.save_pretrained)")
        multi = MultiPrompt({p.name: str(p) for p in subfolders})
        multi.patch(loaded.model, loaded.tokenizer)
        log.info("trained prompts: %s", ", ".join(p.name for p in subfolders))
        return cls(multi, loaded)

    def render(self, name: str, text: str) -> str:
        """The model input for `text` under prompt `name`."""
        if name not in self.names:
            raise UsageError(unknown_prompt_message(name, self.names))
        self.check_text(text)
        return self._multi.render(name, text)

    def check_text(self, text: str) -> None:
        if any(token in text for token in self.reserved):
            raise UsageError("the text holds a trained prompt's reserved token; remove it")

    @torch.inference_mode()
    def embed(self, ids: list[int]) -> torch.Tensor:
        """Input embeddings [len(ids), hidden] with the prompt rows in place; runs in the decode thread."""
        layer = self._loaded.model.get_input_embeddings()
        return layer(torch.tensor([ids], device=self._loaded.model.device))[0]


def unknown_prompt_message(name: str, names: list[str]) -> str:
    if not names:
        return (f"unknown trained prompt {name!r}: this server has no trained prompts "
                f"(start it with --prompts-dir FOLDER)")
    return f"unknown trained prompt {name!r}; this server has: {', '.join(names)}"
