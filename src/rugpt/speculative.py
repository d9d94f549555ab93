"""Speculative decoding, exact: draft several tokens cheaply, check them all in one multi-token engine call.

Why: at batch 1 a decode step reads every weight once to produce one token; checking k drafted tokens in one
`extend` reads the weights once for all of them, so every accepted draft is a step saved. Two drafters:

- prompt lookup: the last n tokens (n = 3, 2, 1) are looked up in the prompt and the text so far and what
  followed their latest earlier occurrence is proposed (free, and strong when the answer quotes its prompt:
  summaries, extraction, chats that repeat names; arXiv:2304.04487 "Inference with Reference").
- a draft model: a smaller model of the same tokenizer (ruGPT-3 small for large) decodes k tokens ahead on
  rows of its own engine.

Checking (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318): the target's logits
at every drafted position are turned into the target distribution p by the row's own sampler (repetition
penalty, n-gram blocking, temperature, top-k, top-p: rugpt.sampling, the same code as plain decoding), with the
history up to that position. A sampled draft (a draft model that samples) is accepted with probability
min(1, p(x) / q(x)), and on rejection a token is drawn from norm(max(0, p - q)). A deterministic draft (lookup,
or a greedy draft model) is a point mass, for which that rule is: accept with p(x), else draw from p without x;
the row picks its token exactly as plain decoding does (the same draw of its generator) and the draft is
accepted when it is that token, which is this rule and keeps plain decoding's text, greedy or sampled, token for
token for the same seed. Either way each token is distributed as p, and all randomness comes from the row's
seeded generator: the same seed gives the same text. Rejected drafts are rolled back from the KV cache with
`truncate`; the last chosen token is fed with the next round's drafts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from rugpt.decoding import RowDecoder, RowStep
from rugpt.errors import RugptError, UsageError
from rugpt.sampling import SEED_SPACE, RowSampler, SamplingParams, candidates, sampling_probs

log = logging.getLogger(__name__)

LOOKUP = "lookup"
LOOKUP_NGRAMS = (3, 2, 1)  # longest match first: a longer match predicts its continuation better
MAX_MATCH = 16  # how far back a lookup match is measured (its length says how far to trust it)
# Tokens drafted in a row's first round; doubled after a fully accepted round, one fewer otherwise, up to the
# most: a draft model pays a step per drafted token, lookup nothing.
FIRST_DRAFT = {LOOKUP: 8, "model": 4, "none": 0}
MAX_DRAFT = {LOOKUP: 16, "model": 8, "none": 0}


@dataclass
class SpeculationStats:
    """How speculation went: tokens drafted, drafts accepted, and rounds (target engine calls)."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def __add__(self, other: SpeculationStats) -> SpeculationStats:
        return SpeculationStats(self.drafted + other.drafted, self.accepted + other.accepted,
                                self.rounds + other.rounds)

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds,
                "acceptance_rate": round(self.acceptance_rate, 4)}


@dataclass
class Draft:
    """Drafted tokens and, for a sampling draft model, the full distribution each was drawn from (q);
    `probs` is None for deterministic drafts (lookup, or a greedy draft model): q is a point mass."""

    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] | None = None
    match: int = 0  # for a lookup draft, how many tokens before it matched the end of the text (up to MAX_MATCH)


class LookupDrafter:
    """Prompt-lookup drafting for one row: an index from each n-gram to its latest occurrence that has a token
    after it, kept up to date as the text grows (so a lookup costs a dict access, not a scan)."""

    kind = LOOKUP

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size  # ids at or past it (a trained prompt's tokens) are never drafted
        self.tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram → start of its latest occurrence with a follower

    def propose(self, context: list[int], k: int) -> Draft:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix of `context`
        (which only ever grows: the prompt plus the text so far)."""
        for token in context[len(self.tokens) :]:
            self._add(token)
        tokens = self.tokens
        for n in LOOKUP_NGRAMS:
            start = self._latest.get(tuple(tokens[-n:])) if len(tokens) > n else None
            if start is not None:
                draft = tokens[start + n : start + n + k]
                cut = next((i for i, t in enumerate(draft) if t >= self.vocab_size), len(draft))
                return Draft(draft[:cut], match=self._match_length(start + n, n)) if cut else Draft()
        return Draft()

    def _match_length(self, end: int, n: int) -> int:
        """How many tokens before `end` equal the last ones of the text (at least the `n` looked up)."""
        tokens, length = self.tokens, n
        while length < MAX_MATCH and end - 1 - length >= 0 and tokens[end - 1 - length] == tokens[-1 - length]:
            length += 1
        return length

    def release(self) -> None:
        pass

    def _add(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens) - 1  # the n-grams ending just before the new token now have a follower
        for n in LOOKUP_NGRAMS:
            if end >= n:
                self._latest[tuple(self.tokens[end - n : end])] = end - n


class NoDrafter:
    """For a row that does not speculate but decodes in the same batch as rows that do: it never drafts, so each
    round it takes part in the batch's one-token step, exactly as `advance` would step it."""

    kind = "none"

    def propose(self, context: list[int], k: int) -> Draft:
        return Draft()

    def release(self) -> None:
        pass


