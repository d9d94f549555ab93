"""Log-probs in OpenAI's shapes: chat's `logprobs.content[]` and legacy completions' four parallel lists.

The numbers come from the decode core (each picked token, rugpt.decoding) and from scoring (an echoed prompt,
rugpt.scoring), both `TokenLogprobs`: log-softmax of the model's raw logits, before repetition penalty,
temperature, top-k/top-p or a grammar's mask — the model's own distribution, as vLLM reports by default.

A token is shown as its text when its bytes are whole UTF-8; a byte-level BPE token that holds part of a
character is shown as `bytes:\\xd0` (OpenAI's and vLLM's convention), and chat entries carry the exact
`bytes` so a client can join such tokens back into characters.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache

from rugpt.sampling import TokenLogprobs
from rugpt.serve.schemas import ChatTokenLogprob, CompletionLogprobs, TopLogprob


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (each byte as a printable character), reversed: character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenText:
    """The bytes and the shown text of a tokenizer's tokens, remembered once looked up."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = self._lookup(token)
        return self._bytes[token]

    def text_of(self, token: int) -> str:
        raw = self.bytes_of(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _lookup(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        table = _byte_decoder()
        if all(char in table for char in piece):  # byte-level BPE (GPT-2, ruGPT-3): each character is a byte
            return bytes(table[char] for char in piece)
        return self.tokenizer.decode([token]).encode("utf-8")


class Offsets:
    """Character offsets of tokens in a text built from their bytes, fed token by token (streams go on where
    the last chunk stopped). A token that begins inside a character is placed at that character."""

    def __init__(self, start: int = 0):
        self.position = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, raw: bytes) -> int:
        at = self.position
        self.position += len(self._decoder.decode(raw))
        return at


def completion_logprobs(names: TokenText, ids: Sequence[int], entries: Sequence[TokenLogprobs | None],
                        offsets: Offsets) -> CompletionLogprobs:
    """Legacy completions' shape for tokens `ids` (an entry None: an echoed prompt's first token)."""
    tokens, values, tops, starts = [], [], [], []
    for token, entry in zip(ids, entries, strict=True):
        tokens.append(names.text_of(token))
        starts.append(offsets.next(names.bytes_of(token)))
        values.append(None if entry is None else entry.logprob)
        if entry is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for alt, logprob in entry.top:
            top.setdefault(names.text_of(alt), logprob)  # two ids may show as one text: the likelier stays
        tops.append(top)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=starts)


def chat_logprobs(names: TokenText, entries: Sequence[TokenLogprobs]) -> list[ChatTokenLogprob]:
    """Chat's `logprobs.content` entries."""
    def top(token: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=names.text_of(token), logprob=logprob, bytes=list(names.bytes_of(token)))

    return [ChatTokenLogprob(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
            for e in entries]
