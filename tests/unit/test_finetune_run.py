"""Fine-tuning end to end on a tiny GPT-2: the CLI, the run folder and its guards, bad input, LoRA, early stopping."""

import hashlib

import pytest
import torch
from _finetune_helpers import (
    metrics,
    poems_txt,
    qa_jsonl,
    tiny_gpt2,
)
from typer.testing import CliRunner

from rugpt.cli import app
from rugpt.training.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

FAST = {"block_size": 32, "batch_size": 4, "max_steps": 6, "eval_every": 3, "save_every": 3, "lr": 1e-3}
FAST_ARGS = ["--block-size", "32", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--save-every", "3",
             "--lr", "1e-3"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("tiny"), dropout=0.1)


@pytest.fixture
def poems(tmp_path):
    return poems_txt(tmp_path / "poems.txt")


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_run_writes_a_model_that_loads_everywhere_and_guards_its_folder(model_dir, poems, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = cli("finetune", poems, "--model", model_dir, "--out", out, *FAST_ARGS)
    assert result.exit_code == 0, result.output
    assert "held-out perplexity:" in result.stdout
    m = metrics(out)
    assert m["steps"] == 6 and m["eval_loss_after"] < m["eval_loss_before"]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "held-out perplexity" in card and "rugpt finetune" in card and "6 optimizer steps" in card
    AutoModelForCausalLM.from_pretrained(out)
    generated = cli("generate", "Мороз и", "--model", out, "--preset", "greedy", "--max-new-tokens", "3", "--json")
    assert generated.exit_code == 0, generated.output

    before = digest(out)
    refused = cli("finetune", poems, "--model", model_dir, "--out", out, *FAST_ARGS)
    assert refused.exit_code == 2
    assert "holds another run (its latest checkpoint is step-000006); pass --resume" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    changed = cli("finetune", poems, "--model", model_dir, "--out", out, *FAST_ARGS, "--resume", "--lr", "0.5")
    assert changed.exit_code == 2 and "cannot resume" in changed.stderr and "lr: 0.001 → 0.5" in changed.stderr
    assert digest(out) == before
    assert cli("finetune", poems, "--model", model_dir, "--out", out, *FAST_ARGS, "--overwrite").exit_code == 0


def test_a_folder_that_is_not_a_run_is_never_overwritten(model_dir, poems, tmp_path):
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    refused = cli("finetune", poems, "--model", model_dir, "--out", other, *FAST_ARGS, "--overwrite")
    assert refused.exit_code == 2 and "holds no fine-tuning run" in refused.stderr
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("case, needle", [
    ("empty", "holds no text"),
    ("missing-field", "bad.jsonl:2: no value for {answer} in template 'Q: {question}\\nA: {answer}' (given: question)"),
    ("not-utf8", "not UTF-8 text at byte offset 3"),
    ("block-size", "block_size=100 is over the model's context of 64 tokens"),
    ("one-document", "has 1 document"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(model_dir, tmp_path, case, needle):
    data, extra = tmp_path / "bad.txt", []
    if case == "empty":
        data.write_text("\n\n")
    elif case == "missing-field":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"question": "а", "answer": "б"}\n{"question": "в"}\n', encoding="utf-8")
        extra = ["--template", "Q: {question}\\nA: {answer}"]
    elif case == "not-utf8":
        data.write_bytes(b"abc\xff")
    elif case == "block-size":
        poems_txt(data)
        extra = ["--block-size", "100"]
    else:
        data.write_text("Один документ без пустых строк.", encoding="utf-8")
    out = tmp_path / "run"
    result = cli("finetune", data, "--model", model_dir, "--out", out, "--max-steps", "2", *extra)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_lora_trains_only_adapters_and_merge_writes_plain_weights(model_dir, poems, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    adapter = finetune(poems, tmp_path / "adapter", str(model_dir), method="lora", **FAST)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")  # transformers loads base + adapter (PEFT)

    merged_run = finetune(poems, tmp_path / "merged", str(model_dir), method="lora", merge=True, **FAST)
    assert merged_run.train_loss == pytest.approx(adapter.train_loss, abs=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged) is GPT2LMHeadModel and not any("lora" in k for k in merged.state_dict())
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(".attn.c_attn.weight" in k for k in changed)  # only where the adapters were


def test_loss_on_answer_trains_from_a_jsonl_template(model_dir, tmp_path):
    data = qa_jsonl(tmp_path / "qa.jsonl")
    result = cli("finetune", data, "--model", model_dir, "--out", tmp_path / "qa", *FAST_ARGS,
                 "--template", "Вопрос: {question}\\nОтвет: {answer}", "--loss-on", "answer")
    assert result.exit_code == 0, result.output
    assert "Вопрос: {question}\\nОтвет: {answer}" in (tmp_path / "qa" / "README.md").read_text()


def test_early_stopping_ends_the_run(model_dir, poems, tmp_path):
    result = finetune(poems, tmp_path / "run", str(model_dir), **(FAST | {"lr": 3.0, "eval_every": 1, "max_steps": 30}),
                      patience=2, schedule="constant", warmup_steps=0)
    assert result.stopped == "early stopping" and result.steps < 30


def test_token_loss_sum_counts_only_target_tokens(tiny):
    from rugpt.training.data import Blocks
    from rugpt.training.finetune import _token_loss_sum
    from rugpt.training.loss import NextTokenLoss

    torch.manual_seed(0)
    tokens = torch.randint(1, 50, (2, 9))
    targets = torch.ones_like(tokens, dtype=torch.bool)
    targets[1, :5] = False  # e.g. a question under --loss-on answer
    blocks = Blocks(tokens, targets, documents=2, token_count=18)
    model = tiny.model
    with torch.no_grad():
        loss, count = _token_loss_sum(NextTokenLoss(model), blocks, torch.tensor([0, 1]), "cpu")
        logprobs = torch.log_softmax(model(input_ids=tokens).logits.float(), dim=-1)
    expected = -sum(float(logprobs[r, t - 1, tokens[r, t]]) for r in range(2) for t in range(1, 9) if targets[r, t])
    assert int(count) == 8 + 4
    assert float(loss) == pytest.approx(expected, rel=1e-5)
