"""A Russian text adventure (AI Dungeon / gamio style): scenarios, memory, author's note, world info,
retry / undo / redo / edit, saved in SQLite; played in the terminal (`rugpt play`) or on the /play page.
It reads and writes the community's files (`formats`: Tavern cards, SillyTavern World Info, KoboldAI saves,
AI Dungeon story cards) and plays English models in Russian through MarianMT (`translation`).

    from rugpt.apps.adventure import Adventure, Game, TokenCounter, load_scenario, local_completer
    from rugpt import Generator
    generator = Generator()
    game = Game(Adventure.from_scenario(load_scenario("fantasy")), TokenCounter(generator.tokenizer),
                generator.loaded.context_length)
    turn = game.act("do", "я иду в корчму", local_completer(generator))   # «Вы идёте в корчму.» + the story
"""

from rugpt.apps.adventure.context import Context, TokenCounter, build_context
from rugpt.apps.adventure.engine import Game, PendingTurn, local_completer
from rugpt.apps.adventure.grammar import as_speech, to_second_person
from rugpt.apps.adventure.scenario import Scenario, list_scenarios, load_scenario
from rugpt.apps.adventure.state import (
    ActionKind,
    Adventure,
    AdventureSettings,
    Turn,
    export_adventure,
    import_adventure,
)
from rugpt.apps.adventure.store import AdventureNotFound, AdventureStore
from rugpt.apps.adventure.trimming import trim_to_sentence
from rugpt.apps.adventure.worldinfo import Lorebook, SelectiveLogic, WorldCard

__all__ = [
    "ActionKind", "Adventure", "AdventureNotFound", "AdventureSettings", "AdventureStore", "Context", "Game",
    "Lorebook", "PendingTurn", "Scenario", "SelectiveLogic", "TokenCounter", "Turn", "WorldCard", "as_speech",
    "build_context", "export_adventure", "import_adventure", "list_scenarios", "load_scenario", "local_completer",
    "to_second_person", "trim_to_sentence",
]
