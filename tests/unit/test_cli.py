import json

import pytest
from typer.testing import CliRunner

from rugpt.cli import app

runner = CliRunner()


def run(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin)


def test_generate_json_greedy_is_repeatable(tiny_model_dir):
    args = ("generate", "Жили-были", "--model", str(tiny_model_dir), "--preset", "greedy",
            "--max-new-tokens", "6", "--json")
    first, second = run(*args), run(*args)
    assert first.exit_code == 0, first.output
    payload = json.loads(first.stdout)
    assert payload["engine"] == "fast-fp32" and payload["prompt"] == "Жили-были"
    assert len(payload["completions"][0]["token_ids"]) <= 6
    assert first.stdout == second.stdout


def test_generate_engine_override_is_reported(tiny_model_dir):
    result = run("generate", "Жили-были", "--model", str(tiny_model_dir), "--engine", "transformers",
                 "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["engine"] == "transformers"
    bad = run("generate", "Жили-были", "--model", str(tiny_model_dir), "--engine", "warp")
    assert bad.exit_code == 2 and "engine='warp'" in bad.stderr


def test_generate_reads_stdin(tiny_model_dir):
    result = run("generate", "-", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--json", stdin="Привет")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "Привет"


def test_generate_streams_prompt_then_text(tiny_model_dir):
    from rugpt.generation import GenerationSettings, Generator

    result = run("generate", "Жили-были", "--model", str(tiny_model_dir), "--preset", "greedy", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    expected = Generator(str(tiny_model_dir)).generate("Жили-были", GenerationSettings.from_preset("greedy",
                                                                                               max_new_tokens=4))
    assert expected.text and result.stdout.rstrip("\n") == "Жили-были" + expected.text


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--temperature", "0"), "temperature=0.0"),
        (("--top-p", "1.5"), "top_p=1.5"),
        (("--max-new-tokens", "0"), "max_new_tokens=0"),
        (("--preset", "wild"), "preset='wild'"),
        (("--model", "huge"), "unknown model 'huge'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_model_dir, args, needle):
    model_args = () if "--model" in args else ("--model", str(tiny_model_dir))
    result = run("generate", "Привет", *model_args, *args)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_empty_prompt_exits_2(tiny_model_dir):
    result = run("generate", "", "--model", str(tiny_model_dir))
    assert result.exit_code == 2 and "prompt is empty" in result.stderr


def test_models_lists_the_family():
    result = run("models", "--json")
    assert result.exit_code == 0
    rows = {r["alias"]: r for r in json.loads(result.stdout)}
    assert rows["small"]["hub_id"] == "ai-forever/rugpt3small_based_on_gpt2"
    assert rows["xl"]["hub_id"] == "evilfreelancer/ruGPT3XL"
    table = run("models")
    assert table.exit_code == 0 and "ai-forever/rugpt3small_based_on_gpt2" in table.stdout


def test_tokenize_json(tiny_model_dir):
    result = run("tokenize", "Привет, мир", "--model", str(tiny_model_dir), "--json")
    assert result.exit_code == 0, result.output
    views = json.loads(result.stdout)
    assert "".join(v["text"] for v in views) == "Привет, мир"


def test_tokenize_counts_the_characters_read_from_stdin(tiny_model_dir):
    result = run("tokenize", "-", "--model", str(tiny_model_dir), stdin="Привет")
    assert result.exit_code == 0, result.output
    assert "6 characters" in result.stdout.replace("\n", " ")


# --- options come from the settings classes (cli/options.py) ---------------------------------------------------


def wide_help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "2000"})  # one line per option
    assert result.exit_code == 0, result.output
    return result.output


def command_params(name: str) -> dict:
    from typer.main import get_command

    return {p.name: p for p in get_command(app).commands[name].params}


def test_every_finetune_setting_is_an_option_with_its_help():
    import dataclasses

    from rugpt.training.settings import FinetuneSettings

    params = command_params("finetune")
    fields = dataclasses.fields(FinetuneSettings)
    assert {f.name for f in fields} | {"plan"} == set(params)
    assert params["data"].param_type_name == "argument"
    shown = wide_help("finetune")
    for f in fields:
        if f.name != "data":
            assert "--" + f.name.replace("_", "-") in shown, f.name
    assert "--no-gradient-checkpointing" in shown and "-o" in params["out"].opts
    assert "[default: 0.1]" in shown  # eval_fraction's default, read from the class


def test_finetune_help_lists_the_choices_of_each_enum():
    from rugpt.training.settings import LossOn, Method, Optimizer, Precision, Schedule

    shown = wide_help("finetune")
    for enum in (Method, LossOn, Schedule, Optimizer, Precision):
        assert "[choices: " + ", ".join(m.value for m in enum) + "]" in shown, enum


def test_a_bad_choice_exits_2_naming_the_value_and_the_choices(tmp_path):
    result = run("finetune", str(tmp_path / "data.txt"), "--out", str(tmp_path / "run"), "--method", "bad")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --method='bad' is not allowed; use one of full, lora"]
    assert not (tmp_path / "run").exists()


def test_a_good_choice_reaches_the_settings_as_the_enum(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import rugpt.training.finetune
    from rugpt.training.settings import LossOn, Method

    seen = {}
    planned = SimpleNamespace(describe=lambda: "planned")
    monkeypatch.setattr(rugpt.training.finetune, "plan", lambda **given: seen.update(given) or planned)
    result = run("finetune", str(tmp_path / "d.txt"), "--out", str(tmp_path / "r"), "--method", "lora",
                 "--loss-on", "answer", "--lora-targets", "c_attn", "--lora-targets", "c_proj", "--merge",
                 "--template", "Q: {q}\\nA: {a}", "--plan")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "planned"
    assert seen["method"] is Method.lora and seen["loss_on"] is LossOn.answer
    assert seen["lora_targets"] == ("c_attn", "c_proj") and seen["merge"] is True
    assert seen["template"] == "Q: {q}\nA: {a}"
    assert "lr" not in seen and "epochs" not in seen  # options not given keep the class's defaults


def test_a_field_added_to_a_settings_class_becomes_an_option(monkeypatch):
    from dataclasses import dataclass, field

    from rugpt.generation import GenerationSettings

    @dataclass
    class WithKnob(GenerationSettings):
        knob_level: int = field(default=3, metadata={"help": "a knob a test added"})

    monkeypatch.setattr("rugpt.generation.GenerationSettings", WithKnob)
    shown = wide_help("generate")
    assert "--knob-level" in shown and "a knob a test added [default: 3]" in shown


def test_the_generator_maps_each_kind_of_field():
    import enum
    from dataclasses import dataclass, field
    from pathlib import Path
    from typing import Annotated, Literal

    import typer

    from rugpt.cli.options import FromSettings, Opt, lazy_command

    class Colour(str, enum.Enum):
        red = "red"
        blue = "blue"

    @dataclass
    class Demo:
        name: str = field(metadata={"help": "required name"})
        colour: Colour = field(default=Colour.red, metadata={"help": "a colour"})
        size: Literal["s", "m"] = field(default="s", metadata={"help": "a size"})
        loud: bool = field(default=True, metadata={"help": "be loud"})
        tags: tuple[str, ...] = field(default=(), metadata={"help": "tags"})
        where: Path | None = field(default=None, metadata={"help": "a [bracketed] place"})
        ratio: float = field(default=0.5, metadata={"help": "a ratio"})

    seen = {}

    def demo(given: Annotated[dict, FromSettings(Demo, opts={"name": Opt("--name", "-n")})]) -> None:
        seen.update(given)

    demo_app = typer.Typer()
    lazy_command(demo_app, demo, "demo")
    demo_app.command("other")(lambda: None)
    args = ["demo", "-n", "x", "--colour", "blue", "--size", "m", "--no-loud", "--tags", "a", "--tags", "b",
            "--where", "p", "--ratio", "2"]
    result = runner.invoke(demo_app, args)
    assert result.exit_code == 0, result.output
    assert seen == {"name": "x", "colour": Colour.blue, "size": "m", "loud": False, "tags": ("a", "b"),
                    "where": Path("p"), "ratio": 2.0}
    seen.clear()
    assert runner.invoke(demo_app, ["demo", "-n", "y"]).exit_code == 0 and seen == {"name": "y"}
    shown = runner.invoke(demo_app, ["demo", "--help"], env={"COLUMNS": "200"}).output
    assert "[choices: red, blue] [default: red]" in shown and "[choices: s, m]" in shown
    assert "[default: --loud]" in shown
    assert "a [bracketed] place" in shown  # help text is text, not Rich markup
    bad = runner.invoke(demo_app, ["demo", "-n", "x", "--size", "xl"])
    assert bad.exit_code == 2 and "--size='xl' is not allowed; use one of s, m" in bad.stderr


def test_cli_help_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from rugpt.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['finetune', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_engine_names_and_their_help_come_from_one_registry():
    from rugpt.engines import EngineChoice
    from rugpt.serve.settings import ServerSettings

    shown = wide_help("generate")
    served = ServerSettings.model_fields["engine"].description
    assert "[choices: " + ", ".join(c.value for c in EngineChoice) + "]" in shown
    for choice in EngineChoice:
        assert choice.description and f"{choice.value}: {choice.description}" in served
        assert choice.description.split()[0] in shown


def test_error_lines_are_text_not_markup(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("Мороз и солнце.\n", encoding="utf-8")
    result = run("finetune", str(data), "--out", str(tmp_path / "r"), "--max-memory", "[/x][cluster]", "--plan")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: max_memory='[/x][cluster]' is not a size; write e.g. 16GB, 12.5GiB or 800MB"]


def test_the_memory_planner_is_public():
    import rugpt
    from rugpt.training.finetune import plan
    from rugpt.training.plan import TrainingPlan

    assert rugpt.plan_finetune is plan and rugpt.TrainingPlan is TrainingPlan
    assert {"plan_finetune", "TrainingPlan"} <= set(rugpt.__all__)
