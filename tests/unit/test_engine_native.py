"""rugpt's compiled batch-1 step: same answers as the torch step, built once into the cache, off without a compiler."""

import logging
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from _engine_helpers import prompt_ids, run_tokens

from rugpt.engines import create_engine, native
from rugpt.engines.linear import quantize_int8

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """step_kernel() decided anew, with the cache in a temp folder."""
    monkeypatch.setenv("RUGPT_CACHE", str(tmp_path))
    native.step_kernel.cache_clear()
    yield tmp_path
    native.step_kernel.cache_clear()


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny GPT-2 64 wide: int8 weights reach the kernel in whole 64-byte tiles only."""
    from conftest import build_tiny_model
    from rugpt.models import load

    return load(str(build_tiny_model(tmp_path_factory.mktemp("tiny64"), n_embd=64)), device="cpu")


def _int8_as_the_kernel_computes(linear):
    """y = (round(x / sx) · q) * sx * s + b with sx = max|x| / 127 per row: int8 activations, as VNNI sees them."""
    q = native.untile_int8(linear.weight, linear.scale.shape[0]).float()

    def forward(x):
        sx = x.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
        return (torch.round(x / sx) @ q.T) * sx * linear.scale + linear.bias

    return forward


def _bf16_as_the_kernel_computes(linear):
    """bf16 weights widened to fp32, fp32 activations (oneDNN's bf16 path rounds the activations too)."""
    bias = linear.bias.float() if linear.bias is not None else None
    return lambda x: F.linear(x, linear.weight.float(), bias)


def _step_like_the_kernel(engine) -> None:
    """From now on the torch side's products compute what the kernel's steps do (prefills stay the same
    torch ops in both engines)."""
    compute = {"int8": _int8_as_the_kernel_computes, "bf16": _bf16_as_the_kernel_computes}.get(engine.weights.value)
    if compute is None:
        return
    for layer in engine.layers:
        for linear in (layer.qkv, layer.proj, layer.fc, layer.out):
            linear.forward = compute(linear)
    engine.lm_head.forward = compute(replace(engine.lm_head, bias=torch.zeros(engine.vocab_size)))


def _pair(tiny, engine: str, max_rows: int = 16):
    """The same weights stepped by the compiled step and by torch ops (the same engine with its step taken off)."""
    compiled, by_torch = (create_engine(tiny, engine, max_rows=max_rows) for _ in range(2))
    if compiled.weights.value not in native.step_kernel().formats:
        pytest.skip(f"this CPU's build does not read {engine}")
    assert compiled.native is not None
    by_torch.native = None
    return compiled, by_torch


@needs_compiler
@pytest.mark.parametrize("engine", ["fast", "fast-bf16", "fast-int8"])
def test_native_step_equals_the_torch_step_logits_and_cache(tiny, tiny64, engine):
    tiny = tiny64 if engine == "fast-int8" else tiny
    ids = prompt_ids(tiny)
    continuation = [5, 17, 240, 3, 99, 1024, 7]
    compiled, by_torch = _pair(tiny, engine)
    rows = [compiled.prefill(ids)[0], by_torch.prefill(ids)[0]]
    _step_like_the_kernel(by_torch)
    for token in continuation:
        torch.testing.assert_close(compiled.step(rows[:1], [token]), by_torch.step(rows[1:], [token]),
                                   atol=1e-4, rtol=0)
    end = len(ids) + len(continuation)
    for mine, theirs in zip(compiled.k_cache + compiled.v_cache, by_torch.k_cache + by_torch.v_cache, strict=True):
        torch.testing.assert_close(mine[0, :, :end], theirs[0, :, :end], atol=1e-5, rtol=0)


@needs_compiler
@pytest.mark.parametrize("engine", ["fast", "fast-int8"])
def test_native_batched_ragged_step_equals_the_torch_step(tiny, tiny64, engine):
    tiny = tiny64 if engine == "fast-int8" else tiny
    texts = ("Буря мглою", "Я помню чудное мгновенье, передо мной", "Ночь")
    engines = _pair(tiny, engine, max_rows=4)
    logits = []
    for engine in engines:
        rows = [engine.prefill(prompt_ids(tiny, text))[0] for text in texts]
        _step_like_the_kernel(engine)
        order = [rows[2], rows[0], rows[1]]  # not in slot order
        logits.append(torch.stack([engine.step(order, [7 + i, 300 + i, 40 + i]) for i in range(4)]))
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


def test_int8_layers_not_in_whole_tiles_stay_on_torch(tiny):
    assert tiny.model.config.n_embd % 64
    assert create_engine(tiny, "fast-int8").native is None


def test_other_activations_do_not_use_it(tiny):
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


@needs_compiler
def test_int8_products_quantize_each_input_row():
    kernel = native.step_kernel()
    if "int8" not in kernel.formats:
        pytest.skip("this CPU has no VNNI")
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(37, 128, generator=gen), torch.randn(37, generator=gen)  # rows: no multiple of 8
    packed = native.int8_tiled(kernel, weight, bias)
    assert torch.equal(native.untile_int8(packed.weight, 37), quantize_int8(weight)[0])
    x = torch.randn(5, 128, generator=gen) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [0.0]])
    torch.testing.assert_close(packed(x), _int8_as_the_kernel_computes(packed)(x), atol=1e-4, rtol=1e-5)
