import logging

import pytest
import torch

from conftest import build_tiny_model
from rugpt.decoding import StopStringCutter
from rugpt.errors import UsageError
from rugpt.generation import GenerationSettings, Generator, cut_at_stop

PROMPT = "Мороз и солнце; день чудесный!"
GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0)


def manual_greedy(loaded, ids: list[int], steps: int) -> list[int]:
    """The reference: argmax of the full forward pass, one token at a time, no cache."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = loaded.model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module", params=["transformers", "fast"])
def gen(tiny, request):
    return Generator(tiny, engine=request.param)


def test_greedy_matches_manual_argmax_token_for_token(gen, tiny):
    settings = GenerationSettings(max_new_tokens=12, **GREEDY)
    result = gen.generate(PROMPT, settings)
    ids = tiny.tokenizer(PROMPT)["input_ids"]
    expected = manual_greedy(tiny, ids, 12)
    eos = tiny.tokenizer.eos_token_id
    if eos in expected:
        expected = expected[: expected.index(eos)]
    assert result.completions[0].token_ids == expected
    assert result.prompt_tokens == len(ids)
    assert result.engine == {"transformers": "transformers", "fast": "fast-fp32"}[gen.engine_choice.value]


def test_engines_give_the_same_sampled_text(tiny):
    settings = GenerationSettings(max_new_tokens=25, temperature=1.0, top_k=0, top_p=0.9, seed=11,
                                  repetition_penalty=1.3, no_repeat_ngram_size=2)
    texts = {engine: Generator(tiny, engine=engine).generate(PROMPT, settings).text
             for engine in ("transformers", "fast")}
    assert texts["transformers"] == texts["fast"]


def test_unknown_engine_is_refused(tiny):
    with pytest.raises(UsageError, match="engine='warp'"):
        Generator(tiny, engine="warp")


def test_same_seed_same_text_and_other_seed_differs(gen):
    settings = GenerationSettings(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    first = gen.generate(PROMPT, settings).text
    second = gen.generate(PROMPT, settings).text
    other = gen.generate(PROMPT, settings, seed=8).text
    assert first == second
    assert first != other


def test_num_return_sequences_gives_distinct_samples(gen):
    result = gen.generate(PROMPT, max_new_tokens=10, num_return_sequences=3, temperature=1.0, top_k=0, seed=1)
    assert len(result.completions) == 3
    assert len({c.text for c in result.completions}) > 1


def test_beam_search_returns_the_requested_number_of_distinct_beams_best_first(gen, tiny):
    settings = GenerationSettings.from_preset("precise", max_new_tokens=8, num_return_sequences=2)
    result = gen.generate(PROMPT, settings)
    best = gen.generate(PROMPT, settings, num_return_sequences=1).completions[0]
    first, second = result.completions
    assert first.token_ids != second.token_ids and first.token_ids == best.token_ids
    for c in result.completions:
        assert c.finish_reason in ("stop", "length") and 0 < len(c.token_ids) <= 8
        assert c.text == tiny.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_stream_pieces_join_to_the_generated_text(gen):
    settings = GenerationSettings(max_new_tokens=15, **GREEDY)
    streamed = "".join(gen.stream(PROMPT, settings))
    assert streamed == gen.generate(PROMPT, settings).text


def test_stop_string_cuts_generate_and_stream(gen):
    settings = GenerationSettings(max_new_tokens=30, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    full = gen.generate(PROMPT, settings).text
    assert len(full) > 6
    k = next(i for i in range(1, len(full) - 2) if full.find(full[i : i + 2]) == i)
    stop = full[k : k + 2]
    cut = gen.generate(PROMPT, settings, stop=(stop,))
    assert cut.text == full[: full.find(stop)]
    assert cut.completions[0].finish_reason == "stop"
    assert "".join(gen.stream(PROMPT, settings, stop=(stop,))) == cut.text


def test_long_prompt_keeps_most_recent_tokens_and_warns(gen, tiny, caplog):
    long_prompt = "слово " * 400
    with caplog.at_level(logging.WARNING, logger="rugpt.generation"):
        result = gen.generate(long_prompt, max_new_tokens=8, **GREEDY)
    assert result.prompt_truncated
    assert result.prompt_tokens == tiny.context_length - 8
    assert "kept the last" in caplog.text


def test_finish_reason_length_when_budget_used(gen):
    short = gen.generate(PROMPT, max_new_tokens=5, **GREEDY).completions[0]
    longer = gen.generate(PROMPT, max_new_tokens=20, **GREEDY).completions[0]
    assert len(longer.token_ids) > 5  # on this model the greedy path runs past 5 tokens: the budget must end it
    assert short.token_ids == longer.token_ids[:5] and short.finish_reason == "length"


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(num_beams=0), "num_beams=0"),
        (dict(do_sample=False, num_return_sequences=3), "num_return_sequences=3"),
        (dict(stop=("",)), "stop strings"),
        (dict(speculate=" "), "speculate must be"),
        (dict(speculate="lookup", num_beams=4, do_sample=False), "speculate='lookup' with num_beams=4"),
    ],
)
def test_invalid_settings_name_the_parameter(bad, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        GenerationSettings(**bad)


def test_greedy_allows_any_temperature():
    assert GenerationSettings(do_sample=False, temperature=0.0).temperature == 0.0


def test_presets_and_overrides():
    precise = GenerationSettings.from_preset("precise")
    assert (precise.do_sample, precise.num_beams) == (False, 4)
    creative = GenerationSettings.from_preset("creative", temperature=0.5)
    assert creative.temperature == 0.5 and creative.top_p == 0.95
    with pytest.raises(UsageError, match="preset='wild'"):
        GenerationSettings.from_preset("wild")
    with pytest.raises(UsageError, match="tempreature"):
        GenerationSettings.from_preset(None, tempreature=1.0)


def test_empty_prompt_and_oversized_budget_are_errors(gen, tiny):
    with pytest.raises(UsageError, match="prompt is empty"):
        gen.generate("   ")
    with pytest.raises(UsageError, match="max_new_tokens=128"):
        gen.generate(PROMPT, max_new_tokens=tiny.context_length)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("а.б!в", ("!", ".")) == "а"
    assert cut_at_stop("абв", ()) == "абв"


class _CharTokenizer:
    """Each id is one character, so the cutter's hold-back logic can be checked exactly."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stream_cutter_holds_back_a_possible_stop_prefix():
    cutter = StopStringCutter(_CharTokenizer(), ("\nБот:",))
    batches = [[ord(c)] for c in "Привет\nБо"]
    pieces = list(cutter.pieces(iter(batches)))
    assert "".join(pieces) == "Привет\nБо"  # the stream ended without the stop string: all text comes out
    assert pieces[-1] == "\nБо"  # ...but "\nБо" was held back until the end
    full = [[ord(c)] for c in "Привет\nБот: пока"]
    assert "".join(StopStringCutter(_CharTokenizer(), ("\nБот:",)).pieces(iter(full))) == "Привет"


