"""The bundled model end to end: the README's first command, seeds, stops, engines' agreement."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rugpt.cli import app
from rugpt.engines import create_engine
from rugpt.generation import GenerationSettings, Generator
from rugpt.training.corpus import is_heldout, iter_ruslit

PUSHKIN = "Александр Сергеевич Пушкин родился"


def test_readme_command_prints_russian_continuation(bundled):
    result = CliRunner().invoke(app, ["generate", PUSHKIN, "--seed", "1", "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PUSHKIN)
    continuation = result.stdout[len(PUSHKIN):]
    assert sum("а" <= c.lower() <= "я" for c in continuation) >= 5


def test_same_seed_same_text_twice(bundled):
    generator = Generator(bundled)
    settings = GenerationSettings.from_preset("creative", max_new_tokens=30, seed=123)
    assert generator.generate(PUSHKIN, settings).text == generator.generate(PUSHKIN, settings).text


def test_stop_string_cuts_before_it(bundled):
    generator = Generator(bundled)
    settings = GenerationSettings(max_new_tokens=60, seed=3, stop=(",",))
    result = generator.generate("Однажды вечером", settings)
    assert "," not in result.text
    full = generator.generate("Однажды вечером", settings, stop=())
    assert "," in full.text  # Russian prose of 60 tokens has a comma, so the stop string had something to cut
    assert full.text.startswith(result.text) and full.text[len(result.text)] == ","
    assert result.completions[0].finish_reason == "stop"


def test_json_output_names_the_engine(bundled):
    result = CliRunner().invoke(app, ["generate", PUSHKIN, "--max-new-tokens", "5", "--json", "--preset", "greedy"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["engine"] == "fast-fp32" and payload["model"] == "tiny"


def greedy_path(engine, ids, steps):
    """Logits at every step of a greedy run, and the tokens it chose."""
    row, logits = engine.prefill(ids)
    all_logits, tokens = [logits], []
    for _ in range(steps):
        tokens.append(int(all_logits[-1].argmax()))
        all_logits.append(engine.step([row], [tokens[-1]])[0])
    engine.release(row)
    return torch.stack(all_logits), tokens


def forced_logits(engine, ids, tokens):
    row, logits = engine.prefill(ids)
    out = [logits] + [engine.step([row], [t])[0] for t in tokens]
    engine.release(row)
    return torch.stack(out)


def test_fast_engine_logits_match_transformers_for_128_greedy_steps(bundled):
    ids = bundled.tokenizer(PUSHKIN)["input_ids"]
    reference, tokens = greedy_path(create_engine(bundled, "transformers"), ids, 128)
    fast = forced_logits(create_engine(bundled, "fast"), ids, tokens)
    assert (fast - reference).abs().max().item() < 1e-3


def engine_perplexity(engine, ids: list[int]) -> float:
    """Perplexity of `ids` computed through the decode interface, one token at a time."""
    row, logits = engine.prefill(ids[:1])
    nats = 0.0
    for token in ids[1:]:
        nats -= torch.log_softmax(logits, -1)[token].item()
        logits = engine.step([row], [token])[0]
    engine.release(row)
    return math.exp(nats / (len(ids) - 1))


@pytest.mark.parametrize("compressed", ["fast-bf16", "fast-fp16", "fast-int8"])
def test_compressed_weights_keep_heldout_perplexity_within_2_percent(bundled, shared_data, compressed):
    doc = next(d for d in iter_ruslit(shared_data / "ruslit") if is_heldout(d.source, 0.03))
    ids = bundled.tokenizer(doc.text[:3000])["input_ids"][: bundled.context_length - 1]
    exact = engine_perplexity(create_engine(bundled, "fast"), ids)
    approx = engine_perplexity(create_engine(bundled, compressed), ids)
    assert abs(approx - exact) / exact < 0.02, (exact, approx)