class ModelDrafter:
    """Draft-model drafting for one row: its own row on the draft model's engine, brought up to the row's
    context each round (rolling back the drafts that were rejected), then k tokens decoded ahead."""

    kind = "model"

    def __init__(self, engine, context: list[int], params: SamplingParams, seed: int):
        self.engine = engine
        self.params = params
        self.sampler = RowSampler(params, [], seed, engine.sampleable_vocab)
        self.row: int | None = None
        self.fed: list[int] = []  # the tokens in the draft row's cache
        context = self._visible(context)
        if len(context) + 1 >= engine.context_length:
            log.info("the prompt does not fit the draft model's context of %d tokens: no drafts for this row",
                     engine.context_length)
            return
        self.row, self.logits = engine.prefill(context)
        self.fed = list(context)

    def propose(self, context: list[int], k: int) -> Draft:
        if self.row is None:
            return Draft()
        context = self._visible(context)
        k = min(k, self.engine.context_length - len(context) + 1)  # the last draft is never fed
        if k <= 0:
            return Draft()
        logits = self._catch_up(context)
        self.sampler.history = list(context)
        tokens, probs = [], []
        for i in range(k):
            processed = self.sampler.process(logits)
            if not torch.isfinite(processed).any():  # nothing the draft may pick: the target decides alone
                break
            if self.params.do_sample:
                chosen, indices = sampling_probs(processed, self.params)
                q = torch.zeros(processed.numel())
                q[indices] = chosen
                token = int(torch.multinomial(q, 1, generator=self.sampler.generator))
                probs.append(q)
            else:
                token = int(torch.argmax(candidates(processed)))
            tokens.append(token)
            self.sampler.history.append(token)
            if i + 1 < k:
                logits = self.logits = self.engine.step([self.row], [token])[0]
                self.fed.append(token)
        return Draft(tokens, probs if self.params.do_sample else None)

    def release(self) -> None:
        if self.row is not None:
            self.engine.release(self.row)
            self.row = None

    def _visible(self, context: list[int]) -> list[int]:
        # a trained prompt's tokens lie past the shared vocabulary: the draft model reads the plain text only
        return [t for t in context if t < self.engine.sampleable_vocab]

    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Roll the draft row back to where it agrees with `context`, feed the rest; the next-token logits."""
        fed, common = self.fed, 0
        while common < min(len(fed), len(context)) and fed[common] == context[common]:
            common += 1
        if common == len(context) == len(fed):
            return self.logits
        common = min(common, len(context) - 1)  # at least one token is fed, for fresh logits
        if common == 0:  # nothing shared (cannot happen for a growing context): start the row again
            self.engine.release(self.row)
            self.row, self.logits = self.engine.prefill(context)
            self.fed = list(context)
            return self.logits
        if common < len(fed):
            self.engine.truncate(self.row, common)
            del fed[common:]
        new = context[common:]
        fed.extend(new)
        self.logits = self.engine.step([self.row], new)[0] if len(new) == 1 else self.engine.extend(self.row, new)
        return self.logits


class DraftModel:
    """A smaller model of the target's tokenizer with an engine of its own, shared by all rows that draft."""

    def __init__(self, loaded, target_tokenizer, engine_choice, name: str):
        check_same_vocabulary(name, loaded.tokenizer, target_tokenizer)
        self.loaded, self.engine_choice, self.name = loaded, engine_choice, name
        self.engine = None

    def reserve(self, rows: int) -> None:
        """An engine with room for `rows` rows (rebuilt only while none of its rows is active)."""
        from rugpt.engines import create_engine

        if self.engine is None or (self.engine.max_rows < rows and not self.engine.lengths):
            self.engine = create_engine(self.loaded, self.engine_choice, max_rows=max(rows, 8))


