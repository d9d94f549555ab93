"""rugpt's compiled batch-1 step: same answers as the torch step, built once into the cache, off without a compiler."""

import logging
import shutil

import pytest
import torch
from _engine_helpers import prompt_ids, run_tokens

from rugpt.engines import create_engine, native

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """step_kernel() decided anew, with the cache in a temp folder."""
    monkeypatch.setenv("RUGPT_CACHE", str(tmp_path))
    native.step_kernel.cache_clear()
    yield tmp_path
    native.step_kernel.cache_clear()


@needs_compiler
def test_native_step_equals_the_torch_step_logits_and_cache(tiny):
    ids = prompt_ids(tiny)
    continuation = [5, 17, 240, 3, 99, 1024, 7]
    compiled = create_engine(tiny, "fast")
    assert compiled.native is not None
    by_torch = create_engine(tiny, "fast")
    by_torch.native = None
    torch.testing.assert_close(run_tokens(compiled, ids, continuation), run_tokens(by_torch, ids, continuation),
                               atol=1e-4, rtol=0)
    end = len(ids) + len(continuation)
    for mine, theirs in zip(compiled.k_cache + compiled.v_cache, by_torch.k_cache + by_torch.v_cache, strict=True):
        torch.testing.assert_close(mine[0, :, :end], theirs[0, :, :end], atol=1e-5, rtol=0)


@needs_compiler
def test_native_batched_ragged_step_equals_the_torch_step(tiny):
    texts = ("Буря мглою", "Я помню чудное мгновенье, передо мной", "Ночь")
    engines = [create_engine(tiny, "fast", max_rows=4) for _ in range(2)]
    engines[1].native = None
    logits = []
    for engine in engines:
        rows = [engine.prefill(prompt_ids(tiny, text))[0] for text in texts]
        order = [rows[2], rows[0], rows[1]]  # not in slot order
        logits.append(torch.stack([engine.step(order, [7 + i, 300 + i, 40 + i]) for i in range(4)]))
    assert engines[0].native is not None
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)


@needs_compiler
def test_native_step_serves_a_row_in_any_slot(tiny):
    engine = create_engine(tiny, "fast")
    first = engine.prefill(prompt_ids(tiny, "Один"))[0]
    second = engine.prefill(prompt_ids(tiny, "Два слова"))[0]
    alone = run_tokens(create_engine(tiny, "fast"), prompt_ids(tiny, "Два слова"), [5, 6])
    got = [engine.step([second], [5])[0], engine.step([second], [6])[0]]  # slot 1, while slot 0 waits
    torch.testing.assert_close(torch.stack(got), alone[1:], atol=1e-4, rtol=0)
    engine.release(first)


@needs_compiler
def test_kernel_is_built_once_into_the_cache(fresh_kernel):
    assert native.step_kernel() is not None
    (library,) = fresh_kernel.glob("native/*/librugpt_step.so")
    built_at = library.stat().st_mtime_ns
    native.step_kernel.cache_clear()
    assert native.step_kernel() is not None
    assert library.stat().st_mtime_ns == built_at
    assert not list(fresh_kernel.glob("native/.*"))  # no temp folder left behind


@pytest.mark.parametrize("env, reason", [
    ({"RUGPT_NATIVE": "0"}, "RUGPT_NATIVE=0"),
    ({"CC": "/nonexistent/cc"}, "No such file"),
    ({"CC": "false"}, "failed"),
])
def test_without_a_working_compiler_the_engine_steps_with_torch(tiny, fresh_kernel, monkeypatch, caplog, env, reason):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="rugpt.engines.native"):
        engine = create_engine(tiny, "fast")
    assert engine.native is None
    assert reason in caplog.text
    ids = prompt_ids(tiny)
    reference = run_tokens(create_engine(tiny, "transformers"), ids, [5, 6])
    torch.testing.assert_close(run_tokens(engine, ids, [5, 6]), reference, atol=1e-4, rtol=0)


def test_other_weight_formats_and_activations_do_not_use_it(tiny):
    assert create_engine(tiny, "fast-bf16").native is None
    tiny.model.config.activation_function = "relu"
    try:
        assert create_engine(tiny, "fast").native is None
    finally:
        tiny.model.config.activation_function = "gelu_new"


@needs_compiler
def test_two_threads_give_the_one_thread_answer(tiny):
    ids = prompt_ids(tiny)
    one = run_tokens(create_engine(tiny, "fast"), ids, [5, 6, 7])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = run_tokens(create_engine(tiny, "fast"), ids, [5, 6, 7])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)
