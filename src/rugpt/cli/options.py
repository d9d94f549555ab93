"""Command-line options generated from the settings classes: each option is declared once, as a field.

A command names a settings class in one parameter, `given: Annotated[dict, FromSettings("module:Class")]`;
every field of that class becomes an option there (`lora_r` → `--lora-r`), with the field's help text, its
type, its default shown from the class, `--x/--no-x` for a bool, the choices of an Enum or Literal (checked
here, one line and exit 2 on a bad value), a repeatable option for a tuple or list. The command receives the
fields the user gave as `given`; the rest keep the class's defaults. `Opt` changes what a command needs
changed (`--out -o`, a positional argument, `\\n` unescaping). A field added to a class is an option of every
command that uses it, with nothing else to edit.

Commands are built the first time they are needed (their --help, or a run): `rugpt --help` imports no
settings module, so neither torch nor transformers (see `LazyCommand`).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand

REQUIRED = inspect.Parameter.empty
SCALARS = (str, int, float, bool, Path)


@dataclass(frozen=True, init=False)
class Opt:
    """How one field looks on a command line where it differs from the generated option."""

    flags: tuple[str, ...] = ()  # e.g. ("--out", "-o"); a bool's "--x/--no-x" is written out or derived
    help: str = ""  # appended to the field's own help
    argument: bool = False  # a positional argument instead of an option
    convert: Callable[[Any], Any] | None = None  # applied to the value given
    envvar: str | None = None
    show_default: bool = True

    def __init__(self, *flags: str, help: str = "", argument: bool = False, convert=None, envvar=None,
                 show_default: bool = True):
        for name, value in (("flags", flags), ("help", help), ("argument", argument), ("convert", convert),
                            ("envvar", envvar), ("show_default", show_default)):
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Setting:
    """One field of a settings class: what an option is made from."""

    name: str
    type: Any
    default: Any  # REQUIRED when the class has none
    help: str


@dataclass(frozen=True, eq=False)
class FromSettings:
    """The fields of a settings class ("module:Class", imported when the command is built) as options."""

    target: str | type  # "module:Class", or the class itself
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    opts: Mapping[str, Opt] = field(default_factory=dict)
    panel: str | None = None  # the --help panel these options go into

    def settings_class(self) -> type:
        if isinstance(self.target, type):
            return self.target
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    def bind(self) -> BoundSettings:
        """The class as it is now (a test may have replaced it), with its options."""
        cls = self.settings_class()
        unknown = (set(self.only or ()) | set(self.exclude) | set(self.opts)) - {s.name for s in settings_of(cls)}
        if unknown:
            raise TypeError(f"{self.target} has no fields {', '.join(sorted(unknown))}")
        chosen = [s for s in settings_of(cls) if (self.only is None or s.name in self.only)
                  and s.name not in self.exclude]
        return BoundSettings(self, cls, chosen)


@dataclass(frozen=True)
class BoundSettings:
    spec: FromSettings
    cls: type
    settings: list[Setting]

    def parameters(self) -> list[inspect.Parameter]:
        return [parameter(s, self.spec.opts.get(s.name, Opt()), self.spec.panel) for s in self.settings]

    def flag(self, name: str) -> str:
        """The option a field is given with, for error messages."""
        for s in self.settings:
            if s.name == name:
                flags = self.spec.opts.get(name, Opt()).flags
                return flags[0].split("/")[0] if flags else "--" + name.replace("_", "-")
        return name

    def collect(self, values: dict) -> dict:
        """The fields the user gave (popped from `values`), in the types the class takes."""
        given = {}
        for s in self.settings:
            value = values.pop(s.name)
            if value is None:
                continue
            if typing.get_origin(strip_optional(s.type)) is tuple:
                value = tuple(value)
            convert = self.spec.opts.get(s.name, Opt()).convert
            given[s.name] = convert(value) if convert else value
        return given

    def create(self, given: dict):
        """The settings object; a pydantic model's refusal becomes one UsageError naming the option."""
        if not hasattr(self.cls, "model_fields"):
            return self.cls(**given)
        from pydantic import ValidationError

        from rugpt.errors import UsageError

        try:
            return self.cls(**given)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = f"{self.flag(str(first['loc'][0]))}: " if first["loc"] else ""
            raise UsageError(where + first["msg"].removeprefix("Value error, ")) from None


