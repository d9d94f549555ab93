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


# --- files of other tools, built here to their published specs (not with rugpt's own writers)


def png_with_text(texts: dict[str, str], width: int = 2, height: int = 2) -> bytes:
    """A small RGB PNG with tEXt chunks (PNG spec: signature, then length, type, data and CRC-32 per chunk)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    pixels = zlib.compress((b"\0" + b"\x80\x40\x20" * width) * height)
    text = b"".join(chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in texts.items())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + text + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def b64_json(document) -> str:
    import base64
    import json

    return base64.b64encode(json.dumps(document, ensure_ascii=False).encode("utf-8")).decode("ascii")


def card_v2(**data) -> dict:
    """A Tavern character card V2 (malfoyslastname/character-card-spec-v2) with a character book and unknown fields."""
    book = {
        "name": "Книга Мирона", "description": "лор корчмы", "scan_depth": 2, "token_budget": 400,
        "recursive_scanning": False, "extensions": {"x_book": {"kept": True}},
        "entries": [
            {"keys": ["змей"], "content": "Змей боится огня.", "extensions": {"selectiveLogic": 3, "x_entry": [1, 2]},
             "enabled": True, "insertion_order": 20, "case_sensitive": False, "name": "Змей", "priority": 5, "id": 1,
             "comment": "главный враг", "selective": True, "secondary_keys": ["огонь", "факел"], "constant": False,
             "position": "after_char", "x_unknown_entry_field": "stays"},
            {"keys": ["Мирон"], "content": "{{char}} одноглазый.", "extensions": {}, "enabled": True,
             "insertion_order": 10},
            {"keys": [], "content": "В Вышеграде всегда ночь.", "extensions": {}, "enabled": True,
             "insertion_order": 5, "constant": True, "position": "before_char"},
        ],
    }
    card = {
        "name": "Мирон", "description": "{{char}} — корчмарь «Хромого гуся».", "personality": "хитрый, жадный",
        "scenario": "Корчма у дороги, ночь.", "first_mes": "Мирон кивает {{user}}: «Чего надо?»",
        "mes_example": "<START>\n{{user}}: Привет.\n{{char}}: Здорово.", "creator_notes": "для проверки",
        "system_prompt": "Пиши по-русски.", "post_history_instructions": "Отвечай коротко.",
        "alternate_greetings": ["Мирон молча протирает кружку."], "tags": ["таверна"], "creator": "тест",
        "character_version": "1.0", "extensions": {"talkativeness": "0.5", "x_app": {"nested": [1, {"a": None}]}},
        "character_book": book, "x_unknown_data_field": 42,
    }
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": card | data, "x_unknown_top": "top"}


def card_v3(**data) -> dict:
    """The same card as V3 (kwaroran/character-card-spec-v3): new fields, and use_regex on each entry."""
    card = card_v2(**data)
    for entry in card["data"]["character_book"]["entries"]:
        entry["use_regex"] = False
    card["data"] |= {"nickname": "Мироша", "group_only_greetings": [], "creation_date": 1700000000,
                     "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}]}
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": card["data"]}


def world_info() -> dict:
    """A SillyTavern World Info file: entries keyed by uid (public/scripts/world-info.js)."""
    return {"entries": {
        "0": {"uid": 0, "key": ["болото", "топь"], "keysecondary": ["ночь"], "comment": "Болото", "content":
              "На болоте живёт ведьма Ярина.", "constant": False, "selective": True, "selectiveLogic": 0,
              "order": 100, "position": 0, "disable": False, "probability": 100, "useProbability": True, "depth": 4,
              "group": "", "excludeRecursion": False, "displayIndex": 0},
        "7": {"uid": 7, "key": ["мост"], "keysecondary": ["тролль"], "comment": "Мост", "content":
              "Под мостом никого нет.", "constant": False, "selective": True, "selectiveLogic": 2, "order": 50,
              "position": 4, "depth": 2, "disable": False},
        "3": {"uid": 3, "key": [], "keysecondary": [], "comment": "Погода", "content": "Всегда идёт дождь.",
              "constant": True, "selective": True, "selectiveLogic": 0, "order": 10, "position": 1,
              "disable": False},
    }, "originalData": {"name": "Болота"}}


def kobold_save() -> dict:
    """A KoboldAI save as its save routine writes it (aiserver.py): the story after the prompt in `actions`."""
    return {
        "gamestarted": True, "prompt": "Вы стоите у ворот старого города.", "memory": "Вы — наёмник Ратибор.",
        "authorsnote": "Тон мрачный.", "anotetemplate": "[Заметка: <|>]",
        "actions": ["\n\n> Вы входите в ворота.\n", "Стражник смотрит на вас.", " Начинается дождь.",
                    "\n\n> Вы идёте к корчме.\n", "Корчма закрыта."],
        "actions_metadata": {}, "worldinfo": [
            {"key": "корчма, таверна", "keysecondary": "", "content": "Корчма «Хромой гусь».", "comment": "",
             "folder": None, "selective": False, "constant": False},
            {"key": "змей", "keysecondary": "ночь", "content": "Змей прилетает ночью.", "comment": "враг",
             "folder": 5, "selective": True, "constant": False},
            {"key": "", "keysecondary": "", "content": "Идёт война.", "comment": "", "folder": 5,
             "selective": False, "constant": True}],
        "wifolders_d": {"5": {"name": "Враги", "collapsed": False}}, "wifolders_l": [5],
        "x_kobold_field": {"kept": True},
    }


def story_cards() -> list:
    """AI Dungeon story cards: a JSON array of keys (comma-separated), value, type, title, description."""
    return [{"keys": "князь,Всеслав", "value": "Князь Всеслав стар.", "type": "character", "title": "Всеслав",
             "description": "правитель", "useForCharacterCreation": False},
            {"keys": "терем", "value": "Терем за второй стеной.", "type": "location", "title": "Терем",
             "description": "", "useForCharacterCreation": False, "x_aid_field": 1}]
