import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rugpt.sampling import (
    LOGPROB_FLOOR,
    NoTokenToPick,
    RowSampler,
    SamplingParams,
    banned_ngram_tokens,
    pick_token,
    token_logprobs,
)


def test_repetition_penalty_follows_transformers_semantics():
    sampler = RowSampler(SamplingParams(repetition_penalty=2.0), history=[0, 1])
    out = sampler.process(torch.tensor([4.0, -4.0, 4.0]))
    assert out.tolist() == [2.0, -8.0, 4.0]


def test_banned_ngrams_are_exactly_the_completions_seen():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 1, 4, 1], 2) == {2, 4}
    assert banned_ngram_tokens([5], 2) == set()
    sampler = RowSampler(SamplingParams(do_sample=False, no_repeat_ngram_size=2), history=[1, 2, 1])
    logits = torch.zeros(5)
    logits[2] = 10.0
    assert sampler.next_token(logits) != 2


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert pick_token(logits, SamplingParams(do_sample=False), gen) == 1
    assert all(pick_token(logits, SamplingParams(top_k=1), gen) == 1 for _ in range(20))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    picks = {pick_token(logits, SamplingParams(top_p=0.8), gen) for _ in range(300)}
    assert picks == {0, 1}
    picks = {pick_token(logits, SamplingParams(top_p=0.01), gen) for _ in range(50)}
    assert picks == {0}


def test_same_seed_same_tokens_independent_of_other_rows():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    a = RowSampler(SamplingParams(temperature=1.5), [], seed=42)
    b = RowSampler(SamplingParams(temperature=1.5), [], seed=42)
    RowSampler(SamplingParams(), [], seed=42).next_token(logits)  # another row's draws change nothing
    assert [a.next_token(logits) for _ in range(10)] == [b.next_token(logits) for _ in range(10)]


def test_ids_past_the_vocabulary_stay_out_of_the_history():
    sampler = RowSampler(SamplingParams(repetition_penalty=2.0), history=[1, 8000, 8001], vocab_size=3)
    assert sampler.history == [1]
    assert sampler.process(torch.tensor([4.0, 4.0, 4.0])).tolist() == [4.0, 2.0, 4.0]


# --- every value the settings' validation accepts must work (issue 14: one request broke a whole batch) ---

TINY, HUGE = 5e-324, 1e308
positive = st.one_of(st.sampled_from([TINY, 1e-300, 1e-38, 0.5, 1.0, 2.0, HUGE, math.inf]),
                     st.floats(min_value=0, exclude_min=True, allow_infinity=True))
accepted_params = st.builds(
    SamplingParams,
    do_sample=st.booleans(),
    temperature=positive,  # GenerationSettings.validate: > 0 when sampling (anything when greedy)
    top_k=st.one_of(st.integers(0, 20), st.integers(0, 10**30)),  # >= 0, 0 is off
    top_p=st.one_of(st.sampled_from([TINY, 1e-30, 0.5, 1.0]), st.floats(min_value=0, max_value=1, exclude_min=True)),
    repetition_penalty=positive,  # > 0
    no_repeat_ngram_size=st.one_of(st.integers(0, 4), st.integers(0, 10**30)),  # >= 0
)
logit = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([-math.inf, math.nan]))


@st.composite
def row_logits(draw) -> tuple[list[float], list[int], int | None]:
    """Logits of any values, a history of ids within them, and how many ids may be generated."""
    values = draw(st.lists(logit, min_size=1, max_size=12))
    history = draw(st.lists(st.integers(0, len(values) - 1), max_size=8))
    return values, history, draw(st.one_of(st.none(), st.integers(1, len(values))))


@settings(max_examples=400, deadline=None)
@given(accepted_params, row_logits(), st.integers(-(2**70), 2**70))
def test_any_accepted_settings_pick_a_pickable_token_or_say_there_is_none(params, row, seed):
    values, history, vocab = row
    logits = torch.tensor(values, dtype=torch.float32)
    sampler = RowSampler(params, list(history), seed, vocab)
    processed = sampler.process(logits)
    pickable = ~torch.isnan(processed) & (processed > float("-inf"))
    if not pickable.any():
        with pytest.raises(NoTokenToPick, match="-inf or NaN"):
            sampler.next_token(logits)
        return
    token = sampler.next_token(logits)
    assert 0 <= token < len(values) and bool(pickable[token])
    if vocab is not None:
        assert token < vocab
    if bool((processed == float("inf")).any()):
        assert processed[token] == float("inf")  # infinitely likely ids leave no room for others


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 30, width=32), min_size=2, max_size=50, unique=True), st.integers(0, 2**64 - 1),
       st.sampled_from([TINY, 1e-300, 1e-38, 1e-30]))
