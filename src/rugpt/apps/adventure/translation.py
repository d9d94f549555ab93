"""The translation bridge, as gamio built it: an English model played in Russian through MarianMT.

The player's action is rewritten first («я открываю дверь» → «Вы открываете дверь.»), then translated into the
model's language and put into the context; the model's continuation is cut at its last sentence and translated
back. Each turn keeps both sides (`Turn.model_action`, `Turn.model_output`); the adventure's fixed texts
(memory, world, opening, world info, note) are translated once, when first needed, and kept with the adventure
(`Adventure.translations`). World-info keys are still looked for in the player's text.

Translators are Helsinki-NLP's opus-mt models (`Helsinki-NLP/opus-mt-ru-en` and `-en-ru` for `ru-en`; any Marian
pair by its languages), loaded with transformers' MarianMTModel and MarianTokenizer (which needs sentencepiece).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rugpt.apps.adventure.context import ModelView
from rugpt.apps.adventure.state import MAX_TRANSLATIONS, Turn
from rugpt.errors import ModelNotFound, UsageError

MARIAN = "Helsinki-NLP/opus-mt-{}-{}"
PAIR = re.compile(r"^([a-z]{2,3})-([a-z]{2,3})$")
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
CHUNK = 400  # characters per translated piece: Marian models read at most 512 tokens
MARIAN_FILES = ["*.json", "*.spm", "*.safetensors", "pytorch_model.bin"]  # not the TensorFlow and Rust copies


class Translator:
    """One direction of a MarianMT model: a list of texts in, their translations out (line breaks kept)."""

    def __init__(self, name: str, device: str = "cpu", num_beams: int = 4, batch_size: int = 16):
        self.name, self.device, self.num_beams, self.batch_size = name, device, num_beams, batch_size
        self.tokenizer, self.model = _load(name, device)
        self._lock = threading.Lock()  # one model, shared by the web page's worker threads

    def __call__(self, text: str) -> str:
        return self.translate([text])[0]

    def translate(self, texts: list[str]) -> list[str]:
        """Each text translated piece by piece: lines apart, long lines in runs of sentences."""
        pieces = [[_chunks(line) for line in text.split("\n")] for text in texts]
        flat = [chunk for text in pieces for line in text for chunk in line]
        done = iter(self._run(flat))
        return ["\n".join(" ".join(next(done) for _ in line) for line in text) for text in pieces]

    def _run(self, texts: list[str]) -> list[str]:
        import torch

        wanted = [i for i, t in enumerate(texts) if t.strip()]
        results = dict.fromkeys(range(len(texts)), "")
        longest = min(512, int(getattr(self.model.config, "max_position_embeddings", 512)))
        for start in range(0, len(wanted), self.batch_size):
            batch = [texts[i] for i in wanted[start: start + self.batch_size]]
            inputs = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=longest)
            limit = min(longest, 2 * inputs["input_ids"].shape[1] + 16)  # about as long as its source
            with self._lock, torch.inference_mode():
                generated = self.model.generate(**inputs.to(self.device), num_beams=self.num_beams,
                                                max_new_tokens=limit, do_sample=False)
            for i, text in zip(wanted[start: start + self.batch_size],
                               self.tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
                results[i] = text.strip()
        return [results[i] for i in range(len(texts))]


def _chunks(line: str) -> list[str]:
    """A line as runs of whole sentences of at most CHUNK characters (a longer sentence stays whole)."""
    if len(line) <= CHUNK:
        return [line]
    chunks, current = [], ""
    for sentence in SENTENCE_END.split(line):
        if current and len(current) + 1 + len(sentence) > CHUNK:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    return [*chunks, current] if current else chunks


def _load(name: str, device: str):
    folder = _folder(name)
    try:
        from transformers import MarianMTModel, MarianTokenizer

        with warnings.catch_warnings():  # "Recommended: pip install sacremoses": Marian's tokenizer never uses it here
            warnings.filterwarnings("ignore", message=".*sacremoses.*")
            tokenizer = MarianTokenizer.from_pretrained(folder)
        model = MarianMTModel.from_pretrained(folder).to(device).eval()
    except ImportError:
        raise UsageError("the translation bridge needs sentencepiece: pip install 'rugpt[apps]'") from None
    except (OSError, TypeError, ValueError) as exc:  # a folder without source.spm makes MarianTokenizer a TypeError
        raise ModelNotFound(f"translator {name!r} is not a MarianMT model (config, vocab.json, source.spm, "
                            f"target.spm and weights): {exc}") from None
    return tokenizer, model


def _folder(name: str) -> str:
    """A local folder, or the hub id's snapshot: from the cache offline, else downloaded (Marian's files only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=MARIAN_FILES, local_files_only=offline)
    except (OSError, ValueError, huggingface_hub.errors.HfHubHTTPError):  # offline, unknown id, no network
        raise ModelNotFound(f"translator {name!r} is neither a local folder nor in this machine's Hugging Face "
                            f"cache, and the hub cannot be reached to fetch it: download it while online "
                            f"(`hf download {name}`) or give two local folders, --translate TO_MODEL,TO_PLAYER") \
            from None


@dataclass
class TranslationBridge:
    """Both directions: the player's language to the model's, and back."""

    to_model: Callable[[str], str]
    to_player: Callable[[str], str]
    pair: str  # e.g. "ru-en": the player's language, then the model's

    @classmethod
    def load(cls, spec: str, device: str = "cpu") -> TranslationBridge:
        """`spec`: a language pair ("ru-en": opus-mt-ru-en there, opus-mt-en-ru back), or two Marian models
        (hub ids or folders) separated by a comma: the one into the model's language first."""
        names = _names(spec)
        return cls(Translator(names[0], device), Translator(names[1], device), spec)


def _names(spec: str) -> tuple[str, str]:
    spec = spec.strip()
    pair = PAIR.match(spec)
    if pair:
        player, model = pair.groups()
        return MARIAN.format(player, model), MARIAN.format(model, player)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise UsageError(f"--translate={spec!r}: give a language pair such as ru-en (the player's language, then the "
                     f"model's), or two Marian models separated by a comma (into the model's language first)")


class BridgeView(ModelView):
    """The adventure as the model reads it: turns' model side, fixed texts translated once and kept."""

    def __init__(self, bridge: TranslationBridge, translations: dict[str, str]):
        self.bridge, self.translations = bridge, translations

    def text(self, text: str) -> str:
        if not text.strip():
            return text
        if text not in self.translations:
            self.translations[text] = self.bridge.to_model(text)
            while len(self.translations) > MAX_TRANSLATIONS:
                del self.translations[next(iter(self.translations))]
        return self.translations[text]

    def turn(self, turn: Turn) -> str:
        action = turn.model_action or self.text(turn.action)
        output = turn.model_output or self.text(turn.output)
        return "\n".join(part for part in (action, output) if part)
