"""The decode core: incremental text, stop strings (against brute-force references), finish rules, row faults,
log-probs."""

import dataclasses
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rugpt.decoding import (
    IncrementalText,
    RowSettings,
    StopMatcher,
    StopStringCutter,
    advance,
    cut_at_stop,
    start_row,
)
from rugpt.engines.base import DecodeEngine
from rugpt.models import BUNDLED_DIR
from rugpt.sampling import NoTokenToPick, SamplingParams

GREEDY = SamplingParams(do_sample=False)


class PieceTokenizer:
    """Id i decodes to `pieces[i]`, so tests choose how text is split into tokens; id 0 is end-of-text."""

    eos_token_id = 0

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))


class ScriptedEngine(DecodeEngine):
    """Each row's logits put all mass on the next id of its script (a row's script is its prompt's first id)."""

    name = "scripted"

    def __init__(self, scripts: dict[int, list[int]], vocab: int, context_length: int = 64):
        super().__init__(context_length, vocab, max_rows=8)
        self.scripts, self.steps, self._row_script, self._at = scripts, [], {}, {}

    def _logits(self, row: int) -> torch.Tensor:
        script = self.scripts[self._row_script[row]]
        token = script[min(self._at[row], len(script) - 1)]
        if token < 0:  # a broken row: nothing finite to pick
            return torch.full((self.vocab_size,), float("nan"))
        logits = torch.zeros(self.vocab_size)
        logits[token] = 10.0
        return logits

    def _prefill(self, row, token_ids, embeds):
        self._row_script[row], self._at[row] = token_ids[0], 0
        return self._logits(row)

    def _step(self, rows, token_ids):
        self.steps.append(list(rows))
        for row in rows:
            self._at[row] += 1
        return torch.stack([self._logits(row) for row in rows])

    def _release(self, row):
        pass


@pytest.fixture(scope="module")
def bpe():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_DIR)


def pushed(decoder: IncrementalText, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_incremental_text_equals_decoding_everything_for_any_text(bpe, text):
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    pieces = pushed(IncrementalText(bpe), ids)
    assert "".join(pieces) == bpe.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text  # split characters wait until whole


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 7999), min_size=1, max_size=40))
def test_incremental_text_of_arbitrary_ids_equals_decoding_everything(bpe, ids):
    assert "".join(pushed(IncrementalText(bpe), ids)) == bpe.decode(ids, skip_special_tokens=True)


def test_a_character_split_between_tokens_waits_for_its_last_byte(bpe):
    ids = bpe("ёж 😀", add_special_tokens=False)["input_ids"]
    pieces = pushed(IncrementalText(bpe), ids)
    assert "".join(pieces) == "ёж 😀" and "" in pieces and not any("\ufffd" in p for p in pieces)


def brute_held_back(text: str, stop: tuple[str, ...]) -> int:
    """The old cutter's rule: the longest end of `text` that is a proper prefix of a stop string."""
    return max((n for s in stop for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])), default=0)


small_text = st.text(alphabet="ab\nБо", max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab\nБо", min_size=1, max_size=4), max_size=20),
       st.lists(st.text(alphabet="ab\nБо", min_size=1, max_size=5), max_size=4))
def test_cutter_matches_the_whole_text_reference_token_by_token(chunks, stop):
    """Pieces released after each token = the text so far, cut at a stop string or less its held-back end."""
    stop = tuple(stop)
    cutter = StopStringCutter(PieceTokenizer(["<eos>", *chunks]), stop)
    released, text = "", ""
    for token, chunk in enumerate(chunks, start=1):
        released += cutter.push([token])
        text += chunk
        if cutter.stopped:
            assert released == cut_at_stop(text, stop) and any(s in text for s in stop)
            break
        assert not any(s in text for s in stop)
        assert released == text[: len(text) - brute_held_back(text, stop)]
    released += cutter.finish()
    assert released == cutter.text == cut_at_stop(text, stop)


@settings(max_examples=300, deadline=None)
@given(st.lists(small_text, max_size=10), st.text(alphabet="ab\nБо", min_size=1, max_size=6))
def test_stop_matcher_finds_the_first_occurrence_across_pieces(pieces, stop):
    matcher, seen = StopMatcher(stop), ""
    for piece in pieces:
        end = matcher.feed(piece)
        if end is not None:
            assert (seen + piece).find(stop) == len(seen) + end - len(stop)
            return
        seen += piece
        assert stop not in seen
        assert matcher.partial == max((n for n in range(len(stop)) if n and seen.endswith(stop[:n])), default=0)


def test_a_stop_string_spanning_tokens_cuts_the_text_before_it():
    tokenizer = PieceTokenizer(["", "Да", "\nБ", "от", ": нет"])
    cutter = StopStringCutter(tokenizer, ("\nБот:",))
    assert [cutter.push([t]) for t in (1, 2, 3, 4)] == ["Да", "", "", ""]
    assert cutter.stopped and cutter.text == "Да" and cutter.finish() == ""


def test_a_huge_stop_string_costs_no_more_than_the_text():
    stop = ("а" * 1_000_000 + "б",)
    tokenizer = PieceTokenizer(["", "а"])
    began = time.perf_counter()
    cutter = StopStringCutter(tokenizer, stop)
    pieces = [cutter.push([1]) for _ in range(2000)]
    assert time.perf_counter() - began < 2.0
    assert not any(pieces) and cutter.finish() == "а" * 2000  # all held back: it may begin the stop string


