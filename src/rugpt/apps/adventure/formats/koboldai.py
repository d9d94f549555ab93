"""KoboldAI saves (the `.json` of KoboldAI Client / United's save routine in aiserver.py).

    prompt → opening        memory → memory        authorsnote, anotetemplate → author's note and its template
    actions → the turns     worldinfo → world info; entries in a folder (wifolders_d) → a lorebook of that name

`actions` is the story after the prompt, in chunks that KoboldAI glues together as they are. A chunk starting
with «>» is a player's action in adventure mode (KoboldAI writes them as "\\n\\n> You ...\\n"); the chunk after it
is that turn's output; any other chunk is a turn of story going on. World-info keys are comma-separated text,
and "selective" means a primary key and any secondary key (SillyTavern's AND ANY). An export writes a save
KoboldAI opens: the memory holds all of rugpt's always-present texts, disabled entries are left out (KoboldAI has
no switch for them), and the fields rugpt does not use of a save it read are written back as they were.
"""

from __future__ import annotations

import copy
import itertools
import re

from rugpt.apps.adventure.state import ActionKind, Adventure, Origin, Turn
from rugpt.apps.adventure.worldinfo import Lorebook, WorldCard
from rugpt.errors import DataError

KOBOLDAI = "koboldai"
DEFAULT_TEMPLATE = "[Author's note: <|>]"
ACTION = re.compile(r"\A\s*>\s?(.*)", re.DOTALL)
USED = ("key", "keysecondary", "content", "comment", "folder", "selective", "constant")


def is_save(document: object) -> bool:
    return isinstance(document, dict) and "prompt" in document and "actions" in document


def adventure_from_save(document: dict, name: str) -> Adventure:
    """The whole story of a save: prompt, memory, note, every action, world info and its folders."""
    texts = {field: document.get(field) or "" for field in ("prompt", "memory", "authorsnote", "anotetemplate")}
    bad = [field for field, value in texts.items() if not isinstance(value, str)]
    if bad:
        raise DataError(f"{name}: {', '.join(bad)} must be text in a KoboldAI save")
    template = texts["anotetemplate"] if "<|>" in texts["anotetemplate"] else DEFAULT_TEMPLATE
    adventure = Adventure(title=name, scenario="koboldai", world="", opening=texts["prompt"].strip(),
                          memory=texts["memory"].strip(), authors_note=texts["authorsnote"].strip(),
                          note_template=template.strip())
    adventure.turns = turns_from_actions(_actions(document.get("actions"), name))
    adventure.length = len(adventure.turns)
    adventure.cards, adventure.lorebooks = _world_info(document, name)
    adventure.origin = Origin(KOBOLDAI, document)
    return adventure


def _actions(actions: object, name: str) -> list[str]:
    if isinstance(actions, dict) and isinstance(actions.get("actions"), dict):  # United's newer story format
        actions = [a.get("Selected Text", "") for _, a in sorted(actions["actions"].items(), key=lambda kv: int(kv[0]))
                   if isinstance(a, dict)]
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        raise DataError(f"{name}: 'actions' must be a list of texts (the story after the prompt)")
    return actions


def turns_from_actions(actions: list[str]) -> list[Turn]:
    turns: list[Turn] = []
    for chunk in actions:
        text = chunk.strip()
        action = ACTION.match(text)
        if action:
            said, _, output = action.group(1).partition("\n")
            turns.append(Turn(ActionKind.story, said.strip(), said.strip(), output.strip(), 0, {}))
        elif not text:
            continue
        elif turns and turns[-1].action and not turns[-1].output:
            turns[-1].output = text
        else:
            turns.append(Turn(ActionKind.continue_, "", "", text, 0, {}))
    return turns


