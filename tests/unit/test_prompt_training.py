"""Prompt tuning: preprocessing, the training loop, and its losses, optimizer and schedule from rugpt.training
(the numbers of a hand computation, and of the trainer as it was before it shared them)."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rugpt.cli import app
from rugpt.errors import DataError, UsageError
from rugpt.models import load
from rugpt.prompts import Prompt, PromptFormat, TensorPromptProvider
from rugpt.prompts.losses import classification_loss, evaluate, label_scores, text2text_loss, token_nll
from rugpt.prompts.preprocessing import IGNORE_INDEX, ClassificationPreprocessor, Text2TextPreprocessor, pad_right
from rugpt.prompts.training import PromptTuningSettings, prompt_tune

ROWS = [{"question": q, "answer": a} for q, a in [
    ("Столица России?", "Москва"), ("Столица Франции?", "Париж"), ("Столица Италии?", "Рим"),
    ("Столица Японии?", "Токио"), ("Столица Египта?", "Каир"), ("Столица Перу?", "Лима"),
]]
YES_NO = [{"text": t, "label": lab} for t, lab in [
    ("Снег белый", "Да"), ("Снег чёрный", "Нет"), ("Трава зелёная", "Да"), ("Трава синяя", "Нет"),
]]


@pytest.fixture
def lm(tiny_model_dir):
    return load(str(tiny_model_dir), device="cpu")


def patched_format(lm, template):
    prompt = Prompt(PromptFormat(template), TensorPromptProvider()).patch(lm.model, lm.tokenizer)
    return prompt.format


def test_text2text_labels_cover_exactly_the_target_and_end_of_text(lm):
    fmt = patched_format(lm, "<P*3>{question}<P*2>")
    row = Text2TextPreprocessor(fmt, lm.tokenizer, "answer")(ROWS[0])
    prompt_ids = lm.tokenizer(fmt(ROWS[0]), add_special_tokens=False)["input_ids"]
    target_ids = lm.tokenizer("Москва", add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id]
    assert row["input_ids"] == prompt_ids + target_ids
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_truncation_field_is_cut_so_the_whole_row_fits(lm):
    fmt = patched_format(lm, "<P*3>{passage}<P*2>{question}<P>")
    row = {"passage": "Мороз и солнце; день чудесный! " * 20, "question": "Какой день?", "answer": "чудесный"}
    pre = Text2TextPreprocessor(fmt, lm.tokenizer, "answer", max_tokens=40, truncation_field="passage")
    out = pre(row)
    assert len(out["input_ids"]) <= 40
    target = lm.tokenizer("чудесный", add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id]
    assert out["labels"][-len(target):] == target and out["input_ids"][-len(target):] == target
    assert out["input_ids"].count(lm.tokenizer.convert_tokens_to_ids("<|P|>")) == 6
    with pytest.raises(UsageError, match="question.*also appears"):
        Text2TextPreprocessor(fmt, lm.tokenizer, "question")


def test_preprocessing_before_patch_is_refused(lm):
    with pytest.raises(UsageError, match="patch"):
        Text2TextPreprocessor(PromptFormat("<P*2>{question}"), lm.tokenizer, "answer")(ROWS[0])


def test_classification_rows_hold_one_choice_per_label_word(lm):
    fmt = patched_format(lm, "<P*2>{text}<P>")
    pre = ClassificationPreprocessor(fmt, lm.tokenizer, "label", ("Да", "Нет"))
    row = pre(YES_NO[1])
    assert row["label"] == 1 and len(row["choices"]) == 2
    batch = pre.collate_fn()([row, pre(YES_NO[0])])
    assert batch["input_ids"].shape[0] == 4 and batch["label"].tolist() == [1, 0]
    with pytest.raises(UsageError, match="not one of the label words"):
        pre({"text": "x", "label": "Может"})


def test_only_the_prompt_trains_and_the_model_stays_bit_identical(lm, tmp_path):
    before = {name: t.clone() for name, t in lm.model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    settings = PromptTuningSettings(format="<P*4>{question}<P*2>", target_field="answer", epochs=2, batch_size=3,
                                    eval_fraction=0, learning_rate=0.05)
    seen = []
    result = prompt_tune(ROWS, settings, lm, out=tmp_path / "p",
                         on_step=lambda info: seen.append(result_weights(lm).clone()))
    assert not torch.equal(seen[0], result.prompt.provider.weights.detach())  # the prompt did train
    result.prompt.unpatch()
    after = lm.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: p.requires_grad for name, p in lm.model.named_parameters()} == flags
    assert {"prompt.json", "prompt_provider.safetensors", "history.json", "loss.png"} <= {
        f.name for f in (tmp_path / "p").iterdir()}


def result_weights(lm) -> torch.Tensor:
    return lm.model.get_input_embeddings().prompt_provider.weights.detach()


def test_loss_goes_down_on_a_tiny_task(lm):
    rows = [{"question": "Столица России?", "answer": "Москва"}] * 8
    # The tiny model's embeddings have std 1 (see conftest), so prompt rows need large steps to matter.
    settings = PromptTuningSettings(format="<P*2>{question}<P*4>", target_field="answer", epochs=5, batch_size=4,
                                    eval_fraction=0.25, learning_rate=0.3, patience=None, warmup_steps=0)
    result = prompt_tune(rows, settings, lm)
    losses = [result.initial_eval["loss"]] + [e.eval["loss"] for e in result.epochs]
    assert losses[-1] < 0.85 * losses[0] and losses == sorted(losses, reverse=True), losses
    assert result.step_losses[-1] < result.step_losses[0]


def test_classification_mode_learns_label_words(lm):
    # seed 2 starts far from chance (loss 5.2), so learning shows; seed 0 happens to start near ln 2 already
    settings = PromptTuningSettings(format="{text}<P*4>", target_field="label", task="classification", epochs=3,
                                    batch_size=4, learning_rate=0.1, eval_fraction=0, warmup_steps=0, seed=2)
    result = prompt_tune(YES_NO, settings, lm, eval_data=YES_NO)
    assert result.epochs[-1].eval["loss"] < 0.5 * result.initial_eval["loss"]
    assert 0 <= result.epochs[-1].eval["accuracy"] <= 1


def test_early_stopping_keeps_the_best_epoch(lm):
    settings = PromptTuningSettings(format="<P*4>{question}", target_field="answer", epochs=4, batch_size=6,
                                    learning_rate=3.0, patience=1, warmup_steps=0)  # absurd rate: eval loss wobbles
    result = prompt_tune(ROWS, settings, lm, eval_data=ROWS[:2])
    losses = [e.eval["loss"] for e in result.epochs]
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert result.stopped_early == (len(result.epochs) < 4)


def test_a_row_missing_a_field_names_its_row_number(lm, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [*ROWS[:2], {"question": "Где?"}, *ROWS[2:]]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    settings = PromptTuningSettings(format="<P*2>{question}", target_field="answer")
    with pytest.raises(DataError, match=r"data.jsonl: row 3: target field 'answer' is missing"):
        prompt_tune(path, settings, lm)
    bad_format = PromptTuningSettings(format="<P*2>{passage}", target_field="answer")
    with pytest.raises(DataError, match="row 1: field 'passage' is missing"):
        prompt_tune(ROWS, bad_format, lm)


def test_settings_validation_names_the_bad_value():
    with pytest.raises(UsageError, match="provider='gru'"):
        PromptTuningSettings(format="<P>{x}", provider="gru")
    with pytest.raises(UsageError, match="position 0"):
        PromptTuningSettings(format="<P*0>{x}")
    with pytest.raises(UsageError, match="neither"):
        PromptTuningSettings(format="just text")


def test_cli_prompt_tune_then_generate_with_the_prompt(tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["prompt-tune", str(data), "--format", "<P*3>{question}<P*2>", "--target-field",
                                 "answer", "--model", str(tiny_model_dir), "--out", str(tmp_path / "p"),
                                 "--epochs", "1", "--batch-size", "3", "--eval-fraction", "0.34"])
    assert result.exit_code == 0, result.output
    assert "epoch 1: train loss" in result.output and "prompt_provider.safetensors" in result.output
    result = runner.invoke(app, ["generate", "Столица Испании?", "--prompt-tuned", str(tmp_path / "p"), "--model",
                                 str(tiny_model_dir), "--max-new-tokens", "4", "--no-sample", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["prompt"].startswith("<|P|>" * 3) and len(payload["completions"][0]["token_ids"]) <= 4
    bad = runner.invoke(app, ["prompt-tune", str(data), "--format", "no slots here", "--model", str(tiny_model_dir)])
    assert bad.exit_code == 2 and "neither trainable slots" in bad.output


def by_hand(model, batch) -> list[list[float]]:
    """-log p(labels[t + 1] | tokens up to t) from the model's whole logits, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    out = []
    for row, labels in zip(logits, batch["labels"].tolist(), strict=True):
        nll = []
        for t in range(len(labels)):
            target = labels[t + 1] if t + 1 < len(labels) else IGNORE_INDEX
            nll.append(0.0 if target == IGNORE_INDEX else float(torch.logsumexp(row[t], 0) - row[t, target]))
        out.append(nll)
    return out