def test_a_vanishing_top_p_or_temperature_keeps_only_the_likeliest_token(values, seed, tiny):
    logits = torch.tensor(values)
    best = int(logits.argmax())
    generator = torch.Generator().manual_seed(seed)
    assert pick_token(logits, SamplingParams(top_p=tiny), generator) == best
    if float(logits.topk(2).values[0] - logits.topk(2).values[1]) > 1e-3:
        assert pick_token(logits, SamplingParams(temperature=tiny, top_p=1.0), generator) == best


def test_a_huge_temperature_samples_every_token_and_extreme_penalties_stay_finite():
    logits = torch.tensor([5.0, 0.0, -5.0])
    generator = torch.Generator().manual_seed(0)
    assert {pick_token(logits, SamplingParams(temperature=HUGE), generator) for _ in range(200)} == {0, 1, 2}
    favour = RowSampler(SamplingParams(do_sample=False, repetition_penalty=TINY), history=[1])
    assert favour.process(torch.tensor([5.0, 0.5, -5.0])).isfinite().all() and favour.next_token(logits) == 0
    shun = RowSampler(SamplingParams(do_sample=False, repetition_penalty=HUGE), history=[0, 2])
    shunned = shun.process(torch.tensor([1.0, 0.5, -5.0]))
    assert shunned[0] < 1e-30 and shunned[2] == float("-inf") and shun.next_token(torch.tensor([1.0, 0.5, -5.0])) == 1


def test_any_int_seed_seeds_a_row_the_same_way_twice():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    for seed in (-(2**80), -1, 2**64 - 1, 2**64, 10**30):
        a, b = (RowSampler(SamplingParams(), [], seed) for _ in range(2))
        assert [a.next_token(logits) for _ in range(5)] == [b.next_token(logits) for _ in range(5)]


# --- log-probs and grammar masks (issue 15) ---


def test_token_logprobs_are_log_softmax_of_the_raw_logits_with_the_likeliest_first():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    expected = torch.log_softmax(logits, dim=-1)
    entries = token_logprobs(logits, [4, 17, 49], top=5, vocab_size=40)
    for row, (entry, token) in enumerate(zip(entries, [4, 17, 49], strict=True)):
        assert entry.token == token and entry.logprob == pytest.approx(float(expected[row, token]), abs=1e-6)
        values, ids = torch.topk(expected[row, :40], 5)  # alternatives only from the sampleable vocabulary
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert token_logprobs(logits, [1, 2, 3])[0].top == ()


def test_token_logprobs_of_impossible_tokens_stay_finite_for_json():
    logits = torch.tensor([[0.0, float("-inf"), float("nan"), 1.0]])
    [entry] = token_logprobs(logits, [1], top=4)
    assert entry.logprob == LOGPROB_FLOOR and all(math.isfinite(lp) for _, lp in entry.top)


def test_a_grammar_mask_limits_the_pick_and_outranks_ngram_blocking():
    logits = torch.tensor([9.0, 1.0, 2.0, 3.0, 0.5])
    allowed = torch.tensor([False, True, True, False])  # id 4 lies past the mask: never allowed
    sampler = RowSampler(SamplingParams(do_sample=False), [])
    assert sampler.next_token(logits, allowed) == 2
    picks = {RowSampler(SamplingParams(), [], seed=s).next_token(logits, allowed) for s in range(40)}
    assert picks <= {1, 2} and len(picks) == 2
    # n-gram blocking bans both allowed ids: the grammar wins, the row still has a token to pick
    blocked = RowSampler(SamplingParams(do_sample=False, no_repeat_ngram_size=1), history=[1, 2])
    assert blocked.next_token(logits, allowed) == 2
    with pytest.raises(NoTokenToPick):
        RowSampler(SamplingParams(), []).next_token(logits, torch.zeros(5, dtype=torch.bool))
