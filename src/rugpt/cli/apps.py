"""Applications built on generation: `rugpt recommend`, `rugpt chat`, `rugpt play`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from rugpt.cli.app import ModelOpt, command, err, out, setting_help, unescape
from rugpt.cli.options import FromSettings, Opt, choice_option
from rugpt.errors import UsageError

RECOMMENDER = FromSettings("rugpt.apps.recommender:RecommenderSettings",
                           opts={"seed_template": Opt(help="; \\n stands for a newline", convert=unescape)})
CHAT = FromSettings("rugpt.apps.chat:ChatSettings", exclude=("seed_dialogue", "generation"),
                    opts={"persona": Opt(help="; \\n stands for a newline", convert=unescape)})
CHAT_DECODING = FromSettings("rugpt.generation:GenerationSettings", only=("max_new_tokens", "temperature", "seed"))


@command
def recommend(
    liked: Annotated[Optional[list[str]], typer.Argument(help="items the user liked")] = None,
    model: ModelOpt = None,
    catalogue: Annotated[Optional[str], typer.Option(help="keep only items of this CSV catalogue (title, year); "
                                                     "'films_ru' is the shipped one")] = None,
    given: Annotated[dict, RECOMMENDER] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help='users JSONL ({"liked": [...]} per line): '
                                                      "report hit-rate@top and catalogue coverage")] = None,
    hide: Annotated[Optional[int], typer.Option(help="with --eval: how many of each user's last items to hide "
                                                "(default 1)")] = None,
    show_samples: Annotated[bool, typer.Option("--show-samples", help="also print the sampled continuations")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Recommend by seed programming: list what a user liked, sample continuations, count the titles."""
    from rugpt.apps.recommender import Catalogue, Recommender, RecommenderSettings, read_users

    settings = RecommenderSettings(**given)
    recommender = Recommender(model, Catalogue.load(catalogue) if catalogue else None)
    if eval_file is not None:
        report = recommender.evaluate(read_users(eval_file), settings, **({} if hide is None else {"hide": hide}))
        if as_json:
            print(json.dumps(report.to_dict(), ensure_ascii=False))
            return
        coverage = "—" if report.coverage is None else f"{report.coverage:.3f}"
        out.print(f"hit-rate@{report.k} {report.hit_rate:.3f} over {report.users} users "
                  f"({report.hidden_per_user} hidden each); "
                  f"catalogue coverage {coverage}; {report.distinct_recommended} distinct items recommended")
        return
    if not liked:
        raise UsageError("no liked items: give them as arguments, e.g. rugpt recommend 'Брат' 'Бумер'")
    result = recommender.recommend(liked, settings)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    table = Table("#", "title", "year", "votes")
    for i, item in enumerate(result.items, start=1):
        table.add_row(str(i), escape(item.title), str(item.year or ""), f"{item.votes}/{settings.samples}")
    out.print(table if result.items else "no names came back; try more --samples or another --seed")
    for sample in result.samples if show_samples else []:
        out.print(sample, markup=False)


@command
def chat(
    model: ModelOpt = None,
    once: Annotated[Optional[str], typer.Option(help="send this one message, print the reply and exit")] = None,
    given: Annotated[dict, CHAT] = None,
    seed_dialogue: Annotated[Optional[Path], typer.Option(help="a file of opening turns, each line starting with "
                                                          "'Пользователь:' or 'Ассистент:'")] = None,
    preset: Annotated[Optional[str], choice_option(
        "rugpt.generation:Preset", "--preset", help="named decoding settings to start from", default="balanced")
    ] = None,
    decoding: Annotated[dict, CHAT_DECODING] = None,
    as_json: Annotated[bool, typer.Option("--json", help="with --once: print the reply as JSON")] = False,
) -> None:
    """Talk to a model in the terminal; /reset starts over, /exit or Ctrl-D leaves."""
    from rugpt.apps.chat import Chat, ChatSettings, read_dialogue
    from rugpt.chat_format import ASSISTANT_LABEL, USER_LABEL
    from rugpt.generation import GenerationSettings

    settings = ChatSettings(generation=GenerationSettings.from_preset(preset, **decoding), **given)
    if seed_dialogue is not None:
        settings = dataclasses.replace(settings, seed_dialogue=read_dialogue(seed_dialogue))
    session = Chat(model, settings)
    if once is not None:
        reply = session.send(once)
        if as_json:
            print(json.dumps({"message": once, "reply": reply}, ensure_ascii=False))
        else:
            out.print(reply, markup=False)
        return
    err.print("/reset starts over, /exit or Ctrl-D leaves", style="dim")
    while True:
        try:
            message = out.input(f"{escape(USER_LABEL)} ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if message in ("/exit", "/выход"):
            break
        if message == "/reset":
            session.reset()
        elif message:
            out.print(f"{ASSISTANT_LABEL} ", end="", markup=False)
            pending = ""  # whitespace is printed only once more text follows it: a reply ends without it
            try:
                for piece in session.stream(message):
                    text = pending + piece
                    body = text.rstrip()
                    pending = text[len(body):]
                    out.print(body, end="", markup=False)
            except KeyboardInterrupt:  # stops this reply, not the chat; what was written is kept
                pass
            out.print()


def _play_help(name: str) -> str:
    from rugpt.apps.adventure.state import AdventureSettings

    return setting_help(AdventureSettings, name)


@command
def play(
    scenario: Annotated[Optional[str], typer.Option("--scenario", "-s", help="fantasy | detective | space | "
                                                    "postapocalypse, or a scenario .yaml file")] = None,
    model: ModelOpt = None,
    db: Annotated[Optional[Path], typer.Option(help="SQLite file of saved adventures "
                                               "(default: ~/.local/share/rugpt/adventures.sqlite3)")] = None,
    resume: Annotated[Optional[int], typer.Option(help="id of a saved adventure to continue (see --list)")] = None,
    import_files: Annotated[Optional[list[Path]], typer.Option(
        "--import", help="start from a file: a Tavern character card (.png, .json, .charx), a KoboldAI save or a "
                         "rugpt export; lorebooks (SillyTavern World Info, AI Dungeon story cards) join the "
                         "adventure. May be given several times")] = None,
    export_file: Annotated[Optional[Path], typer.Option(
        "--export", help="write the adventure to this file instead of playing (with --import and no --resume: "
                         "convert between formats); the format follows the extension (.json is rugpt's own, .png, "
                         ".charx) or --format")] = None,
    export_format: Annotated[Optional[str], typer.Option(
        "--format", help="format of --export: rugpt | tavern | png | charx | sillytavern | koboldai | "
                         "aidungeon")] = None,
    greeting: Annotated[int, typer.Option(help="a card's greeting to start with: 0 is its first message, 1.. "
                                               "its alternate greetings")] = 0,
    translate: Annotated[Optional[str], typer.Option(
        help="play a model of another language through MarianMT: a pair such as ru-en (Helsinki-NLP/opus-mt-ru-en "
             "and opus-mt-en-ru), or two Marian models, comma-separated, into the model's language first")] = None,
    preset: Annotated[Optional[str], typer.Option(help=_play_help("preset"))] = None,
    list_only: Annotated[bool, typer.Option("--list", help="list scenarios and saved adventures")] = False,
) -> None:
    """A text adventure: type what you do («я открываю дверь»), the model tells what happens."""
    from rugpt.apps.adventure.terminal import play as run

    run(scenario, model=model, db=db, resume=resume, import_files=import_files or (), export_file=export_file,
        export_format=export_format, greeting=greeting, translate=translate, preset=preset, list_only=list_only,
        console=out)
