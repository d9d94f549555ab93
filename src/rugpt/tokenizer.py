"""Train and inspect byte-level BPE tokenizers (the GPT-2 scheme ruGPT-3 uses)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rugpt.errors import UsageError

END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class TokenView:
    """One token as a person reads it: its id, its raw byte-level symbol and the text it stands for."""

    id: int
    symbol: str
    text: str


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, min_frequency: int = 2):
    """Train a byte-level BPE on `texts`, save it to `out_dir` (loadable with AutoTokenizer) and return it.

    The only special token is `<|endoftext|>` (id 0), used as BOS, EOS and padding, as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise UsageError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least 300 tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1_000_000,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def describe_tokens(tokenizer, text: str) -> list[TokenView]:
    """Split `text` into tokens, each shown as the readable text it decodes to (not byte-level symbols).

    A token that ends in the middle of a multi-byte character decodes to '�' on its own; such
    tokens are shown with the bytes they carry instead.
    """
    if not text:
        raise UsageError("text is empty: give at least one character to tokenize")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    symbols = tokenizer.convert_ids_to_tokens(ids)
    views = []
    for token_id, symbol in zip(ids, symbols, strict=True):
        piece = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        if "\ufffd" in piece:
            piece = _raw_bytes(symbol)
        views.append(TokenView(token_id, symbol, piece))
    return views


def _raw_bytes(symbol: str) -> str:
    """Show a byte-level symbol's bytes as \\xNN, for tokens that split a UTF-8 character."""
    to_byte = _symbol_to_byte()
    return "".join(f"\\x{to_byte[c]:02x}" if c in to_byte else c for c in symbol)


def _symbol_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest shift to 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + shifted)] = byte
            shifted += 1
    return mapping
