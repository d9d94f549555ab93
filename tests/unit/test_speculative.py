"""Speculative decoding: drafting, and checking that keeps plain decoding's text (greedy) or distribution (sampling).

Mechanics run on a tiny table model (a random trigram table behind the decode-engine interface, 6 tokens), where
the exact distribution of the first tokens can be enumerated and compared with what speculation samples.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from rugpt.decoding import RowSettings, start_row
from rugpt.engines.base import DecodeEngine
from rugpt.errors import UsageError
from rugpt.sampling import RowSampler, SamplingParams, sampling_probs
from rugpt.speculative import (
    CallCosts,
    Draft,
    LookupDrafter,
    ModelDrafter,
    NoDrafter,
    SpeculatingRow,
    SpeculationStats,
    advance_speculating,
    check_same_vocabulary,
)

VOCAB = 6
LETTERS = "abcdef"
GREEDY = SamplingParams(do_sample=False)


class TableEngine(DecodeEngine):
    """A trigram table as a decode engine: the logits after a sequence are table[second last, last]."""

    name = "table"

    def __init__(self, table: torch.Tensor, context_length: int = 64, max_rows: int = 8):
        super().__init__(context_length, table.shape[-1], max_rows)
        self.table = table
        self.tokens: dict[int, list[int]] = {}
        self.calls = 0  # engine calls after prefill: what speculation saves

    def logits_after(self, seq: list[int]) -> torch.Tensor:
        return self.table[seq[-2] if len(seq) > 1 else 0, seq[-1]].clone()

    def _prefill(self, row, token_ids, embeds):
        self.tokens[row] = list(token_ids)
        return self.logits_after(token_ids)

    def _step(self, rows, token_ids):
        self.calls += 1
        out = []
        for row, token in zip(rows, token_ids, strict=True):
            self.tokens[row].append(token)
            out.append(self.logits_after(self.tokens[row]))
        return torch.stack(out)

    def _release(self, row):
        self.tokens.pop(row)

    def _extend(self, row, token_ids, all_logits):
        self.calls += 1
        out = []
        for token in token_ids:
            self.tokens[row].append(token)
            out.append(self.logits_after(self.tokens[row]))
        return torch.stack(out) if all_logits else out[-1]

    def _truncate(self, row, length):
        del self.tokens[row][length:]


class Letters:
    """A tokenizer for the table model: token i is the letter LETTERS[i]; `eos` (if any) has no text."""

    def __init__(self, eos: int | None = None):
        self.eos_token_id = eos

    def decode(self, ids, skip_special_tokens=True):
        return "".join(LETTERS[i] for i in ids if i != self.eos_token_id)

    def get_vocab(self):
        return {c: i for i, c in enumerate(LETTERS)}


def table(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(VOCAB, VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


class NoRepeats:
    """A stand-in grammar: a token may not follow itself, and the text is complete after `length` tokens."""

    def __init__(self, length: int):
        self.length, self.last, self.count = length, None, 0

    def matcher(self):
        return NoRepeats(self.length)

    def allowed(self):
        allowed = torch.ones(VOCAB, dtype=torch.bool)
        if self.last is not None:
            allowed[self.last] = False
        return allowed

    def accept(self, token):
        self.last, self.count = token, self.count + 1

    @property
    def done(self):
        return self.count >= self.length


def decode(target: torch.Tensor, prompt: list[int], params: SamplingParams, max_new_tokens: int, seed: int = 0,
           speculate: str | torch.Tensor | None = None, eos: int | None = None, stop: tuple[str, ...] = (),
           context_length: int = 64, costs: CallCosts | None = None, grammar: NoRepeats | None = None):
    """Decode one row on the table model: plainly, with lookup drafts, or with a draft table. Returns
    (ids, text, finish reason, stats, engine)."""
    engine = TableEngine(target, context_length)
    costs = costs or CallCosts(prior_ratio=1.0, measure=False)  # every lookup draft is checked
    row = start_row(engine, Letters(eos), prompt, RowSettings(params, max_new_tokens, stop, grammar=grammar), seed)
    if speculate is None:
        while row.finish_reason is None:
            step = row.pick()
            if step.finish is None:
                row.logits = engine.step([row.engine_row], [row.ids[-1]])[0]
        return row.ids, row.text, row.finish_reason, None, engine
    if isinstance(speculate, str):
        drafter, first, cap = LookupDrafter(VOCAB), 8, 16
    else:
        draft_seed = int(torch.randint(0, 2**62, (1,), generator=row.sampler.generator))
        drafter, first, cap = ModelDrafter(TableEngine(speculate, context_length), prompt, params, draft_seed), 4, 8
    spec = SpeculatingRow(row, list(prompt), drafter, first, cap)
    while row.finish_reason is None:
        (outcome,) = advance_speculating(engine, [spec], costs)
        if isinstance(outcome, Exception):
            raise outcome
        if row.finish_reason is None:  # between rounds the cache holds everything but the pending token
            assert engine.tokens[row.engine_row] == prompt + row.ids[:-1]
    spec.release()
    return row.ids, row.text, row.finish_reason, spec.stats, engine


PROMPTS = [[1, 2, 3, 1, 2, 3, 1, 2], [4], [2, 2, 2, 2], [1, 3, 5, 2, 4, 1, 3, 5, 2], [5, 4, 3, 2, 1, 0, 5, 4]]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("seed", range(4))
def test_greedy_with_lookup_or_a_draft_model_is_plain_greedy_token_for_token(prompt, seed):
    target = table(seed)
    plain = decode(target, prompt, GREEDY, 30)
    for speculate in ("lookup", table(100 + seed), target + 0.3 * table(200 + seed)):
        ids, text, finish, stats, _ = decode(target, prompt, GREEDY, 30, speculate=speculate)
        assert (ids, text, finish) == plain[:3]
        assert 0 <= stats.accepted <= stats.drafted


def test_greedy_speculation_saves_engine_calls_on_repetitive_text():
    # a table whose greedy path is a cycle: lookup drafts the cycle and every draft is accepted
    target = torch.full((VOCAB, VOCAB, VOCAB), -5.0)
    for a, b in itertools.product(range(VOCAB), repeat=2):
        target[a, b, (b + 1) % VOCAB] = 5.0
    plain = decode(target, [0, 1, 2, 3, 4, 5, 0], GREEDY, 40)
    ids, _, _, stats, engine = decode(target, [0, 1, 2, 3, 4, 5, 0], GREEDY, 40, speculate="lookup")
    assert ids == plain[0]
    assert stats.acceptance_rate == 1.0 and stats.rounds < 10
    assert engine.calls < plain[4].calls / 3


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 13])
def test_max_new_tokens_edges_are_kept(max_new_tokens):
    target = table(3)
    for prompt in PROMPTS:
        plain = decode(target, prompt, GREEDY, max_new_tokens)
        for speculate in ("lookup", target):  # the target as its own draft: every draft accepted
            got = decode(target, prompt, GREEDY, max_new_tokens, speculate=speculate)
            assert got[:3] == plain[:3]
            assert len(got[0]) == max_new_tokens or got[2] == "stop"


def test_a_full_context_ends_the_row_as_plain_decoding_does():
    target = table(4)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    plain = decode(target, prompt, GREEDY, 50, context_length=20)
    for speculate in ("lookup", target):
        assert decode(target, prompt, GREEDY, 50, speculate=speculate, context_length=20)[:3] == plain[:3]
    assert plain[2] == "length" and len(plain[0]) == 20 - len(prompt) + 1


@pytest.mark.parametrize("eos", [0, 3, 5])
def test_end_of_text_inside_an_accepted_draft_ends_the_row(eos):
    target = table(5)
    for prompt, seed in itertools.product(PROMPTS, range(3)):
        target = table(50 + seed)
        plain = decode(target, prompt, GREEDY, 40, eos=eos)
        for speculate in ("lookup", target):
            assert decode(target, prompt, GREEDY, 40, speculate=speculate, eos=eos)[:3] == plain[:3]


def test_end_of_text_accepted_mid_draft_stops_there():
    # the greedy path is 1 2 3 EOS(0) ...: the target drafting for itself accepts EOS inside a draft
    target = torch.full((VOCAB, VOCAB, VOCAB), -5.0)
    for a, b in itertools.product(range(VOCAB), repeat=2):
        target[a, b, (b + 1) % 4] = 5.0
    ids, text, finish, stats, _ = decode(target, [2, 3, 0, 1], GREEDY, 20, speculate=target, eos=0)
    assert (ids, text, finish) == ([2, 3], "cd", "stop")
    assert stats.accepted >= 2


@pytest.mark.parametrize("stop", [("c",), ("ab", "ff"), ("abc",), ("zz",)])
def test_stop_strings_cut_the_same_text(stop):
    for prompt, seed in itertools.product(PROMPTS, range(3)):
        target = table(70 + seed)
        plain = decode(target, prompt, GREEDY, 30, stop=stop)
        for speculate in ("lookup", target, table(90 + seed)):
            assert decode(target, prompt, GREEDY, 30, speculate=speculate, stop=stop)[:3] == plain[:3]


def test_a_grammar_holds_the_checked_tokens_as_it_holds_plain_picks():
    for prompt, seed in itertools.product(PROMPTS, range(3)):
        target = table(30 + seed)
        for params in (GREEDY, SamplingParams(temperature=0.9)):
            plain = decode(target, prompt, params, 30, seed=seed, grammar=NoRepeats(20))
            assert all(a != b for a, b in itertools.pairwise(plain[0]))
            for speculate in ("lookup", target + 0.5 * table(40 + seed)):
                if params.do_sample and not isinstance(speculate, str):
                    got = decode(target, prompt, params, 30, seed=seed, speculate=speculate, grammar=NoRepeats(20))
                    assert all(a != b for a, b in itertools.pairwise(got[0])) and len(got[0]) == 20
                else:
                    assert decode(target, prompt, params, 30, seed=seed, speculate=speculate,
                                  grammar=NoRepeats(20))[:3] == plain[:3]


def test_rows_that_speculate_and_rows_that_do_not_share_a_batch():
    """Several rows on one engine, advanced together: each gives its text alone; the plain rows and the rounds
    without drafts step together in one call."""
    target = table(60)
    engine = TableEngine(target)
    settings = [GREEDY, SamplingParams(temperature=0.9, top_k=4), GREEDY, SamplingParams(temperature=1.1)]
    kinds = ["lookup", None, table(61), "lookup"]
    rows = []
    for i, (params, kind, prompt) in enumerate(zip(settings, kinds, PROMPTS, strict=False)):
        row = start_row(engine, Letters(), prompt, RowSettings(params, 20 + i), seed=i)
        if kind is None:
            rows.append(SpeculatingRow.plain(row, prompt))
        elif kind == "lookup":
            rows.append(SpeculatingRow(row, list(prompt), LookupDrafter(VOCAB), 8, 16))
        else:
            draft_seed = int(torch.randint(0, 2**62, (1,), generator=row.sampler.generator))
            rows.append(SpeculatingRow(row, list(prompt), ModelDrafter(TableEngine(kind), prompt, params, draft_seed),
                                       4, 8))
    steps_with_several_rows = 0
    original_step = engine._step

    def counting_step(rows_, tokens):
        nonlocal steps_with_several_rows
        steps_with_several_rows += len(rows_) > 1
        return original_step(rows_, tokens)

    engine._step = counting_step
    active = list(rows)
    while active:
        outcomes = advance_speculating(engine, active, CallCosts(prior_ratio=1.0, measure=False))
        assert not any(isinstance(o, Exception) for o in outcomes)
        active = [r for r in active if r.row.finish_reason is None]
    for i, (params, kind, prompt) in enumerate(zip(settings, kinds, PROMPTS, strict=False)):
        alone = decode(target, prompt, params, 20 + i, seed=i, speculate=kind)
        assert (rows[i].row.ids, rows[i].row.text, rows[i].row.finish_reason) == alone[:3]
    assert rows[1].stats.drafted == 0 and steps_with_several_rows > 0


SAMPLING = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.9, repetition_penalty=1.3),
    SamplingParams(temperature=1.3, top_p=0.8, no_repeat_ngram_size=3),
]


@pytest.mark.parametrize("params", SAMPLING)
def test_sampling_same_seed_same_text_other_seed_differs(params):
    target = table(8)
    for speculate in ("lookup", table(9)):
        texts = [decode(target, PROMPTS[0], params, 25, seed=s, speculate=speculate)[1] for s in (1, 1, 2, 3, 4)]
        assert texts[0] == texts[1]
        assert len(set(texts[1:])) > 1


@pytest.mark.parametrize("params", SAMPLING)
def test_sampling_with_lookup_drafts_keeps_plain_sampling_text_for_the_same_seed(params):
    """A lookup draft is a point mass: the row picks as plain decoding does and accepts the draft if it is that pick."""
    for seed, prompt in itertools.product(range(6), PROMPTS):
        target = table(20 + seed, scale=3.0)
        plain = decode(target, prompt, params, 25, seed=seed)
        assert decode(target, prompt, params, 25, seed=seed, speculate="lookup")[:3] == plain[:3]


def test_lookup_drafts_are_checked_only_where_they_repay_an_extend():
    target, prompt = table(3), [1, 2, 3, 1, 2, 3, 1, 2]
    plain = decode(target, prompt, GREEDY, 30)
    costly = decode(target, prompt, GREEDY, 30, speculate="lookup", costs=CallCosts(prior_ratio=50.0, measure=False))
    cheap = decode(target, prompt, GREEDY, 30, speculate="lookup", costs=CallCosts(prior_ratio=1.0, measure=False))
    assert costly[:3] == cheap[:3] == plain[:3]
    assert costly[3].drafted == 0 and cheap[3].drafted > 0


def test_call_costs_grow_with_the_tokens_an_extend_is_fed():
    costs = CallCosts(prior_ratio=2.0)
    assert costs.ratio(1) == costs.ratio(5) == 2.0
    costs.record("extend", 3.0, 3)  # no step measured yet: nothing to compare it with
    costs.record("step", 1.0)
    assert costs.ratio(5) == 2.0
    costs.record("extend", 3.0, 3)  # two tokens past the first added 2 s: 1 s each
    assert costs.ratio(1) == 1.0 and costs.ratio(3) == 3.0 and costs.ratio(5) == 5.0
    costs.record("extend", 1.5, 2)
    assert costs.per_token == pytest.approx(0.8 * 1.0 + 0.2 * 0.5)
    for _ in range(40):
        costs.record("extend", 0.5, 4)
    assert costs.ratio(4) == pytest.approx(1.0, abs=1e-2)  # an extend never counts as cheaper than a step


def test_a_lookup_draft_is_cut_to_the_length_that_pays_best():
    """Acceptance a = 4 / 5.5 (bucket 4's prior): k drafts yield (1 - a^(k+1)) / (1 - a) tokens for 1 + c k steps.
    At c = 0.5 one draft yields the most per step (1.15), at c = 0.1 four (2.09), at c = 4 none beats a step."""
    draft = Draft([5, 6, 7, 8, 9, 10], None, 4)
    for per_token, best in ((0.5, 1), (0.1, 4), (4.0, 0)):
        costs = CallCosts()
        costs.record("step", 1.0)
        costs.record("extend", 1.0 + per_token, 2)
        assert SpeculatingRow(None, [], NoDrafter(), 6, 6)._worth_checking(draft, costs, fed=1) == best


def exact_distribution(target: torch.Tensor, prompt: list[int], params: SamplingParams, length: int) -> dict:
    """Probability of every sequence of the first `length` tokens under plain sampling, by enumeration."""
    out: dict[tuple[int, ...], float] = {}

    def walk(seq: list[int], prob: float) -> None:
        if len(seq) == len(prompt) + length:
            out[tuple(seq[len(prompt):])] = prob
            return
        sampler = RowSampler(params, list(seq), 0, VOCAB)
        processed = sampler.process(TableEngine(target).logits_after(seq))
        probs, indices = sampling_probs(processed, params)
        for p, token in zip(probs.tolist(), indices.tolist(), strict=True):
            if p > 0:
                walk(seq + [token], prob * p)

    walk(list(prompt), 1.0)
    return out


def chi_square_p_value(counts: Counter, expected: dict, n: int) -> float:
    """Pearson's test of `counts` (n draws) against `expected` probabilities; cells expecting < 5 are pooled."""
    assert set(counts) <= set(expected), set(counts) - set(expected)
    big = [k for k, p in expected.items() if p * n >= 5]
    small = [k for k in expected if k not in big]
    observed = [counts[k] for k in big] + ([sum(counts[k] for k in small)] if small else [])
    wanted = [expected[k] * n for k in big] + ([sum(expected[k] for k in small) * n] if small else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True))
    dof = torch.tensor(float(len(observed) - 1))
    return float(1 - torch.distributions.Chi2(dof).cdf(torch.tensor(stat)))