def _world_info(document: dict, name: str) -> tuple[list[WorldCard], list[Lorebook]]:
    entries, folders = document.get("worldinfo") or [], document.get("wifolders_d") or {}
    if not isinstance(entries, list) or not isinstance(folders, dict):
        raise DataError(f"{name}: worldinfo must be a list and wifolders_d an object")
    own: list[WorldCard] = []
    books: dict[str, list[WorldCard]] = {}
    for i, entry in enumerate(entries):
        card = card_from_entry(entry, f"{name}: worldinfo entry {i}")
        folder = entry.get("folder")
        (own if folder is None else books.setdefault(str(folder), [])).append(card)
    lorebooks = []
    for uid, cards in books.items():
        info = folders.get(uid) if isinstance(folders.get(uid), dict) else {}
        kept = {k: v for k, v in info.items() if k != "name"}
        extra = {KOBOLDAI: {"uid": int(uid) if uid.isdigit() else uid, **kept}}
        lorebooks.append(Lorebook(str(info.get("name") or f"folder {uid}"), tuple(cards), extra))
    return own, lorebooks


def card_from_entry(entry: object, where: str) -> WorldCard:
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object, got {type(entry).__name__}")
    keys, secondary = entry.get("key", ""), entry.get("keysecondary", "")
    try:
        return WorldCard(keys=_split(keys, where), text=str(entry.get("content") or ""),
                         secondary_keys=_split(secondary, where), selective=bool(entry.get("selective", False)),
                         constant=bool(entry.get("constant", False)), comment=str(entry.get("comment") or ""),
                         extra={KOBOLDAI: {k: v for k, v in entry.items() if k not in USED}})
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def _split(keys: object, where: str) -> tuple[str, ...]:
    if isinstance(keys, list):
        return tuple(str(k) for k in keys)
    if not isinstance(keys, str):
        raise DataError(f"{where}: keys must be comma-separated text, got {type(keys).__name__}")
    return tuple(k.strip() for k in keys.split(",") if k.strip())


# --- writing


def save_document(adventure: Adventure, memory: str) -> dict:
    """A KoboldAI save of the adventure; `memory` is its always-present text (KoboldAI has only the memory)."""
    origin = adventure.origin
    document = copy.deepcopy(origin.document) if origin is not None and origin.format == KOBOLDAI else {}
    actions = actions_from_turns(adventure.story)
    document.update(gamestarted=True, prompt=adventure.opening, memory=memory, authorsnote=adventure.authors_note,
                    anotetemplate=adventure.note_template, actions=actions,
                    actions_metadata={str(i): {"Selected Text": a, "Alternative Text": []}
                                      for i, a in enumerate(actions)})
    entries = [entry_document(card, None) for card in adventure.cards if card.enabled]
    folders, order = {}, []
    taken = {b.extra.get(KOBOLDAI, {}).get("uid") for b in adventure.lorebooks}
    for book in adventure.lorebooks:
        info = dict(book.extra.get(KOBOLDAI, {}))
        uid = info.pop("uid", None)
        if not isinstance(uid, int) or uid in order:
            uid = next(u for u in itertools.count(1) if u not in taken)
            taken.add(uid)
        folders[str(uid)] = {**{"collapsed": False}, **info, "name": book.name}
        order.append(uid)
        entries += [entry_document(card, uid) for card in book.cards if card.enabled]
    document.update(worldinfo=entries, wifolders_d=folders, wifolders_l=order)
    return document


def actions_from_turns(turns: list[Turn]) -> list[str]:
    """Story chunks: a player's action as KoboldAI's adventure mode writes it, then what the model wrote."""
    actions = []
    for turn in turns:
        speaks = turn.kind in (ActionKind.do, ActionKind.say) or (turn.action and "\n" not in turn.action)
        if turn.action and speaks:
            actions.append(f"\n\n> {turn.action}\n")
            if turn.output:
                actions.append(turn.output)
        elif turn.block():
            actions.append("\n" + turn.block())
    return actions


def entry_document(card: WorldCard, folder: int | None) -> dict:
    entry = copy.deepcopy(card.extra.get(KOBOLDAI, {}))
    entry.update(key=", ".join(card.keys), keysecondary=", ".join(card.secondary_keys), content=card.text,
                 comment=card.comment or card.name, folder=folder, selective=card.selective,
                 constant=card.constant)
    return entry
