"""Shared pieces of the adventure tests: a scripted completer and small adventures."""

from __future__ import annotations

from rugpt.apps.adventure.state import Adventure, AdventureSettings
from rugpt.apps.adventure.worldinfo import WorldCard
from rugpt.generation import GenerationSettings

WORDS = ("дракон идёт по лесу и видит старый замок у реки где живёт ведьма а ветер воет над болотом "
         "рыцарь молчит стражник смеётся корчмарь наливает пиво").split()


def scripted(prompt: str, settings: GenerationSettings) -> str:
    """A stand-in for the model: its text depends only on the seed, and ends mid-sentence to be trimmed."""
    return f"Ход со случайным числом {settings.seed}. Ветер воет. А пото"


def seeds(start: int = 100):
    """A seed source counting up, so tests know each turn's seed."""
    counter = iter(range(start, start + 10_000))
    return lambda: next(counter)


def small_adventure(**settings) -> Adventure:
    """An adventure that fits a 128-token model: short memory, world and opening."""
    return Adventure(
        title="Тест", scenario="test", world="Лес у реки.", opening="Вы стоите у старого замка.",
        memory="Вы — рыцарь.", authors_note="Тон мрачный.",
        cards=[WorldCard(("дракон",), "Дракон спит в пещере."), WorldCard(("Хромой гусь",), "Корчма у дороги.")],
        settings=AdventureSettings(**({"max_new_tokens": 20} | settings)),
    )