@pytest.mark.parametrize("params", SAMPLING)
@pytest.mark.parametrize("drafter", ["lookup", "model"])
def test_speculative_sampling_keeps_the_target_distribution(params, drafter):
    """The first three tokens over 3,000 seeds against the exactly enumerated distribution of plain sampling."""
    target, prompt, length, n = table(11, scale=1.0), [1, 2, 3, 1, 2, 3, 1, 2], 3, 3000
    speculate = "lookup" if drafter == "lookup" else target + table(12, scale=0.8)
    expected = exact_distribution(target, prompt, params, length)
    counts, stats = Counter(), SpeculationStats()
    for seed in range(n):
        ids, _, _, row_stats, _ = decode(target, prompt, params, length, seed=seed, speculate=speculate)
        counts[tuple(ids)] += 1
        stats += row_stats
    assert min(stats.accepted, stats.drafted - stats.accepted) > 100  # drafts accepted and rejected, often
    assert chi_square_p_value(counts, expected, n) > 1e-3


def test_the_distribution_test_catches_a_wrong_acceptance_rule(monkeypatch):
    """Power check: accepting every lookup draft that p allows at all (a plausible bug) is caught."""
    import rugpt.speculative as speculative

    def accept_whenever_possible(sampler, logits, draft, q, allowed=None):
        processed = sampler.process(logits)
        probs, indices = sampling_probs(processed, sampler.params)
        token = draft if draft in indices.tolist() else int(indices[0])
        sampler.history.append(token)
        return token, token == draft

    monkeypatch.setattr(speculative, "judge", accept_whenever_possible)
    target, prompt, params, n = table(11, scale=1.0), [1, 2, 3, 1, 2, 3, 1, 2], SAMPLING[0], 1000
    counts = Counter(tuple(decode(target, prompt, params, 3, seed=s, speculate="lookup")[0]) for s in range(n))
    assert chi_square_p_value(counts, exact_distribution(target, prompt, params, 3), n) < 1e-6