def settings_of(cls: type) -> list[Setting]:
    """The fields of a dataclass or a pydantic model: name, resolved type, default and help text."""
    if hasattr(cls, "model_fields"):  # pydantic
        from pydantic_core import PydanticUndefined

        out = []
        for name, info in cls.model_fields.items():
            default = info.default
            if default is PydanticUndefined:
                default = info.default_factory() if info.default_factory else REQUIRED
            out.append(Setting(name, info.annotation, default, info.description or ""))
        return out
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(Setting(f.name, hints[f.name], default, f.metadata.get("help", "")))
    return out


def strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def choices_of(tp) -> list[str] | None:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [str(m.value) for m in tp]
    if typing.get_origin(tp) is Literal:
        return [str(v) for v in typing.get_args(tp)]
    return None


def parameter(s: Setting, opt: Opt, panel: str | None) -> inspect.Parameter:
    """The typer parameter of one field."""
    tp = strip_optional(s.type)
    repeated = typing.get_origin(tp) in (tuple, list)
    item = typing.get_args(tp)[0] if repeated else tp
    choices = choices_of(item)
    if choices is None and item not in SCALARS:
        raise TypeError(f"{s.name}: {s.type} has no command-line form; exclude it or give it an option of its own")
    if repeated and (choices or item is bool):
        raise TypeError(f"{s.name}: a repeated {item} has no command-line form")
    flags = list(opt.flags) or ["--" + s.name.replace("_", "-")]
    if item is bool and "/" not in flags[0]:
        flags[0] = f"{flags[0]}/--no-{flags[0].removeprefix('--')}"
    help_text = escape(s.help + opt.help + (" (repeatable)" if repeated else "")
                       + listed(choices, _shown_default(s, opt, flags[0])))
    if opt.argument:
        info = typer.Argument(help=help_text, show_default=False)
        annotation = item if s.default is REQUIRED else Optional[item]
        default = REQUIRED if s.default is REQUIRED else None
        return inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[annotation, info])
    kwargs = dict(help=help_text, show_default=False, rich_help_panel=panel and escape(panel), envvar=opt.envvar,
                  show_envvar=False)
    value_type = str if choices else item
    if choices:
        kwargs |= dict(metavar="<choice>", callback=choice_check(flags[0], item, choices))
    elif repeated:
        kwargs |= dict(metavar=f"<{item.__name__}>")
    info = typer.Option(*flags, **kwargs)
    annotation = list[value_type] if repeated else value_type
    if s.default is REQUIRED:
        return inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, info])
    return inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[annotation], info])


def _shown_default(s: Setting, opt: Opt, flag: str) -> str:
    """The class's default as a user would type it; nothing for 'not set' (the help says what happens then)."""
    value = s.default
    if not opt.show_default or value is REQUIRED or value is None or value in ((), [], "") or value is False:
        return ""
    if value is True:  # "--bos/--no-bos" is on unless --no-bos
        return flag.split("/")[0]
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return ", ".join(map(str, value))
    return str(value).replace("\n", "\\n").replace("\t", "\\t")


def listed(choices: list[str] | None, default: str | None) -> str:
    """The choices and the default after an option's help. The choices go there, not into the type column,
    where a long list (the engines) would squeeze the options' names on an 80-column terminal."""
    return (f" [choices: {', '.join(choices)}]" if choices else "") + (f" [default: {default}]" if default else "")


class ChoiceError(typer.BadParameter):
    """A value outside an option's choices; printed as one line (`LazyCommand.parse_args`)."""


def choice_check(flag: str, kind, choices: list[str]):
    """Check a value against the choices while the command line is parsed; give the Enum member for an Enum."""

    def check(value):
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        for one in values:
            if one not in choices:
                raise ChoiceError(f"{flag}={one!r} is not allowed; use one of {', '.join(choices)}")
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return [kind(v) for v in values] if isinstance(value, list) else kind(value)
        return value

    return check


