"""Scenarios: a title, the world, the hero (as the first memory), an opening and a few world-info cards.

The built-in ones live as YAML files beside this module; any YAML file of the same shape works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rugpt.apps.adventure.worldinfo import WorldCard
from rugpt.errors import DataError, UsageError

SCENARIO_DIR = Path(__file__).parent / "scenarios"
REQUIRED = ("title", "world", "memory", "opening")


@dataclass(frozen=True)
class Scenario:
    """How an adventure starts; the adventure copies it, so later edits to the game never change the scenario."""

    name: str
    title: str
    world: str  # the setting, always at the top of the context
    memory: str  # who the player is and what matters; the player may edit it during the game
    opening: str  # the story's first paragraph
    genre: str = ""
    summary: str = ""
    authors_note: str = ""
    cards: tuple[WorldCard, ...] = ()

    @classmethod
    def from_dict(cls, name: str, data: dict) -> Scenario:
        if not isinstance(data, dict):
            raise DataError(f"scenario {name!r} must be a mapping of fields, got {type(data).__name__}")
        missing = [f for f in REQUIRED if not str(data.get(f) or "").strip()]
        if missing:
            raise DataError(f"scenario {name!r} lacks {', '.join(missing)}; each scenario needs {', '.join(REQUIRED)}")
        cards = tuple(WorldCard.from_dict(c) for c in data.get("cards") or ())
        text = {f: " ".join(str(data.get(f) or "").split()) for f in
                ("title", "world", "memory", "opening", "genre", "summary", "authors_note")}
        return cls(name=name, cards=cards, **text)


def _read(path: Path) -> Scenario:
    import yaml

    try:
        # security: safe_load builds plain data only, never Python objects named in the file.
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read scenario file {str(path)!r}: {exc}") from None
    return Scenario.from_dict(path.stem, data)


def list_scenarios() -> list[Scenario]:
    """The built-in scenarios, by name."""
    return [_read(path) for path in sorted(SCENARIO_DIR.glob("*.yaml"))]


def load_scenario(name: str) -> Scenario:
    """A built-in scenario by name (fantasy, detective, ...) or a scenario YAML file by path."""
    builtin = SCENARIO_DIR / f"{name}.yaml"
    if name.isidentifier() and builtin.is_file():
        return _read(builtin)
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _read(path)
    names = ", ".join(p.stem for p in sorted(SCENARIO_DIR.glob("*.yaml")))
    raise UsageError(f"scenario={name!r} is unknown; use one of {names}, or the path of a scenario .yaml file")
