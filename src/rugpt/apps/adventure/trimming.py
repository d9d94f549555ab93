"""Cut the model's text after its last complete sentence, the Russian way.

A sentence ends at . ! ? … (or a run of them: «?!», «?..», «...») with any closing quotes, when what
follows starts a new sentence: the end of the text, a line break, or a space and then a capital letter,
an opening quote, a digit, or a dialogue dash that opens a new remark. A dash followed by a small
letter is the author's words of the same sentence («— Стой! — крикнул он.»), so «Стой!» is no end there.
Initials («А. С. Пушкин») and a few abbreviations («ул. Ленина») are no ends either.
"""

from __future__ import annotations

import re

END = re.compile(r"[.!?…]+[»”\"')\]]*")
DASHES = "—–-"
OPENERS = "«„“\"(" + DASHES
# Abbreviations that are followed by a capitalised name: "ул. Ленина", "св. Георгий", "г. Москва".
ABBREVIATIONS = frozenset("г гг ул им св проф акад ген гр тов пос обл".split())


def trim_to_sentence(text: str) -> str:
    """`text` up to its last complete sentence; the text itself (stripped) when it has no complete sentence."""
    text = text.strip()
    ends = [m.end() for m in END.finditer(text) if _ends_sentence(text, m)]
    if not ends:
        return text
    balanced = [e for e in ends if _quotes_balance(text[:e]) == 0]
    if balanced:
        return text[: balanced[-1]]
    cut = text[: ends[-1]]
    return cut + "»" * max(0, _quotes_balance(cut))


def _ends_sentence(text: str, match: re.Match) -> bool:
    if match.group().startswith(".") and len(match.group().rstrip("»”\"')]")) == 1 and _before_is_abbreviation(
        text, match.start()
    ):
        return False
    rest = text[match.end() :]
    if not rest.strip() or rest.lstrip(" \t")[:1] in ("\n", "\r"):
        return True
    if not rest[0].isspace():
        return False  # "3.14", "т.е", "?!»," — no space, no new sentence
    following = rest.lstrip()
    first = following[0]
    if first in DASHES:
        remark = following[1:].lstrip()
        return not remark[:1].islower()  # "— крикнул он" goes on with the same sentence
    return first.isupper() or first.isdigit() or first in OPENERS


def _before_is_abbreviation(text: str, dot: int) -> bool:
    word = re.search(r"(\w+)$", text[:dot])
    if word is None:
        return False
    token = word.group(1)
    return (len(token) == 1 and token.isupper()) or token.lower() in ABBREVIATIONS


def _quotes_balance(text: str) -> int:
    """How many «guillemets» are open at the end of `text`."""
    return text.count("«") - text.count("»")