def choice_option(kind, flag: str, *more_flags: str, help: str = "", default: str | None = None):
    """A typer Option for a command's own parameter with the choices of an Enum or Literal, listed and checked.

    `kind` may be "module:Name", imported when the command is built.
    """
    if isinstance(kind, str):
        module, name = kind.split(":")
        kind = getattr(importlib.import_module(module), name)
    choices = choices_of(kind)
    return typer.Option(flag, *more_flags, help=escape(help + listed(choices, default)), metavar="<choice>",
                        show_default=False,
                        callback=choice_check(flag, kind, choices))


def expand(func: Callable) -> Callable:
    """`func` with each `Annotated[dict, FromSettings(...)]` parameter replaced by the fields' options.

    The returned callable takes every option as a keyword and calls `func` with the fields given collected
    into a dict under that parameter's name.
    """
    signature = inspect.signature(func, eval_str=True)
    params, sources = [], {}
    for p in signature.parameters.values():
        spec = next((m for m in getattr(p.annotation, "__metadata__", ()) if isinstance(m, FromSettings)), None)
        if spec is not None:
            sources[p.name] = spec.bind()
            params += sources[p.name].parameters()
        else:  # the command's own input, declared in its signature
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    names = [p.name for p in params]
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise TypeError(f"{func.__name__}: options declared twice: {', '.join(sorted(repeated))}")

    def call(**values):
        given = {name: bound.collect(values) for name, bound in sources.items()}
        return func(**values, **given)

    call.__name__, call.__doc__ = func.__name__, func.__doc__
    call.__signature__ = inspect.Signature(params)
    call.__annotations__ = {}
    return call


class LazyCommand(TyperCommand):
    """A command whose parameters are built on first use, so that listing the commands imports nothing heavy.

    Typer builds every command when the app starts; this one starts with no parameters and builds them
    (with `build`, which imports the settings classes) the first time its parameters or callback are read:
    for its --help, a run, or completion.
    """

    build: Callable[[], TyperCommand]

    def __init__(self, *args, **kwargs):
        self.__dict__["_built"] = False
        super().__init__(*args, **kwargs)
        self.__dict__["_ready"] = True

    def _materialize(self) -> None:
        if self.__dict__.get("_ready") and not self.__dict__["_built"]:
            self.__dict__["_built"] = True
            real = type(self).build()
            self.__dict__["_params"], self.__dict__["_callback"] = real.params, real.callback

    @property
    def params(self):
        self._materialize()
        return self.__dict__["_params"]

    @params.setter
    def params(self, value) -> None:
        self.__dict__["_params"] = value

    @property
    def callback(self):
        self._materialize()
        return self.__dict__["_callback"]

    @callback.setter
    def callback(self, value) -> None:
        self.__dict__["_callback"] = value

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """A bad value of an option is one line on stderr and exit code 2, as every other user error."""
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as exc:
            from rugpt.cli.app import print_error

            if isinstance(exc, ChoiceError):  # names the value and every choice already
                print_error(exc.message)
            else:
                print_error(f"{exc.format_message()} (see {ctx.command_path} --help)")
            raise typer.Exit(2) from None


def lazy_command(app: typer.Typer, func: Callable, name: str) -> None:
    """Register `func` on `app` as `name`, its options built from its signature on first use."""
    from typer.main import get_command_from_info
    from typer.models import CommandInfo

    def stub() -> None:  # what typer sees when the app starts: the name and help, no parameters
        raise AssertionError("replaced when the command is built")

    stub.__name__, stub.__doc__ = func.__name__, func.__doc__

    def build() -> TyperCommand:
        return get_command_from_info(CommandInfo(name=name, callback=expand(func)),
                                     pretty_exceptions_short=app.pretty_exceptions_short,
                                     rich_markup_mode=app.rich_markup_mode)

    cls = type(f"{func.__name__.title()}Command", (LazyCommand,), {"build": staticmethod(build)})
    app.command(name=name, cls=cls)(stub)