def test_stream_cutter_pushed_token_by_token_releases_what_pieces_yields():
    cutter = StopStringCutter(_CharTokenizer(), ("\nБот:",))
    released = [cutter.push([ord(c)]) for c in "Да\nБот: нет"]
    assert released[:3] == ["Д", "а", ""]  # the newline may begin the stop string: held back
    assert "".join(released) == "Да" and cutter.stopped
    assert cutter.push([ord("!")]) == "" and cutter.finish() == ""
    open_ended = StopStringCutter(_CharTokenizer(), ("\nБот:",))
    assert [open_ended.push([ord(c)]) for c in "Да\nБ"] == ["Д", "а", "", ""]
    assert open_ended.finish() == "\nБ"


def test_batch_equals_each_prompt_alone(gen):
    prompts = [PROMPT, "Ночь, улица, фонарь, аптека", "Жил старик со своею старухой у самого синего моря"]
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, top_k=0, seed=5)
    batch = gen.generate_batch(prompts, settings)
    for i, prompt in enumerate(prompts):
        alone = gen.generate(prompt, settings, seed=5 + i)
        assert batch[i].completions[0].token_ids == alone.completions[0].token_ids
        assert batch[i].prompt == prompt


# Speculative decoding (rugpt.speculative): the same text as plain decoding, fewer engine calls.
REPEATING = "Кот сидел на окне. Кот сидел на окне. Кот сидел на окне. Кот сидел"


@pytest.mark.parametrize("prompt", [PROMPT, REPEATING])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 40])
def test_greedy_with_lookup_is_plain_greedy(gen, prompt, max_new_tokens):
    settings = GenerationSettings(max_new_tokens=max_new_tokens, **GREEDY)
    plain = gen.generate(prompt, settings)
    fast = gen.generate(prompt, settings, speculate="lookup")
    assert fast.completions == plain.completions
    assert plain.speculation is None and fast.speculation.accepted <= fast.speculation.drafted


def test_lookup_keeps_stop_strings_stream_and_sampled_text(gen):
    for stop in [("окне",), (".",), ("сидел на", "Кот")]:
        settings = GenerationSettings(max_new_tokens=30, stop=stop, **GREEDY)
        assert gen.generate(REPEATING, settings, speculate="lookup").completions == gen.generate(
            REPEATING, settings).completions
    sampled = GenerationSettings(max_new_tokens=30, temperature=0.8, top_k=40, repetition_penalty=1.2,
                                 no_repeat_ngram_size=4, seed=3, num_return_sequences=3)
    plain = gen.generate_batch([REPEATING, PROMPT], sampled)
    fast = gen.generate_batch([REPEATING, PROMPT], sampled, speculate="lookup")
    assert [r.completions for r in fast] == [r.completions for r in plain]
    streamed = "".join(gen.stream(REPEATING, sampled, num_return_sequences=1, speculate="lookup"))
    assert streamed == gen.generate(REPEATING, sampled, num_return_sequences=1).text


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-draft"), seed=1, n_embd=16)


def test_draft_model_greedy_is_plain_greedy_and_sampling_repeats_with_the_seed(gen, draft_dir):
    greedy = GenerationSettings(max_new_tokens=25, **GREEDY)
    for prompt in (PROMPT, REPEATING):
        result = gen.generate(prompt, greedy, speculate=str(draft_dir))
        assert result.completions == gen.generate(prompt, greedy).completions
        assert result.speculation.drafted > 0
    # the target drafting for itself: every draft is accepted
    itself = gen.generate(PROMPT, greedy, speculate=str(gen.loaded.folder))
    assert itself.completions == gen.generate(PROMPT, greedy).completions
    assert itself.speculation.accepted == itself.speculation.drafted > 0
    sampled = GenerationSettings(max_new_tokens=25, temperature=1.0, top_k=0, seed=9, speculate=str(draft_dir))
    first, second = gen.generate(PROMPT, sampled).text, gen.generate(PROMPT, sampled).text
    assert first == second != gen.generate(PROMPT, sampled, seed=10).text


def test_a_draft_model_with_another_tokenizer_is_refused(tiny, draft_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = shutil.copytree(draft_dir, tmp_path / "other-vocab")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<лишний>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(UsageError, match="draft model's tokenizer .* is not the target model's"):
        Generator(tiny).generate(PROMPT, max_new_tokens=3, speculate=str(other))