def rows_for(engine, tokenizer, scripts, row_settings):
    return [start_row(engine, tokenizer, [key], row_settings, seed=0) for key in scripts]


def run_rows(engine, rows):
    """Advance until every row ended; (row index, step or exception) in order."""
    log, active = [], list(enumerate(rows))
    while active:
        outcomes = advance(engine, [row for _, row in active])
        log += [(i, o) for (i, _), o in zip(active, outcomes, strict=True)]
        active = [(i, r) for (i, r), o in zip(active, outcomes, strict=True)
                  if not isinstance(o, Exception) and o.finish is None]
    return log


def test_finish_rules_end_of_text_stop_string_budget_and_full_context():
    tokenizer = PieceTokenizer(["<eos>", "а", "б", ".", "в"])
    scripts = {1: [1, 2, 0, 4], 2: [1, 3, 4, 4], 3: [4] * 40, 4: [2] * 40}
    engine = ScriptedEngine(scripts, vocab=5, context_length=6)
    rows = rows_for(engine, tokenizer, [1, 2, 3], RowSettings(GREEDY, max_new_tokens=4, stop=(".",)))
    rows += rows_for(engine, tokenizer, [4], RowSettings(GREEDY, max_new_tokens=50))  # runs into the context
    run_rows(engine, rows)
    eos, stop, budget, context = rows
    assert (eos.ids, eos.text, eos.finish_reason) == ([1, 2], "аб", "stop")  # end-of-text is not a token of it
    assert (stop.ids, stop.text, stop.finish_reason) == ([1, 3], "а", "stop")
    assert (budget.ids, budget.finish_reason) == ([4] * 4, "length")
    # 1 prompt token + 5 stepped fill the context of 6; the 6th token needs no step after it
    assert (len(context.ids), context.finish_reason) == (6, "length")


def test_a_row_with_nothing_to_pick_fails_alone_and_leaves_the_step():
    tokenizer = PieceTokenizer(["<eos>", "а", "б"])
    scripts = {1: [1, 1, 1, 1], 2: [2, -1]}
    engine = ScriptedEngine(scripts, vocab=3)
    good, broken = rows_for(engine, tokenizer, scripts, RowSettings(GREEDY, max_new_tokens=4))
    log = run_rows(engine, [good, broken])
    failures = [(i, o) for i, o in log if isinstance(o, Exception)]
    assert len(failures) == 1 and failures[0][0] == 1 and isinstance(failures[0][1], NoTokenToPick)
    assert good.text == "аааа" and good.finish_reason == "length"
    assert engine.steps[-1] == [good.engine_row]  # the broken row took no part in later steps


def test_streamed_pieces_join_to_the_row_text_with_a_held_back_end():
    tokenizer = PieceTokenizer(["<eos>", "Да", "\nБ"])
    scripts = {1: [1, 2, 0]}
    engine = ScriptedEngine(scripts, vocab=3)
    [row] = rows_for(engine, tokenizer, scripts, RowSettings(GREEDY, max_new_tokens=10, stop=("\nБот:",)))
    steps = [o for _, o in run_rows(engine, [row])]
    assert [s.piece for s in steps] == ["Да", "", "\nБ"]  # held back until end-of-text showed it was no stop
    assert steps[-1].token is None and "".join(s.piece for s in steps) == row.text == "Да\nБ"


@given(st.text(alphabet="ab.", max_size=30), st.lists(st.text(alphabet="ab.", min_size=1, max_size=3), max_size=4))
def test_cut_at_stop_ends_right_before_the_earliest_stop_string(text, stop):
    cut = cut_at_stop(text, tuple(stop))
    assert text.startswith(cut) and not any(s in cut for s in stop)
    assert cut == text or any(text[len(cut):].startswith(s) for s in stop)


# --- log-probs (issue 15): only rows that ask, from the model's own logits ---


@pytest.mark.parametrize("engine_name", ["transformers", "fast"])
def test_row_logprobs_are_the_log_softmax_of_the_models_logits(tiny, engine_name):
    from rugpt.engines import create_engine

    engine = create_engine(tiny, engine_name, max_rows=2)
    prompt = tiny.tokenizer("Мой дядя самых честных", add_special_tokens=False)["input_ids"]
    sampled = RowSettings(SamplingParams(temperature=1.3, repetition_penalty=1.3), max_new_tokens=6, logprobs=3)
    asking = start_row(engine, tiny.tokenizer, prompt, sampled, seed=7)
    silent = start_row(engine, tiny.tokenizer, prompt, dataclasses.replace(sampled, logprobs=None), seed=7)
    steps = []
    while asking.finish_reason is None:
        [step, quiet] = advance(engine, [asking, silent])
        steps.append(step)
        assert quiet.logprobs is None and quiet.token == step.token  # asking changes nothing of the text
    ids = prompt + [s.logprobs.token for s in steps]  # end-of-text, if picked, has its entry too
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1].float()
    expected = torch.log_softmax(logits, dim=-1)  # raw logits: before penalty, temperature and truncation
    for position, step in enumerate(steps):
        entry = step.logprobs
        assert entry.logprob == pytest.approx(float(expected[position, entry.token]), abs=1e-4)
        values, top_ids = torch.topk(expected[position], 3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
