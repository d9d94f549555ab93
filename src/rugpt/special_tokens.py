"""End-of-text, beginning and padding ids from a model's own files, checked against its vocabulary.

The ruGPT-3 family disagrees with itself here (../shared/MODELS.md): the 2023 configs say pad 0, bos 1,
eos 2 (`<pad>`, `<s>`, `</s>`); ruGPT-3.5 says pad 0, bos 2, eos 3; older configs, and most hub
fine-tunes made from them, name GPT-2's `<|endoftext|>` / 50256, a token ruGPT's vocabulary does not
have (ru-gpts #28) — transformers then adds it as a new id on an untrained row, and generation never
stops on its own. So each id is taken from the config, checked to be a special token the vocabulary
really has, else from the tokenizer's special tokens, else from the tokens ruGPT was trained with
(`</s>`, `<|endoftext|>`); when nothing fits, one warning says how generation will stop.

The sampleable vocabulary is the tokenizer's trained vocabulary plus added tokens whose output rows
were trained; the embedding rows past it (50264 rows for 50257 tokens in small and medium) are never
sampled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The tokens ruGPT-3 and GPT-2 models end a text with, in the order tried when the files disagree.
END_TOKENS = ("</s>", "<|endoftext|>")
BEGIN_TOKENS = ("<s>", "<|endoftext|>")
PAD_TOKENS = ("<pad>",)


@dataclass(frozen=True)
class SpecialIds:
    """The ids generation, scoring and training use, and how many ids may be sampled."""

    eos: int | None
    bos: int | None
    pad: int
    sampleable: int  # ids 0 .. sampleable-1 may be generated


def resolve_special_ids(tokenizer, model, folder: Path | None = None) -> SpecialIds:
    """Check the config's and tokenizer's ids against the vocabulary, fix both in place, and return them.

    `folder` holds the tokenizer files: tokens they declare beyond the trained vocabulary are real; a
    special token transformers had to invent at load (named, but in no vocabulary) is not.
    """
    head = model.get_output_embeddings()
    n_rows = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
    ids = choose_special_ids(tokenizer, model.config, n_rows, folder)
    apply_special_ids(ids, tokenizer, (model.config, getattr(model, "generation_config", None)))
    return ids


def choose_special_ids(tokenizer, config, n_rows: int, folder: Path | None = None) -> SpecialIds:
    """The ids to use for a model with `n_rows` output rows, this config and tokenizer (nothing is changed)."""
    declared = declared_added_ids(folder) if folder else set()
    size = min(int(tokenizer.vocab_size), n_rows)
    while size < n_rows and size in declared:  # added tokens the files declare; invented ones are not
        size += 1
    usable = range(size)
    eos = _pick("eos", _first(config.eos_token_id), tokenizer.eos_token_id, END_TOKENS, tokenizer, usable)
    bos = _pick("bos", _first(config.bos_token_id), tokenizer.bos_token_id, BEGIN_TOKENS, tokenizer, usable) or eos
    pad = _pick("pad", _first(getattr(config, "pad_token_id", None)), tokenizer.pad_token_id, PAD_TOKENS, tokenizer,
                usable)
    if eos is None:
        _warn_once(f"{_where(config)}: no end-of-text token found in the vocabulary (config eos_token_id="
                   f"{config.eos_token_id}, tokenizer eos {tokenizer.eos_token!r}); generation stops only at "
                   f"max_new_tokens or a stop string")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return SpecialIds(eos=eos, bos=bos, pad=pad, sampleable=size)


def declared_added_ids(folder: Path) -> set[int]:
    """Ids of the added tokens a tokenizer's files declare (tokenizer.json, tokenizer_config.json,
    added_tokens.json)."""
    ids: set[int] = set()
    for name, read in (("tokenizer.json", lambda d: [t["id"] for t in d.get("added_tokens", [])]),
                       ("tokenizer_config.json", lambda d: [int(i) for i in d.get("added_tokens_decoder", {})]),
                       ("added_tokens.json", lambda d: list(d.values()))):
        path = Path(folder) / name
        if path.is_file():
            try:
                ids.update(int(i) for i in read(json.loads(path.read_text(encoding="utf-8"))))
            except (ValueError, TypeError, KeyError, AttributeError):
                log.debug("%s: no readable added tokens", path)
    return ids


def _pick(kind: str, from_config: int | None, from_tokenizer: int | None, conventional: tuple[str, ...],
          tokenizer, usable: range) -> int | None:
    """The first of config id, tokenizer id, conventional token that is a special token the vocabulary has."""
    specials = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    candidates = [(c, c in specials) for c in (from_config, from_tokenizer)]
    candidates += [(vocab.get(token), True) for token in conventional]
    for candidate, special in candidates:
        if candidate is not None and candidate in usable and special:
            named = from_config if from_config is not None else from_tokenizer
            if named is not None and candidate != named:
                _warn_once(_fallback_message(kind, named, candidate, tokenizer))
            return candidate
    return None


def _fallback_message(kind: str, named: int, used: int, tokenizer) -> str:
    return (f"the config names {kind}_token_id={named}, which is not a special token of this model's vocabulary "
            f"(an old <|endoftext|>/50256 config?); using {tokenizer.convert_ids_to_tokens(used)!r} ({used}) instead")


def apply_special_ids(ids: SpecialIds, tokenizer, configs=()) -> None:
    """Make the tokenizer and the given configs (model, generation) say the same ids."""
    # None clears a token transformers invented (named by the files, absent from the vocabulary)
    tokenizer.eos_token = None if ids.eos is None else tokenizer.convert_ids_to_tokens(ids.eos)
    tokenizer.bos_token = None if ids.bos is None else tokenizer.convert_ids_to_tokens(ids.bos)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ids.pad)
    for config in configs:
        if config is not None:
            config.eos_token_id, config.bos_token_id, config.pad_token_id = ids.eos, ids.bos, ids.pad


def _first(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _where(config) -> str:
    return str(getattr(config, "_name_or_path", "") or "the model")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
