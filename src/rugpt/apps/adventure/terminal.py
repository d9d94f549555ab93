"""`rugpt play` (`rugpt.play`): the adventure in a terminal, drawn with rich; every turn is saved as it is played.

It also imports the community's files (Tavern cards, KoboldAI saves, SillyTavern World Info, AI Dungeon story
cards) and exports to them; with an export file and no saved game to resume, it converts without playing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from rugpt.apps.adventure import formats
from rugpt.apps.adventure.context import TokenCounter
from rugpt.apps.adventure.engine import Completer, Game, local_completer
from rugpt.apps.adventure.scenario import list_scenarios, load_scenario
from rugpt.apps.adventure.state import ActionKind, Adventure, AdventureSettings, Turn
from rugpt.apps.adventure.store import AdventureStore
from rugpt.apps.adventure.worldinfo import WorldCard
from rugpt.errors import RugptError, UsageError

HELP = """\
Пишите, что делаете, как вам удобно: «я открываю дверь» станет «Вы открываете дверь».
  [bold]текст[/]              действие          [bold]"текст[/] или [bold]«текст[/]   реплика вслух
  [bold]/story текст[/]       текст в историю   [bold]Enter[/]              продолжить историю
  [bold]/retry[/]  переписать последний ход   [bold]/undo[/]  отменить ход   [bold]/redo[/]  вернуть ход
  [bold]/edit N текст[/]      заменить текст хода N ([bold]/edit-action N текст[/] — действие хода)
  [bold]/history[/]  вся история с номерами ходов     [bold]/context[/]  что видит модель
  [bold]/memory текст[/]  память   [bold]/note текст[/]  примечание автора   [bold]/cards[/]  карточки мира
  [bold]/card ключ, ключ: текст[/]   новая карточка мира    [bold]/lore файл[/]  добавить лорбук (World Info, ...)
  [bold]/export файл [формат][/]  сохранить: .json, .png (карточка Tavern), .charx; форматы: {formats}
  [bold]/help[/]  эта справка      [bold]/quit[/]  выход"""

Reader = Callable[[str], str]


@dataclass
class TerminalGame:
    """The read-act-print loop over one `Game`."""

    game: Game
    complete: Completer
    console: Console
    read: Reader

    def run(self) -> None:
        adventure = self.game.adventure
        self.console.print(Panel(escape(adventure.world), title=escape(adventure.title), subtitle="/help — справка"))
        self.show_story()
        while True:
            try:
                line = self.read("\n> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if line in ("/quit", "/exit", "/q"):
                break
            try:
                self.handle(line)
            except RugptError as exc:
                self.console.print(f"[red]{escape(str(exc))}[/]")
            except KeyboardInterrupt:
                self.console.print("[yellow]прервано: ход не записан[/]")
        self.console.print("[dim]Игра сохранена.[/]")

    def handle(self, line: str) -> None:
        command, _, rest = line.partition(" ") if line.startswith("/") else ("", "", line)
        rest = rest.strip()
        simple = {"/retry": self.retry, "/undo": self.undo, "/redo": self.redo, "/history": self.show_story,
                  "/context": self.show_context, "/cards": self.show_cards, "/help": self.show_help}
        if command in simple:
            simple[command]()
        elif command in ("", "/do", "/say", "/story", "/continue"):
            self.act(command, rest)
        elif command in ("/edit", "/edit-action"):
            self.edit(rest, action=command == "/edit-action")
        elif command in ("/memory", "/note"):
            self.set_text("memory" if command == "/memory" else "authors_note", rest)
        elif command == "/card":
            self.add_card(rest)
        elif command == "/lore":
            self.add_lore(rest)
        elif command == "/export":
            self.export(rest)
        else:
            raise UsageError(f"неизвестная команда {command}; /help — список команд")

    def act(self, command: str, text: str) -> None:
        kind = {"/do": ActionKind.do, "/say": ActionKind.say, "/story": ActionKind.story,
                "/continue": ActionKind.continue_}.get(command, ActionKind.do)
        if command == "" and not text:
            kind = ActionKind.continue_
        elif command == "" and text[0] in "\"«":
            kind = ActionKind.say
        with self.console.status("…"):
            turn = self.game.act(kind, text, self.complete)
        self.show_turn(turn)

    def retry(self) -> None:
        with self.console.status("…"):
            turn = self.game.retry(self.complete)
        self.show_turn(turn)

    def undo(self) -> None:
        turn = self.game.undo()  # turns count from 1: the one undone was number length + 1
        self.console.print(f"[dim]отменён ход {self.game.adventure.length + 1}: {escape(_short(turn))}[/]")

    def redo(self) -> None:
        turn = self.game.redo()
        self.show_turn(turn)

    def edit(self, rest: str, action: bool) -> None:
        number, _, text = rest.partition(" ")
        if not number.isdigit() or not text.strip():
            raise UsageError("напишите номер хода и новый текст: /edit 3 Новый текст хода")
        index = int(number) - 1
        turn = self.game.edit(index, **({"action": text} if action else {"output": text}))
        self.show_turn(turn, number=index + 1)

    def set_text(self, field: str, text: str) -> None:
        if text:
            self.game.update(**{field: text})
        current = getattr(self.game.adventure, field) or "(пусто)"
        self.console.print(f"[bold]{'Память' if field == 'memory' else 'Примечание автора'}:[/] {escape(current)}")

    def add_card(self, rest: str) -> None:
        keys, _, text = rest.partition(":")
        if not text.strip():
            raise UsageError("формат: /card ключ, ещё ключ: текст карточки")
        card = WorldCard(tuple(keys.split(",")), text)
        self.game.update(cards=[*self.game.adventure.cards, card])
        self.show_cards()

    def add_lore(self, rest: str) -> None:
        if rest:
            books = formats.with_lorebooks(self.game.adventure, [formats.read_file(rest)])
            self.game.update(lorebooks=books)
        table = Table("лорбук", "записей", title="Лорбуки")
        for book in self.game.adventure.lorebooks:
            table.add_row(escape(book.name), str(len(book.cards)))
        self.console.print(table)

    def export(self, rest: str) -> None:
        path, _, fmt = rest.partition(" ")
        if not path:
            raise UsageError("укажите файл: /export моя-игра.json (или .png, .charx; формат — вторым словом)")
        if self.game.store is not None:
            self.game.store.load_origin(self.game.adventure)
        written = formats.write_file(self.game.adventure, path, fmt.strip() or None)
        self.console.print(f"[dim]сохранено в {escape(path)} ({written.value})[/]")

    def show_story(self) -> None:
        adventure = self.game.adventure
        self.console.print(escape(adventure.opening))
        for number, turn in enumerate(adventure.story, start=1):
            self.show_turn(turn, number)

    def show_turn(self, turn: Turn, number: int | None = None) -> None:
        number = number or self.game.adventure.length
        action = f" [bold cyan]{escape(turn.action)}[/]" if turn.action else ""
        self.console.print(f"\n[dim]{number}.[/]{action}")
        self.console.print(escape(turn.output) if turn.output else "[dim](модель ничего не дописала)[/]")

    def show_context(self) -> None:
        context = self.game.context()
        title = f"контекст: {context.tokens} из {context.budget} токенов"
        self.console.print(Panel(escape(context.text), title=title))

    def show_cards(self) -> None:
        table = Table("#", "ключи", "текст", title="Карточки мира")
        for i, card in enumerate(self.game.adventure.cards, start=1):
            table.add_row(str(i), escape(", ".join(card.keys)), escape(card.text))
        self.console.print(table)

    def show_help(self) -> None:
        self.console.print(HELP.format(formats=", ".join(f.value for f in formats.Format)))


def _short(turn: Turn) -> str:
    text = turn.action or turn.output
    return text if len(text) <= 60 else text[:57] + "..."


def choose_adventure(store: AdventureStore, console: Console, read: Reader) -> Adventure:
    """Ask which scenario to start or which saved adventure to continue."""
    scenarios, saved = list_scenarios(), store.list_adventures()[:9]
    console.print("[bold]Новая игра:[/]")
    for i, scenario in enumerate(scenarios, start=1):
        genre = f"[dim]({escape(scenario.genre)})[/]"
        console.print(f"  {i}. {escape(scenario.title)} {genre} — {escape(scenario.summary)}")
    if saved:
        console.print("[bold]Продолжить:[/]")
        for i, item in enumerate(saved, start=len(scenarios) + 1):
            console.print(f"  {i}. {escape(item.title)} [dim](ходов: {item.turns})[/]")
    answer = read("Номер: ").strip()
    choice = int(answer) - 1 if answer.isdigit() else -1
    if 0 <= choice < len(scenarios):
        return _new(store, Adventure.from_scenario(scenarios[choice]))
    if 0 <= choice - len(scenarios) < len(saved):
        return store.load_by_id(saved[choice - len(scenarios)].id)
    raise UsageError(f"choice {answer!r} is not one of 1..{len(scenarios) + len(saved)}")


def _new(store: AdventureStore, adventure: Adventure) -> Adventure:
    store.create(adventure)
    return adventure


def list_saved(store: AdventureStore, console: Console) -> None:
    table = Table("сценарий", "название", title="Сценарии")
    for scenario in list_scenarios():
        table.add_row(scenario.name, escape(scenario.title))
    console.print(table)
    saved = Table("id", "название", "ходов", title=f"Сохранённые игры ({store.path})")
    for item in store.list_adventures():
        saved.add_row(str(item.id), escape(item.title), str(item.turns))
    console.print(saved)


def play(scenario: str | None = None, *, model: str | None = None, db: Path | None = None,
         resume: int | None = None, import_files: Sequence[Path] = (), export_file: Path | None = None,
         export_format: str | None = None, greeting: int = 0, translate: str | None = None,
         preset: str | None = None, list_only: bool = False, console: Console | None = None,
         read: Reader | None = None) -> None:
    """Play a text adventure in the terminal until /quit: a new one from `scenario` (asked when None), a saved
    one (`resume`, an id from `list_only`) or an imported file (a card, a KoboldAI save, an export); lorebook
    files among `import_files` join it. Every turn is saved in `db`.

    With `export_file` the adventure is written to it (format from `export_format` or the extension) instead of
    played: a conversion when nothing is resumed, and then nothing is saved and no model is loaded.
    `translate` ("ru-en") plays a model of another language through MarianMT translators.
    """
    console = console or Console(highlight=False)
    read = read or console.input
    imported = [formats.read_file(path, greeting) for path in import_files]  # all checked before anything is saved
    stories, lore = [i for i in imported if not i.lore_only], [i for i in imported if i.lore_only]
    if len(stories) > 1:
        raise UsageError(f"import one adventure at a time (a card, a save or an export), got "
                         f"{', '.join(i.name for i in stories)}; lorebook files may come with it")
    if export_file is not None and resume is None:
        _export(_starting(scenario, stories, lore, convert=True), lore, export_file, export_format, console)
        return
    store = AdventureStore(db)
    try:
        if list_only:
            list_saved(store, console)
            return
        if resume is not None:
            if stories or scenario:
                raise UsageError("--resume continues a saved game; give --scenario or an adventure to --import "
                                 "without it")
            adventure = store.load_by_id(resume)
            if export_file is not None:
                store.load_origin(adventure)
                _export(adventure, lore, export_file, export_format, console)
                return
        elif stories or scenario is not None or lore:
            adventure = _starting(scenario, stories, lore)
            adventure.lorebooks = formats.with_lorebooks(adventure, lore)
            lore = []
            if preset is not None:
                adventure.settings = AdventureSettings(**{**dataclasses.asdict(adventure.settings), "preset": preset})
            store.create(adventure)
        else:
            adventure = choose_adventure(store, console, read)
        _run(adventure, store, model, translate, preset, lore, console, read)
    finally:
        store.close()


def _export(adventure: Adventure, lore: list, path: Path, fmt: str | None, console: Console) -> None:
    """Write the adventure, with these lorebook files joined, to a file; nothing is saved."""
    adventure.lorebooks = formats.with_lorebooks(adventure, lore)
    written = formats.write_file(adventure, path, fmt)
    console.print(f"written {escape(str(path))} ({written.value})")


def _starting(scenario: str | None, stories: list, lore: list, convert: bool = False) -> Adventure:
    """The adventure to start (or convert): an imported one, a scenario's, or (converting lore) an empty one."""
    if stories and scenario is not None:
        raise UsageError(f"give either --scenario or an adventure to --import ({stories[0].name}), not both")
    if stories:
        return stories[0].adventure
    if scenario is not None:
        return Adventure.from_scenario(load_scenario(scenario))
    if convert:
        return Adventure(title=lore[0].name if lore else "", scenario="", world="", opening="")
    raise UsageError(f"{lore[0].name} is a lorebook: it joins an adventure, e.g. rugpt play -s fantasy --import "
                     f"{lore[0].name}.json, or --resume ID")


def _run(adventure: Adventure, store: AdventureStore, model: str | None, translate: str | None, preset: str | None,
         lore: list, console: Console, read: Reader) -> None:
    """Load the model (and translators), join lore and preset to a saved game, and play."""
    from rugpt.generation import Generator

    with console.status("загрузка модели…"):
        generator = Generator(model)
    loaded, bridge = generator.loaded, None
    if translate:
        from rugpt.apps.adventure.translation import TranslationBridge

        with console.status("загрузка переводчиков…"):
            bridge = TranslationBridge.load(translate, device=loaded.device)
    game = Game(adventure, TokenCounter(loaded.tokenizer), loaded.context_length, store, bridge=bridge)
    if lore:
        game.update(lorebooks=formats.with_lorebooks(adventure, lore))
    if preset is not None and adventure.settings.preset != preset:
        game.update(settings={**dataclasses.asdict(adventure.settings), "preset": preset})
    TerminalGame(game, local_completer(generator), console, read).run()