def test_text2text_loss_is_the_hand_computed_sum_over_target_tokens(lm):
    prompt = Prompt(PromptFormat("<P*3>{question}<P*2>"), TensorPromptProvider()).patch(lm.model, lm.tokenizer)
    pre = Text2TextPreprocessor(prompt.format, lm.tokenizer, "answer")
    batch = pad_right([pre(ROWS[0]), pre(ROWS[3])], lm.tokenizer.eos_token_id)  # different lengths: padding
    want = by_hand(lm.model, batch)
    with torch.no_grad():
        got = token_nll(lm.model, batch)
        loss, count = text2text_loss(lm.model, batch)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    targets = [len(lm.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in (ROWS[0], ROWS[3])]
    assert count == sum(targets)  # the answer's tokens and end-of-text, nothing of the prompt or the padding
    assert float(loss) == pytest.approx(sum(map(sum, want)), rel=1e-5)
    assert float(loss) > 10  # not a vacuous zero: the tiny model is far from these answers


def test_classification_loss_is_cross_entropy_over_hand_computed_label_scores(lm):
    prompt = Prompt(PromptFormat("{text}<P*4>"), TensorPromptProvider()).patch(lm.model, lm.tokenizer)
    pre = ClassificationPreprocessor(prompt.format, lm.tokenizer, "label", ("Да", "Нет"))
    batch = pre.collate_fn()([pre(row) for row in YES_NO[:2]])
    scores = [[-sum(row) for row in by_hand(lm.model, batch)[i:i + 2]] for i in (0, 2)]  # [rows, labels]
    want = sum(math.log(sum(math.exp(s) for s in row)) - row[gold] for row, gold in zip(scores, (0, 1), strict=True))
    with torch.no_grad():
        torch.testing.assert_close(label_scores(lm.model, batch).double(), torch.tensor(scores, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-4)
        loss, rows = classification_loss(lm.model, batch)
    assert rows == 2 and float(loss) == pytest.approx(want, rel=1e-5)
    metrics = evaluate(lm.model, [batch], classification=True)
    right = sum(max(range(2), key=row.__getitem__) == gold for row, gold in zip(scores, (0, 1), strict=True))
    assert (metrics.loss, metrics.accuracy) == (pytest.approx(want / 2, rel=1e-5), right / 2)


# Recorded from the trainer before it used rugpt.training's loss, optimizer and schedule (its own cross-entropy,
# torch AdamW and LambdaLR): same seed, same tiny model (conftest.build_tiny_model), so the same numbers.
RUNS = {
    "linear": (ROWS, None, dict(format="<P*3>{question}<P*2>", target_field="answer", epochs=10, batch_size=1,
                                gradient_accumulation_steps=2, learning_rate=0.1, warmup_steps=3,
                                eval_fraction=0.34, patience=None, seed=3),
               [28.3825, 30.9004, 27.9538, 30.5152, 28.344, 28.7115, 26.3089, 29.3159, 27.7374, 26.5006, 28.4902,
                24.5714, 25.4978, 26.6919, 27.7329, 23.7605, 24.8348, 26.2575, 24.9095, 25.9472],
               [29.5635, 29.4048, 28.9757, 28.4825, 27.9936, 27.5662, 27.2161, 26.9728, 26.8249, 26.7479, 26.7177]),
    "cosine_restarts": (ROWS, None, dict(format="<P*3>{question}<P*2>", target_field="answer", epochs=4,
                                         batch_size=2, learning_rate=0.1, warmup_steps=1, scheduler="cosine_restarts",
                                         restart_steps=2, eval_fraction=0, patience=None, seed=1),
                        [29.2372, 27.9262, 29.2831, 26.716, 31.5475, 26.0782, 26.091, 27.3669, 27.9444, 29.8599,
                         25.7937, 22.2086], []),
    "classification": (YES_NO, YES_NO, dict(format="{text}<P*4>", target_field="label", task="classification",
                                            epochs=3, batch_size=2, learning_rate=0.1, warmup_steps=0,
                                            eval_fraction=0, seed=2),
                       [5.1863, 3.3501, 1.7339, 0.8362, 0.3568, 2.1694], [5.2304, 1.7629, 0.7822, 1.2777]),
}


@pytest.mark.parametrize("name", RUNS)
def test_a_seeded_run_gives_the_losses_it_gave_before_the_trainers_shared_their_parts(lm, name):
    rows, eval_rows, settings, step_losses, heldout = RUNS[name]
    result = prompt_tune(rows, PromptTuningSettings(**settings), lm, eval_data=eval_rows)
    assert result.step_losses == pytest.approx(step_losses, abs=2e-4)
    assert [loss for _, loss in result.heldout_losses()] == pytest.approx(heldout, abs=2e-4)