def test_plain_sampling_passes_the_same_distribution_test():
    target, prompt, params, n = table(11, scale=1.0), [1, 2, 3, 1, 2, 3, 1, 2], SAMPLING[1], 2000
    counts = Counter(tuple(decode(target, prompt, params, 3, seed=s)[0]) for s in range(n))
    assert chi_square_p_value(counts, exact_distribution(target, prompt, params, 3), n) > 1e-3


def test_lookup_proposes_what_followed_the_latest_longest_match():
    drafter = LookupDrafter(vocab_size=100)
    # "7 8 9" occurs twice before the end; the latest earlier occurrence is followed by 4 5
    context = [7, 8, 9, 1, 2, 7, 8, 9, 4, 5, 6, 7, 8, 9]
    assert drafter.propose(context, 3) == Draft([4, 5, 6], match=3)
    assert LookupDrafter(100).propose([3, 1, 2, 7, 8, 9, 4, 3, 1, 2, 7, 8, 9], 2) == Draft([4, 3], match=6)
    assert drafter.propose(context + [4], 10).tokens == [5, 6, 7, 8, 9, 4]  # the text grows: index updated
    assert LookupDrafter(100).propose([1, 2, 3, 4], 4) == Draft()  # nothing repeats: no draft
    assert LookupDrafter(100).propose([5, 1, 5], 4).tokens == [1, 5]  # a 1-gram match


