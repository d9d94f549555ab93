"""`rugpt prompt-tune` takes the choices of ruPrompts' `ruprompts-train` (formats, provider kinds and their
settings, text2text data with target and truncation fields, CSV / TSV / JSONL files with a validation file,
the schedulers), and docs/prompt_tuning.md maps every one of its config options."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rugpt.cli import app
from rugpt.errors import UsageError
from rugpt.prompts import LSTMPromptProvider, Prompt, TensorPromptProvider
from rugpt.prompts.training import PromptTuningSettings, lr_factor, read_rows

DOCS = Path(__file__).resolve().parents[2] / "docs" / "prompt_tuning.md"
PAIRS = [("Ты дурак", "Ты не прав"), ("Отвали", "Уйди, пожалуйста"), ("Заткнись уже", "Помолчи, пожалуйста"),
         ("Тупой вопрос", "Странный вопрос"), ("Бред какой", "Не согласен"), ("Иди отсюда", "Оставь меня")]


def write_table(path: Path, rows, delimiter: str) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["toxic", "polite"])
        writer.writerows(rows)
    return path


def test_the_hydra_cli_example_as_flags(tiny_model_dir, tmp_path):
    """ruprompts-train task=text2text prompt_provider=lstm +dataset=from_tsv ... prompt_format.template=...
    preprocessing.target_field=polite preprocessing.truncation_field=toxic preprocessing.max_tokens=...
    scheduler=cosine_annealing_warm_restarts training.gradient_accumulation_steps=2"""
    train = write_table(tmp_path / "train.tsv", PAIRS, "\t")
    dev = write_table(tmp_path / "dev.tsv", PAIRS[:2], "\t")
    result = CliRunner().invoke(app, [
        "prompt-tune", str(train), "--eval", str(dev), "--model", str(tiny_model_dir), "--out", str(tmp_path / "p"),
        "--format", "<P*3>{toxic}<P*2>", "--target-field", "polite", "--truncation-field", "toxic",
        "--max-tokens", "48", "--provider", "lstm", "--input-dim", "4", "--hidden-dim", "8", "--num-lstm-layers", "1",
        "--scheduler", "cosine_restarts", "--restart-steps", "1", "--gradient-accumulation-steps", "2",
        "--batch-size", "2", "--lr", "0.01", "--epochs", "1", "--seed", "1"])
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "p" / "history.json").read_text())
    assert history["epochs"][0]["steps"] == 2  # 6 rows, batches of 2, two batches per step
    prompt = Prompt.from_pretrained(tmp_path / "p")
    assert isinstance(prompt.provider, LSTMPromptProvider)
    assert (prompt.provider.hidden_dim, prompt.provider.input_dim, prompt.provider.num_lstm_layers) == (8, 4, 1)


def test_csv_data_and_tensor_init(tiny_model_dir, tmp_path):
    train = write_table(tmp_path / "train.csv", PAIRS, ",")
    result = CliRunner().invoke(app, [
        "prompt-tune", str(train), "--model", str(tiny_model_dir), "--out", str(tmp_path / "p"),
        "--format", "<P*2>{toxic}<P>", "--target-field", "polite", "--init", "random", "--scheduler", "constant",
        "--warmup-steps", "0", "--epochs", "1", "--batch-size", "3", "--eval-fraction", "0"])
    assert result.exit_code == 0, result.output
    prompt = Prompt.from_pretrained(tmp_path / "p")
    assert isinstance(prompt.provider, TensorPromptProvider) and prompt.provider.init == "random"


def test_bad_choices_are_one_line_errors(tiny_model_dir, tmp_path):
    train = write_table(tmp_path / "train.tsv", PAIRS, "\t")
    runner = CliRunner()
    for flags, message in ((["--scheduler", "cosine"], "scheduler='cosine'"),
                           (["--init", "zeros"], "init='zeros'"),
                           (["--provider", "lstm", "--init", "random"], "needs provider='tensor'")):
        result = runner.invoke(app, ["prompt-tune", str(train), "--model", str(tiny_model_dir), "--format",
                                     "<P*2>{toxic}", "--target-field", "polite", *flags])
        assert result.exit_code == 2 and message in result.output, result.output


def test_settings_build_the_providers_ruprompts_configs_name():
    lstm = PromptTuningSettings(format="<P*2>{x}", provider="lstm", input_dim=16, hidden_dim=256).make_provider()
    assert (lstm.input_dim, lstm.hidden_dim, lstm.num_lstm_layers) == (16, 256, 2)  # conf/prompt_provider/lstm.yaml
    tensor = PromptTuningSettings(format="<P*2>{x}").make_provider()
    assert tensor.init == "vocab"  # conf/prompt_provider/tensor.yaml
    with pytest.raises(UsageError, match="gradient_accumulation_steps=0"):
        PromptTuningSettings(format="<P*2>{x}", gradient_accumulation_steps=0)


def test_schedules():
    linear, constant = lr_factor("linear", 2, 10), lr_factor("constant", 2, 10)
    assert [round(linear(s), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.5, 0.0]
    assert [constant(s) for s in (2, 5, 9)] == [1.0, 1.0, 1.0]
    cosine = lr_factor("cosine_restarts", 0, 100, restart_steps=4)  # cycles of 4, 8, 16 steps
    assert cosine(0) == cosine(4) == cosine(12) == 1.0
    assert cosine(2) == pytest.approx(0.5) and cosine(8) == pytest.approx(0.5)
    assert cosine(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_read_rows_by_suffix(tmp_path):
    row = [{"toxic": "Ты дурак", "polite": "Ты не прав"}]
    assert read_rows(write_table(tmp_path / "a.tsv", PAIRS[:1], "\t")) == row
    assert read_rows(write_table(tmp_path / "a.csv", PAIRS[:1], ",")) == row
    (tmp_path / "a.jsonl").write_text('{"toxic": "x", "polite": "y"}\n', encoding="utf-8")
    assert read_rows(tmp_path / "a.jsonl") == [{"toxic": "x", "polite": "y"}]


# ruprompts 0.1.4's conf/: every group option and every setting a user overrides, as the docs table must name them
RUPROMPTS_OPTIONS = [
    "task=text2text", "task.task_name", "backbone=rugpt3small", "rugpt3medium", "rugpt3large", "model=default",
    "model=gpt", "tokenizer=autotokenizer", "tokenizer=rugpt3", "dataset=from_jsonl", "dataset.data_files.train",
    "dataset.data_files.validation", "dataset=from_csv", "dataset=from_tsv", "dataset=default",
    "prompt_format.template", "prompt_provider=tensor", "prompt_provider=lstm", "input_dim", "hidden_dim",
    "preprocessing=text2text", "preprocessing.target_field", "preprocessing.truncation_field",
    "preprocessing.max_tokens", "optimizer=adamw", "training.learning_rate", "scheduler=linear_schedule_with_warmup",
    "num_warmup_steps", "scheduler=constant_schedule_with_warmup", "scheduler=cosine_annealing_warm_restarts", "T_0",
    "T_mult", "training.per_device_train_batch_size", "training.gradient_accumulation_steps", "training.max_steps",
    "training.eval_steps", "save_steps", "save_total_limit", "metric_for_best_model", "training.logging_steps",
    "report_to", "training.seed", "freeze_transformer_unfreeze_prompt", "reduce_checkpoint", "save_pretrained_prompt",
    "wb_log_hydra_config", "hydra.run.dir",
]


def test_docs_map_every_ruprompts_train_option_to_a_flag():
    section = DOCS.read_text(encoding="utf-8").split("## `ruprompts-train` options")[1].split("\n## ")[0]
    left = "\n".join(line.split(" | ")[0] for line in section.splitlines() if line.startswith("|"))
    missing = [option for option in RUPROMPTS_OPTIONS if option not in left]
    assert not missing, missing
    flags = set(re.findall(r"--[a-z][a-z-]*", section))
    help_text = CliRunner().invoke(app, ["prompt-tune", "--help"], terminal_width=200).output
    assert flags and all(flag[:20] in help_text for flag in flags), flags - {f for f in flags if f[:20] in help_text}
