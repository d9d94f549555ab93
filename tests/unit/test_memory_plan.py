"""The memory planner: sizes, the search (fastest plan that fits, what the user fixed kept), the refusal
sentence, and the estimate against the measured peak of real runs in a fresh process (within 15%)."""

import json

import pytest
from _finetune_helpers import (
    measured_and_estimated_peak,
    poems_txt,
)
from typer.testing import CliRunner

from rugpt.cli import app
from rugpt.errors import UsageError
from rugpt.training.memory import ModelShape, RunShape, measure_activations
from rugpt.training.plan import choose_plan
from rugpt.training.settings import FinetuneSettings, Optimizer, parse_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

GB = 10**9


def settings(**fields):
    return FinetuneSettings(data="d.txt", out="o", **fields)


def test_sizes_parse_and_bad_ones_name_the_value():
    assert parse_size("16GB") == 16 * GB and parse_size("1.5GiB") == 3 * 2**29 and parse_size("800 mb") == 8 * 10**8
    with pytest.raises(UsageError, match=r"max_memory='lots' is not a size; write e.g. 16GB"):
        settings(max_memory="lots")


def small_like(layers=12, width=768, heads=12, vocab=50264):
    from transformers import GPT2Config

    return ModelShape.from_config(GPT2Config(vocab_size=vocab, n_positions=1024, n_layer=layers, n_embd=width,
                                             n_head=heads))


@pytest.fixture(scope="module")
def small():
    """ruGPT-3 small's shape on the meta device (no weights) and its activations at block 1024 on a CPU."""
    shape = small_like()
    run = RunShape(block=1024, lora=None, quantize_base=False, device_type="cpu", autocast=None)
    return shape, run, measure_activations(shape, run)


def plan_for(small, budget_gb, **fields):
    shape, run, activations = small
    return choose_plan(settings(batch_size=8, **fields), 1, shape, run, int(budget_gb * GB), baseline=0,
                       activations=activations)


def test_the_fastest_plan_that_fits_is_chosen(small):
    roomy = plan_for(small, 100)
    assert (roomy.batch.micro, roomy.batch.accumulation) == (1, 8)  # one 1024-token block saturates a CPU
    assert not roomy.gradient_checkpointing and roomy.optimizer == Optimizer.adamw
    tight = plan_for(small, roomy.peak / GB - 0.1)
    assert tight.gradient_checkpointing and tight.optimizer == Optimizer.adamw and tight.peak < roomy.peak
    tighter = plan_for(small, tight.peak / GB - 0.1)
    assert tighter.optimizer == Optimizer.adafactor and tighter.peak < tight.peak
    assert "adafactor" in tighter.describe() and "estimated peak" in tighter.describe()


def test_what_the_user_fixed_is_kept(small):
    plan = plan_for(small, 100, micro_batch_size=4, gradient_checkpointing=True, optimizer="adafactor")
    assert (plan.batch.micro, plan.gradient_checkpointing, plan.optimizer) == (4, True, Optimizer.adafactor)
    assert plan_for(small, 100, micro_batch_size=2).peak > plan_for(small, 100).peak


def test_nothing_fits_gives_one_sentence_with_what_would(small):
    with pytest.raises(UsageError) as caught:
        plan_for(small, 1.5)
    message = str(caught.value)
    assert "over the 1.50 GB allowed (--max-memory); --method lora would fit (about" in message
    assert "\n" not in message
    with pytest.raises(UsageError, match="leaving micro-batch, checkpointing and optimizer to the planner would fit"):
        plan_for(small, 6.0, micro_batch_size=8, gradient_checkpointing=False)


def test_plan_flag_prints_without_loading_and_refusal_is_one_line(tiny_model_dir, tmp_path):
    data = poems_txt(tmp_path / "poems.txt")
    runner = CliRunner()
    shown = runner.invoke(app, ["finetune", str(data), "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir),
                                "--plan", "--batch-size", "4"])
    assert shown.exit_code == 0, shown.output
    assert "plan: micro-batch 4 × 1 accumulated" in shown.stdout and "estimated peak" in shown.stdout
    assert not (tmp_path / "run").exists()
    refused = runner.invoke(app, ["finetune", str(data), "--out", str(tmp_path / "run"), "--model",
                                  str(tiny_model_dir), "--max-memory", "1MB"])
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "over the 0.00 GB allowed" in refused.stderr and not (tmp_path / "run").exists()


def test_the_run_records_its_plan_and_a_resume_keeps_its_optimizer(tiny_model_dir, tmp_path):
    from rugpt.training.finetune import finetune, plan

    data = poems_txt(tmp_path / "poems.txt")
    options = {"block_size": 32, "batch_size": 4, "max_steps": 2, "save_every": 1, "eval_fraction": 0}
    finetune(data, tmp_path / "run", str(tiny_model_dir), optimizer="adafactor", **options)
    recorded = json.loads((tmp_path / "run" / "finetune.json").read_text())["plan"]
    assert recorded["optimizer"] == "adafactor" and recorded["estimated_peak_bytes"] > 0
    resumed = plan(data, tmp_path / "run", str(tiny_model_dir), resume=True, optimizer="adafactor", **options)
    assert resumed.optimizer == Optimizer.adafactor


# Shapes scaled down from ruGPT-3 small (head size 64, its vocabulary, a long block) so that each term of the
# estimate — weights and optimizer, activations with attention matrices, the chunked loss — is a real share.
MEASURED_CASES = {
    "full, AdamW": ({"n_layer": 4, "n_embd": 192, "n_head": 3}, {"batch_size": 4, "micro_batch_size": 2}),
    "full, checkpointing, Adafactor": ({"n_layer": 4, "n_embd": 256, "n_head": 4},
                                       {"batch_size": 4, "micro_batch_size": 2, "gradient_checkpointing": True,
                                        "optimizer": "adafactor"}),
    "LoRA over int8": ({"n_layer": 4, "n_embd": 256, "n_head": 4},
                       {"batch_size": 2, "micro_batch_size": 2, "method": "lora", "quantize_base": True}),
}


@pytest.mark.parametrize("case", MEASURED_CASES)
def test_estimate_is_within_15_percent_of_the_measured_peak(case, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rugpt.models import BUNDLED_DIR

    shape, options = MEASURED_CASES[case]
    GPT2LMHeadModel(GPT2Config(vocab_size=50264, n_positions=512, bos_token_id=0, eos_token_id=0, **shape)) \
        .save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(BUNDLED_DIR).save_pretrained(tmp_path / "model")
    data = poems_txt(tmp_path / "poems.txt", documents=200)
    peak = measured_and_estimated_peak(tmp_path / "model", data, block_size=512, max_steps=2, **options)
    assert peak["measured"] == pytest.approx(peak["estimated"], rel=0.15), peak
