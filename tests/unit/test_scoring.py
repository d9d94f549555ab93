import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rugpt.cli import app
from rugpt.errors import UsageError
from rugpt.scoring import Scorer, ScoreSettings, plan_windows

TEXT = "Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный"
runner = CliRunner()


@pytest.fixture(scope="module")
def scorer(tiny):
    return Scorer(tiny)


def encode(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def manual_logprobs(loaded, ids: list[int], first: int) -> list[float]:
    """The reference: one forward pass over `ids`, log-softmax, the log-prob of each token from `first` on."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return [float(logprobs[p - 1, ids[p]]) for p in range(first, len(ids))]


def test_log_likelihood_is_the_sum_of_token_logprobs(scorer, tiny):
    ids = [tiny.tokenizer.eos_token_id, *encode(tiny, TEXT)]
    expected = manual_logprobs(tiny, ids, 1)
    result = scorer.score([TEXT])[0]
    assert result.num_tokens == len(ids) - 1
    assert result.log_likelihood == pytest.approx(sum(expected), rel=1e-5)
    assert result.mean_loss == pytest.approx(-sum(expected) / len(expected), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.mean_loss))
    assert result.windows == 1


def test_without_bos_the_mean_loss_is_transformers_own_loss(scorer, tiny):
    ids = torch.tensor([encode(tiny, TEXT)])
    with torch.no_grad():
        hf_loss = tiny.model(ids, labels=ids).loss.item()  # transformers shifts the labels itself
    result = scorer.score([TEXT], ScoreSettings(prepend_bos=False))[0]
    assert result.num_tokens == ids.shape[1] - 1
    assert result.mean_loss == pytest.approx(hf_loss, rel=1e-5)


def test_batched_equals_unbatched_and_keeps_order(scorer):
    texts = [TEXT, "Привет", "Жили-были дед да баба. " * 5, "Тишина."]
    batched = scorer.score(texts, ScoreSettings(batch_size=8, token_details=True))
    for text, together in zip(texts, batched, strict=True):
        alone = scorer.score([text], ScoreSettings(batch_size=1, token_details=True))[0]
        assert together.text == text and together.num_tokens == alone.num_tokens
        torch.testing.assert_close([t.logprob for t in together.tokens], [t.logprob for t in alone.tokens],
                                   atol=1e-4, rtol=1e-4)


def test_token_details_rebuild_the_text_and_sum_to_the_total(scorer):
    result = scorer.score([TEXT], ScoreSettings(token_details=True))[0]
    assert "".join(t.token for t in result.tokens) == TEXT
    assert sum(t.logprob for t in result.tokens) == pytest.approx(result.log_likelihood)
    assert "tokens" in result.to_dict() and "tokens" not in scorer.score([TEXT])[0].to_dict()


def test_sliding_window_equals_full_scoring_when_the_text_fits(scorer, tiny):
    n = len(encode(tiny, TEXT)) + 1  # with the begin-of-text token
    full = scorer.score([TEXT])[0]
    for window, stride in [(n, 1), (n, n - 1), (tiny.context_length, 3)]:
        slid = scorer.score([TEXT], ScoreSettings(window=window, stride=stride))[0]
        assert slid.windows == 1
        assert slid.perplexity == pytest.approx(full.perplexity, rel=1e-5)


def test_long_text_is_scored_once_per_token_with_the_planned_context(scorer, tiny):
    long_text = "Жили-были дед да баба, и была у них курочка Ряба. " * 12
    ids = [tiny.tokenizer.eos_token_id, *encode(tiny, long_text)]
    assert len(ids) > tiny.context_length  # the model could not take it in one pass
    window, stride = 32, 8
    result = scorer.score([long_text], ScoreSettings(window=window, stride=stride, token_details=True))
    plan = plan_windows(len(ids), 1, window, stride)
    assert result[0].num_tokens == len(ids) - 1 and result[0].windows == len(plan) > 1
    got = [t.logprob for t in result[0].tokens]
    for w in plan[:3] + plan[-2:]:  # each window's last target, re-scored from its own slice alone
        expected = manual_logprobs(tiny, ids[w.start : w.end], w.end - 1 - w.start)[0]
        assert got[w.end - 2] == pytest.approx(expected, abs=1e-4)
    default = scorer.score([long_text])[0]  # default window: the whole context, stride half of it
    assert default.num_tokens == len(ids) - 1 and default.windows > 1


@pytest.mark.parametrize("length, first, window, stride", [
    (2, 1, 2, 1), (10, 1, 4, 1), (10, 1, 4, 3), (100, 1, 16, 5), (100, 60, 16, 5), (17, 16, 4, 2), (50, 3, 50, 10),
])
def test_plan_windows_covers_each_target_once_with_context(length, first, window, stride):
    plan = plan_windows(length, first, window, stride)
    covered = [p for w in plan for p in range(w.first_target, w.end)]
    assert covered == list(range(first, length))
    for i, w in enumerate(plan):
        assert 0 <= w.start < w.first_target and w.end - w.start <= window
        if i > 0:  # later windows keep window - stride tokens of context before their targets
            assert w.first_target - w.start >= window - stride


def test_target_logprobs_score_only_the_target_after_the_context(scorer, tiny):
    context, target = "Вопрос: сколько будет два и два?\nОтвет:", " четыре"
    ids = [tiny.tokenizer.eos_token_id, *encode(tiny, context), *encode(tiny, target)]
    got = scorer.target_logprobs([(context, target), ("", "Мороз")])
    assert got[0] == pytest.approx(manual_logprobs(tiny, ids, len(ids) - len(encode(tiny, target))), abs=1e-4)
    assert len(got[1]) == len(encode(tiny, "Мороз"))


def test_a_context_longer_than_the_window_keeps_its_end(scorer, tiny):
    context, target = "слово " * 200, " конец"
    target_ids = encode(tiny, target)
    ids = [tiny.tokenizer.eos_token_id, *encode(tiny, context), *target_ids]
    kept = ids[-tiny.context_length :]
    got = scorer.target_logprobs([(context, target)])[0]
    assert got == pytest.approx(manual_logprobs(tiny, kept, len(kept) - len(target_ids)), abs=1e-4)


@pytest.mark.parametrize("settings, needle", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(window=1), "window=1"),
    (dict(stride=0), "stride=0"),
    (dict(window=8, stride=8), "stride=8 must be < window=8"),
])
def test_invalid_settings_name_the_option(settings, needle):
    with pytest.raises(UsageError, match=needle):
        ScoreSettings(**settings)


def test_bad_inputs_are_usage_errors(scorer, tiny):
    with pytest.raises(UsageError, match="text #2 is empty"):
        scorer.score([TEXT, "  "])
    with pytest.raises(UsageError, match="larger than the model's context"):
        scorer.score([TEXT], ScoreSettings(window=tiny.context_length + 1))
    with pytest.raises(UsageError, match="target is empty"):
        scorer.target_logprobs([("контекст", "")])


def run(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin)


def test_cli_json_reads_arguments_lines_and_jsonl(tiny_model_dir, tmp_path):
    model = ("--model", str(tiny_model_dir))
    by_args = run("score", TEXT, "Привет", *model, "--json")
    assert by_args.exit_code == 0, by_args.output
    rows = json.loads(by_args.stdout)
    assert [r["text"] for r in rows] == [TEXT, "Привет"]
    assert rows[0]["perplexity"] == pytest.approx(math.exp(rows[0]["mean_loss"]))
    by_lines = run("score", "--lines", *model, "--json", stdin=f"{TEXT}\n\nПривет\n")
    assert json.loads(by_lines.stdout) == rows
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"body": TEXT}, ensure_ascii=False) + "\n", encoding="utf-8")
    by_jsonl = run("score", "--jsonl", str(data), "--field", "body", *model, "--json")
    assert json.loads(by_jsonl.stdout) == rows[:1]


def test_cli_table_with_tokens(tiny_model_dir):
    result = run("score", "Привет, мир", "--model", str(tiny_model_dir), "--tokens")
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "log-prob" in result.stdout


@pytest.mark.parametrize("args, needle", [
    (("",), "text #1 is empty"),
    (("--file", "/nonexistent/texts.txt"), "cannot read text file"),
    (("--jsonl", "{bad}"), ":2: invalid JSON"),
    (("--jsonl", "{nofield}"), ":1: no field 'text'"),
    (("Привет", "--stride", "0"), "stride=0"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, args, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "ok"}\n', encoding="utf-8")
    args = tuple({"{bad}": str(bad), "{nofield}": str(nofield)}.get(a, a) for a in args)
    result = run("score", *args, "--model", str(tiny_model_dir))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
