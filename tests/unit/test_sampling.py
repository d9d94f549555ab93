import torch

from rugpt.sampling import RowSampler, SamplingParams, banned_ngram_tokens, pick_token


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
