"""The prefix cache and chunked prompt prefill on a tiny random model: same logits, blocks reused, LRU budget."""

import pytest
import torch
from _engine_helpers import prompt_ids

from rugpt.engines import create_engine
from rugpt.engines.prefill import PromptPrefill
from rugpt.engines.prefix_cache import BLOCK_TOKENS, PrefixCache
from rugpt.errors import UsageError

STORY = ("Ты стоишь у входа в тёмную пещеру. Слева шумит река, справа поднимается узкая тропа в горы, "
         "а за спиной догорает костёр, у которого ты провёл ночь.")


def story_ids(tiny, more: str = "") -> list[int]:
    return prompt_ids(tiny, STORY + more)


def prefill_logits(engine, ids, cache=None, chunk=None) -> torch.Tensor:
    prefill = PromptPrefill(engine, ids, cache=cache)
    while prefill.logits is None:
        prefill.advance(chunk)
    logits = prefill.logits
    prefill.abandon()
    return logits


def block_bytes(tiny) -> int:
    config = tiny.model.config
    return config.n_layer * 2 * config.n_embd * BLOCK_TOKENS * 4  # fp32 keys and values


@pytest.mark.parametrize("choice", ["fast", "transformers"])
def test_a_prompt_from_cached_blocks_gives_the_logits_of_a_full_prefill(tiny, choice):
    engine = create_engine(tiny, choice)
    cache = PrefixCache(budget_bytes=10**9)
    first, second = story_ids(tiny), story_ids(tiny, " Ты идёшь к реке и видишь лодку.")
    assert len(first) > 2 * BLOCK_TOKENS
    torch.testing.assert_close(prefill_logits(engine, first, cache), prefill_logits(engine, first), atol=1e-4,
                               rtol=1e-4)
    assert len(cache) == len(first) // BLOCK_TOKENS
    reused = PromptPrefill(engine, second, cache=cache)
    reused.advance()
    assert reused.reused == len(first) // BLOCK_TOKENS * BLOCK_TOKENS
    torch.testing.assert_close(reused.logits, prefill_logits(engine, second), atol=1e-4, rtol=1e-4)
    assert cache.stats.hits == 1 and cache.stats.lookups == 2


def test_chunked_prefill_gives_the_logits_of_one_prefill(tiny):
    engine = create_engine(tiny, "fast")
    ids = story_ids(tiny)
    prefill = PromptPrefill(engine, ids)
    chunks = []
    while prefill.logits is None:
        chunks.append(prefill.advance(7))
    assert chunks[:-1] == [7] * (len(chunks) - 1) and sum(chunks) == len(ids)
    torch.testing.assert_close(prefill.logits, prefill_logits(engine, ids), atol=1e-4, rtol=1e-4)


def test_an_identical_prompt_keeps_its_last_token_to_compute(tiny):
    engine = create_engine(tiny, "fast")
    cache = PrefixCache(budget_bytes=10**9)
    ids = story_ids(tiny)[: 2 * BLOCK_TOKENS]  # exactly two blocks
    prefill_logits(engine, ids, cache)
    again = PromptPrefill(engine, ids, cache=cache)
    again.advance()
    assert again.reused == BLOCK_TOKENS  # the second block holds the last token, which must be computed
    torch.testing.assert_close(again.logits, prefill_logits(engine, ids), atol=1e-4, rtol=1e-4)


def test_the_budget_evicts_least_recently_used_leaves_first(tiny):
    engine = create_engine(tiny, "fast")
    cache = PrefixCache(budget_bytes=3 * block_bytes(tiny))
    base = story_ids(tiny)[: 2 * BLOCK_TOKENS]
    branch_a, branch_b = base + [5] * BLOCK_TOKENS + [1], base + [6] * BLOCK_TOKENS + [1]
    prefill_logits(engine, branch_a, cache)  # blocks: base0, base1, a
    assert len(cache) == 3 and cache.nbytes == 3 * block_bytes(tiny)
    prefill_logits(engine, branch_b, cache)  # adds b: a, the least recently used leaf, goes
    assert len(cache) == 3 and cache.stats.evicted_blocks == 1
    assert cache.lookup(branch_b).tokens == 3 * BLOCK_TOKENS
    assert cache.lookup(branch_a).tokens == 2 * BLOCK_TOKENS  # the shared beginning stayed


def test_a_budget_smaller_than_a_block_keeps_nothing(tiny):
    engine = create_engine(tiny, "fast")
    cache = PrefixCache(budget_bytes=block_bytes(tiny) - 1)
    prefill_logits(engine, story_ids(tiny), cache)
    assert len(cache) == 0 and cache.nbytes == 0


def test_prompts_given_as_embeddings_stay_out_of_the_cache(tiny):
    engine = create_engine(tiny, "fast")
    cache = PrefixCache(budget_bytes=10**9)
    ids = story_ids(tiny)
    embeds = tiny.model.get_input_embeddings()(torch.tensor(ids)).detach()
    prefill = PromptPrefill(engine, ids, embeds, cache)
    assert prefill.advance(8) == len(ids)  # one prefill: extend takes token ids only
    assert len(cache) == 0 and cache.stats.lookups == 0


def test_a_prompt_that_cannot_fit_fails_before_any_work(tiny):
    engine = create_engine(tiny, "fast")
    with pytest.raises(UsageError, match="does not fit the context"):
        PromptPrefill(engine, [1] * tiny.context_length)
    assert engine.active_rows == []