def check_same_vocabulary(name: str, draft_tokenizer, target_tokenizer) -> None:
    """Refuse a draft model whose tokens are not the target's: its drafts would be other text."""
    draft, target = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if draft != target:
        raise UsageError(f"speculate={name!r}: the draft model's tokenizer ({len(draft)} tokens) is not the target "
                         f"model's ({len(target)} tokens); use a draft model of the same tokenizer family, "
                         f"such as ruGPT-3 small for ruGPT-3 large, or speculate='lookup'")


class CallCosts:
    """Seconds per engine call, measured as decoding goes: a one-row step, and what each token fed to an extend
    (checking a draft) adds to a step.

    A round that feeds k tokens costs `ratio(k)` steps and pays only when the tokens it is expected to yield
    outnumber that. On a big model an extend reads all weights once, as a step does, and a token more adds little;
    on the small bundled model each token adds its own share of the work (its attention, its columns of every
    product: about a third of a step), so a short draft may pay where a long one at the same odds would not.
    Lookup drafts leave the text unchanged whatever this decides (see `judge`), so measured times may steer it."""

    def __init__(self, prior_ratio: float = 1.5, measure: bool = True):
        self.prior_ratio, self.measure = prior_ratio, measure
        self.step: float | None = None
        self.per_token: float | None = None  # seconds an extend adds per token fed past the first

    def ratio(self, fed: int) -> float:
        """The cost of an extend by `fed` tokens, in one-row steps (the prior until both are measured)."""
        if self.step is None or self.per_token is None:
            return self.prior_ratio
        return 1.0 + self.per_token * max(fed - 1, 0) / self.step

    def record(self, kind: str, seconds: float, fed: int = 1) -> None:
        if not self.measure:
            return
        if kind == "step":
            self.step = self._average(self.step, seconds)
        elif self.step is not None and fed > 1:  # an extend never counts as cheaper than a step
            self.per_token = self._average(self.per_token, max(seconds - self.step, 0.0) / (fed - 1))

    @staticmethod
    def _average(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new


def match_bucket(length: int) -> int:
    """Lookup matches grouped by length (1, 2, 3, 4-7, 8-15, 16+) for counting how often their drafts hold."""
    return length if length < 4 else 4 if length < 8 else 8 if length < 16 else 16


# How often a lookup draft token is right, by match bucket b, before a row has counts of its own: b / (b + 1.5)
# at the weight of this many judged tokens. Measured on the bundled model's greedy text (quoting, summaries, a
# chat): 38% after a 1-token match, 48% after 2, 69% after 3, 73-90% after 4-7, 98% after 16 or more.
PRIOR_WEIGHT = 4.0


@dataclass(eq=False)
class SpeculatingRow:
    """A row of the decode core that picks its tokens by drafting and checking several per engine call.

    Between rounds the engine holds the prompt and every picked token but the last (`pending`), which is fed
    together with the next drafts: one engine call per round (`plan`, the call, then `settle`)."""

    row: RowDecoder
    prompt: list[int]
    drafter: LookupDrafter | ModelDrafter | NoDrafter
    draft_size: int
    max_draft: int
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    pending: bool = False
    judged: dict[int, tuple[int, int]] = field(default_factory=dict)  # match bucket → (accepted, judged) drafts
    _draft: Draft = field(default_factory=Draft)
    _kept: int = 0  # cache length to keep: the context once the pending token is fed

    @classmethod
    def plain(cls, row: RowDecoder, prompt_ids: list[int]) -> SpeculatingRow:
        """A row that never drafts, to decode in one batch with speculating rows (see `advance_speculating`)."""
        return cls(row, list(prompt_ids), NoDrafter(), 0, 0)

    def plan(self, engine, costs: CallCosts) -> list[int]:
        """Draft for this round; the tokens to feed the engine (the pending token, then the drafts)."""
        row = self.row
        room = min(row.limit - len(row.ids) - 1, self.draft_size)  # a round picks up to k + 1 tokens
        draft = Draft()
        feed = row.ids[-1:] if self.pending else []
        if room > 0:
            draft = self.drafter.propose(self.prompt + row.ids, room)
            if draft.match:
                draft = Draft(draft.tokens[:self._worth_checking(draft, costs, len(feed))], None, draft.match)
        self._draft, self._kept = draft, engine.lengths[row.engine_row] + len(feed)
        return feed + draft.tokens

    def settle(self, engine, logits: torch.Tensor) -> list[RowStep]:
        """Judge the drafts against `logits` (after each fed token), roll back the rejected ones; the steps of
        the picked tokens, the last one finishing the row when it ended."""
        row, draft = self.row, self._draft
        if self.pending:
            row.logits, logits = logits[0], logits[1:]
        steps, accepted = self._judge(logits, draft)
        if accepted < len(draft.tokens) and steps[-1].finish is None:
            engine.truncate(row.engine_row, self._kept + accepted)
        self.pending = True
        self._adapt(draft, accepted, steps[-1].finish is not None)
        return steps

    def release(self) -> None:
        self.drafter.release()

    def _worth_checking(self, draft: Draft, costs: CallCosts, fed: int) -> int:
        """How many of a lookup draft's tokens to check after the `fed` tokens already in this round's call: the
        count whose expected yield (the accepted run plus one, acceptance a geometric run at the rate of this
        match length so far) per step of the call's cost is highest; 0 where none beats a plain step."""
        bucket = match_bucket(draft.match)
        accepted, judged = self.judged.get(bucket, (0, 0))
        alpha = min((accepted + PRIOR_WEIGHT * bucket / (bucket + 1.5)) / (judged + PRIOR_WEIGHT), 0.99)
        best, best_yield = 0, 1.0
        for k in range(1, len(draft.tokens) + 1):
            per_step = (1 - alpha ** (k + 1)) / (1 - alpha) / costs.ratio(fed + k)
            if per_step >= best_yield:
                best, best_yield = k, per_step
        return best

    def _judge(self, logits: torch.Tensor, draft: Draft) -> tuple[list[RowStep], int]:
        """Pick tokens from the logits at the drafted positions in turn, drafts accepted or not; stop at the
        first rejection (its replacement is the last pick) or after one pick past the last draft."""
        row, steps = self.row, []
        for i, token in enumerate(draft.tokens):
            q = None if draft.probs is None else draft.probs[i]
            allowed = row.grammar.allowed() if row.grammar is not None else None
            chosen, accepted = judge(row.sampler, row.logits, token, q, allowed)
            steps.append(row.take(chosen))
            if steps[-1].finish is not None:
                return steps, i + int(accepted)
            if not accepted:
                return steps, i
            row.logits = logits[i]
        steps.append(row.pick())
        return steps, len(draft.tokens)

    def _adapt(self, draft: Draft, accepted: int, finished: bool) -> None:
        drafted = len(draft.tokens)
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.rounds += 1
        if drafted == 0:
            return
        if draft.match:
            bucket = match_bucket(draft.match)
            judged = accepted if accepted == drafted or finished else accepted + 1
            old = self.judged.get(bucket, (0, 0))
            self.judged[bucket] = (old[0] + accepted, old[1] + judged)
        grow = accepted == drafted
        self.draft_size = min(2 * self.draft_size, self.max_draft) if grow else max(self.draft_size - 1, 1)


def advance_speculating(engine, rows: list[SpeculatingRow], costs: CallCosts) -> list[list[RowStep] | Exception]:
    """One round for every row: draft, one engine call, judge. Rows with nothing drafted (this round, or ever:
    `SpeculatingRow.plain`) step together in one call, as `advance` steps them; each row with drafts extends by
    them. So rows that speculate and rows that do not share a batch.

    Returns one outcome per row, in order: its steps, or the exception its judging raised (as `advance` does)."""
    feeds = [row.plan(engine, costs) for row in rows]
    logits = [torch.empty(0)] * len(rows)
    single = [i for i, feed in enumerate(feeds) if len(feed) == 1]
    if single:
        start = time.perf_counter()
        out = engine.step([rows[i].row.engine_row for i in single], [feeds[i][0] for i in single])
        if len(single) == 1:
            costs.record("step", time.perf_counter() - start)
        for i, row_logits in zip(single, out, strict=True):
            logits[i] = row_logits[None]
    for i, feed in enumerate(feeds):
        if len(feed) > 1:
            start = time.perf_counter()
            logits[i] = engine.extend(rows[i].row.engine_row, feed, all_logits=True)
            costs.record("extend", time.perf_counter() - start, len(feed))
    outcomes: list[list[RowStep] | Exception] = []
    for row, row_logits in zip(rows, logits, strict=True):
        try:
            outcomes.append(row.settle(engine, row_logits))
        except Exception as exc:  # this row's fault (its settings, its logits): it alone stops
            outcomes.append(exc)
    return outcomes


def judge(sampler: RowSampler, logits: torch.Tensor, draft: int, q: torch.Tensor | None,
          allowed: torch.Tensor | None = None) -> tuple[int, bool]:
    """The row's token at a drafted position, and whether it is the draft; appended to the sampler's history.

    The target distribution p is what the row's sampler makes of `logits` (penalties, n-gram blocking, a
    grammar's `allowed` tokens, temperature, top-k, top-p). A deterministic draft (`q` None: lookup, or a
    greedy draft model) is a point mass, for which the standard rule accepts with probability p(draft) and
    otherwise draws from p without the draft: exactly what picking as plain decoding does (the same generator
    draw) and comparing gives. So greedy and lookup keep plain decoding's text for the same seed, token for
    token. A sampled draft accepts with min(1, p(draft) / q(draft)), else draws from norm(max(0, p - q))."""
    if q is None:
        token = sampler.next_token(logits, allowed)
        return token, token == draft
    processed = sampler.target_logits(logits, allowed)
    chosen, indices = sampling_probs(processed, sampler.params)
    p = torch.zeros(processed.numel(), dtype=torch.float64)
    p[indices] = chosen.double()
    q = _aligned(q, p.numel())
    u = float(torch.rand((), dtype=torch.float64, generator=sampler.generator))
    if draft < p.numel() and u * float(q[draft]) < float(p[draft]):
        token, accepted = draft, True
    else:
        residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability ~0
            residual = p
        token, accepted = int(torch.multinomial(residual, 1, generator=sampler.generator)), False
    sampler.history.append(token)
    return token, accepted


def _aligned(q: torch.Tensor, size: int) -> torch.Tensor:
    """The draft's distribution over the target's logit rows (the two may pad their vocabularies differently)."""
    q = q.double()
    if q.numel() >= size:
        return q[:size]
    return torch.cat([q, q.new_zeros(size - q.numel())])


class Speculator:
    """Makes speculating rows for one `speculate` setting: 'lookup', or a draft model's name or path."""

    def __init__(self, speculate: str, target, engine_choice):
        self.speculate = speculate
        self.costs = CallCosts()  # of the target engine's calls, for deciding when a lookup draft pays
        self.draft: DraftModel | None = None
        if speculate != LOOKUP:
            from rugpt.models import load

            device = str(target.model.device) if getattr(target, "model_built", True) else None
            try:
                loaded = load(speculate, device=device)
            except RugptError as exc:  # say which setting named the model
                raise type(exc)(f"speculate={speculate!r} is 'lookup' or a draft model, and {exc}") from None
            self.draft = DraftModel(loaded, target.tokenizer, engine_choice, speculate)

    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows that will speculate together (a draft model's engine rows)."""
        if self.draft is not None:
            self.draft.reserve(rows)

    def start(self, row: RowDecoder, prompt_ids: list[int], vocab_size: int) -> SpeculatingRow:
        """Wrap a freshly started row (prefilled, nothing picked yet) so that it decodes speculatively."""
        if self.draft is None:
            drafter = LookupDrafter(vocab_size)
        else:
            # The draft's own randomness, drawn from the row's generator: the same seed drafts the same tokens.
            seed = int(torch.randint(0, 2**62, (1,), generator=row.sampler.generator)) % SEED_SPACE
            drafter = ModelDrafter(self.draft.engine, prompt_ids, row.sampler.params, seed)
        return SpeculatingRow(row, list(prompt_ids), drafter, FIRST_DRAFT[drafter.kind], MAX_DRAFT[drafter.kind])
