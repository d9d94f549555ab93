"""rugpt's compiled batch-1 step: same answers as the torch step, built once into the cache, off without a compiler."""

import logging
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from _engine_helpers import prompt_ids, run_tokens

from rugpt.engines import create_engine, native
from rugpt.engines.linear import pack_linear, quantize_int8

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
            linear.forward_gelu = None  # the fused GELU would still be the kernel's
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
@pytest.mark.parametrize("out, n_in, rows", [(37, 128, 5), (37, 128, 32), (24, 64, 33), (300, 768, 300)])
def test_int8_products_quantize_each_input_row(out, n_in, rows):
    """Decode tiles (up to 31 rows) and the prefill's repacked panels (32 rows and more: 24 outputs leave the
    second half of a panel empty, 300 of them a partial one, 300 rows more than one token block)."""
    kernel = native.step_kernel()
    if "int8" not in kernel.formats:
        pytest.skip("this CPU has no VNNI")
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(out, n_in, generator=gen), torch.randn(out, generator=gen)
    packed = native.int8_tiled(kernel, weight, bias)
    assert torch.equal(native.untile_int8(packed.weight, out), quantize_int8(weight)[0])
    x = torch.randn(rows, n_in, generator=gen) * torch.linspace(0, 10, rows)[:, None]  # row 0: all zeros
    expected = _int8_as_the_kernel_computes(packed)(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(packed(x), expected, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(packed.tanh_gelu(x), F.gelu(expected, approximate="tanh"), atol=1e-5 * scale, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("out, n_in, rows", [(37, 128, 5), (37, 128, 32), (24, 64, 33), (300, 768, 300)])
def test_bf16_products_of_many_rows_round_the_inputs_once(out, n_in, rows):
    """From 32 rows on, the kernel's bf16 products (prefills) take the inputs rounded to bf16, as oneDNN's do, and
    sum in fp32; fewer rows (a batched step) multiply fp32 inputs by the widened weights."""
    kernel = native.step_kernel()
    if not kernel.bf16_prefill:
        pytest.skip("this CPU has no AVX-512 BF16")
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(out, n_in, generator=gen).bfloat16(), torch.randn(out, generator=gen).bfloat16()
    packed = pack_linear(weight, bias, "bf16")
    native.use_kernel(kernel, packed, n_in, out)
    x = torch.randn(rows, n_in, generator=gen) * torch.linspace(0, 10, rows)[:, None]
    inputs = x.bfloat16().float() if rows >= 32 else x
    expected = F.linear(inputs.double(), weight.double(), bias.double()).float()
    scale = float(expected.abs().max())
    torch.testing.assert_close(packed(x), expected, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(packed.tanh_gelu(x), F.gelu(expected, approximate="tanh"), atol=1e-5 * scale, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("head_dim", [16, 64, 96, 128])
@pytest.mark.parametrize("start, tokens", [(0, 1), (0, 7), (0, 300), (5, 1), (37, 20)])
def test_compiled_prefill_attention_equals_torch(head_dim, start, tokens):
    """Causal from position `start` (cached keys before it), query groups of 6 with remainders, head widths in one
    to two passes of 64 dimensions."""
    kernel = native.step_kernel()
    if kernel.attention is None:
        pytest.skip("no AVX-512")
    heads, ctx = 3, 400
    gen = torch.Generator().manual_seed(head_dim + start + tokens)
    queries, keys, values = (torch.randn(heads, ctx, head_dim, generator=gen) for _ in range(3))
    values[:, start + tokens:] = float("nan")  # never written: must never be read
    end = start + tokens
    qkv = torch.cat([t[:, start:end].transpose(0, 1).reshape(tokens, -1) for t in (queries, keys, values)], 1)
    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    expected = F.scaled_dot_product_attention(queries[:, start:end], keys[:, :end], values[:, :end], attn_mask=mask)
    got = native.prefill_attention(kernel, qkv.contiguous(), keys, values, start)
    torch.testing.assert_close(got, expected.transpose(0, 1).reshape(tokens, -1), atol=2e-5, rtol=1e-4)


@needs_compiler
def test_prefills_with_the_compiled_attention_equal_torch_attention(tiny):
    """Whole prompts and chunks after cached positions (the server's chunked prefill), all positions' logits."""
    compiled, by_torch = create_engine(tiny, "fast"), create_engine(tiny, "fast")
    if compiled.attention is None:
        pytest.skip("no compiled attention on this CPU")
    by_torch.attention = None
    ids = prompt_ids(tiny, "Мой дядя самых честных правил, когда не в шутку занемог, он уважать себя заставил "
                           "и лучше выдумать не мог.")
    assert len(ids) > 20
    results = []
    for engine in (compiled, by_torch):
        row, first = engine.prefill(ids[:13])
        results.append((first, engine.extend(row, ids[13:], all_logits=True)))
    for got, expected in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
