"""One shared pymorphy3 analyzer with cached word parses (loading the dictionaries takes a tenth of a second)."""

from __future__ import annotations

import functools

from rugpt.errors import UsageError


@functools.lru_cache(maxsize=1)
def analyzer():
    try:
        import pymorphy3
    except ImportError:
        raise UsageError("the text adventure needs pymorphy3: pip install 'rugpt[apps]'") from None
    return pymorphy3.MorphAnalyzer()


@functools.lru_cache(maxsize=65536)
def parses(word: str) -> tuple:
    """All parses of a lower-cased word, likeliest first."""
    return tuple(analyzer().parse(word))


@functools.lru_cache(maxsize=65536)
def normal_forms(word: str) -> frozenset[str]:
    """Every dictionary form the word may come from ('стали' → сталь, стать), plus the word itself."""
    word = word.lower()
    return frozenset({p.normal_form for p in parses(word)} | {word})


def top_normal_form(word: str) -> str:
    return parses(word.lower())[0].normal_form
