"""Applications built on generation and scoring (recommender, chat, text adventure) and what they share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from rugpt.generation import GenerationResult, GenerationSettings, Generator
from rugpt.models import LoadedModel


class TextGenerator(Protocol):
    """What the apps need of a generator: `rugpt.Generator`, or a scripted stand-in in tests."""

    loaded: LoadedModel

    @property
    def tokenizer(self): ...

    def generate(self, prompt: str, settings: GenerationSettings | None = None) -> GenerationResult: ...

    def stream(self, prompt: str, settings: GenerationSettings | None = None) -> Iterator[str]: ...


def as_generator(model: TextGenerator | LoadedModel | str | None) -> TextGenerator:
    """A Generator for a model name or loaded model; anything else is taken to be a generator already."""
    return Generator(model) if model is None or isinstance(model, (str, LoadedModel)) else model
