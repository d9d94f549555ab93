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