def test_lookup_never_drafts_tokens_past_the_vocabulary():
    assert LookupDrafter(vocab_size=10).propose([1, 2, 50, 3, 1, 2], 4).tokens == []
    assert LookupDrafter(vocab_size=10).propose([1, 2, 3, 50, 1, 2], 4).tokens == [3]


def test_a_draft_model_of_another_vocabulary_is_refused_in_one_sentence():
    class Other(Letters):
        def get_vocab(self):
            return {"x": 0}

    with pytest.raises(UsageError, match=r"speculate='tiny': the draft model's tokenizer \(1 tokens\) is not") as info:
        check_same_vocabulary("tiny", Other(), Letters())
    assert str(info.value).count(". ") == 0
    check_same_vocabulary("same", Letters(), Letters())


def test_bundled_model_quoting_a_passage_keeps_its_text_with_fewer_engine_calls(bundled):
    from rugpt.generation import GenerationSettings, Generator

    passage = ("Ванька Жуков, девятилетний мальчик, отданный три месяца тому назад в ученье к сапожнику Аляхину, "
               "в ночь под Рождество не ложился спать. Дождавшись, когда хозяева и подмастерья ушли к заутрене, "
               "он достал из хозяйского шкапа пузырёк с чернилами, ручку с заржавленным пером и, разложив перед "
               "собой измятый лист бумаги, стал писать.")
    prompt = f"Отрывок:\n{passage}\n\nПовтори отрывок:\n{passage[:90]}"
    generator = Generator(bundled)
    generator.speculator("lookup").costs = CallCosts(prior_ratio=1.0, measure=False)  # check every draft
    for settings in (GenerationSettings.from_preset("greedy", no_repeat_ngram_size=0, max_new_tokens=60),
                     GenerationSettings(max_new_tokens=60, seed=4)):
        plain = generator.generate(prompt, settings)
        fast = generator.generate(prompt, settings, speculate="lookup")
        assert fast.completions == plain.completions
        assert fast.speculation.rounds < len(fast.completions[0].token_ids)
