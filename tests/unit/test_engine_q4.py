"""fast-q4: 4-bit blocks and their tiles, the compiled products against a dequantized reference, the engine."""

import logging
import shutil

import pytest
import torch
from _engine_helpers import prompt_ids, run_tokens

from rugpt.engines import create_engine, native
from rugpt.engines.fast import FastEngine
from rugpt.engines.q4 import (
    BLOCK,
    dequantize_q4,
    pack_q4,
    q4_head_format,
    quantize_q4,
    reference_product,
    tile_q4,
    untile_q4,
)


@pytest.fixture
def kernel():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    built = native.step_kernel()
    if built is None or "q4" not in built.formats:
        pytest.skip("this CPU's build does not read q4 (no AVX-512 VNNI)")
    return built


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    from conftest import build_tiny_model
    from rugpt.models import load

    return load(str(build_tiny_model(tmp_path_factory.mktemp("tiny64"), n_embd=64)), device="cpu")


def _dequantized(linear, out: int | None = None) -> torch.Tensor:
    """The fp32 weight [out, in padded to whole blocks] that a q4-packed linear stands for."""
    return dequantize_q4(*untile_q4(linear.weight, out or linear.bias.shape[0]))


def test_codes_survive_the_tiles_and_stay_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 100, generator=gen)  # rows not in whole tiles, columns not in whole blocks
    q, d, m = quantize_q4(weight, pad_to=128)
    assert q.shape == (37, 128) and d.shape == m.shape == (37, 128 // BLOCK) and int(q.max()) <= 15
    back = untile_q4(tile_q4(q, d, m), 37)
    assert all(torch.equal(a, b) for a, b in zip((q, d, m), back, strict=True))
    error = (dequantize_q4(q, d, m)[:, :100] - weight).abs()
    step = d.float().repeat_interleave(BLOCK, dim=1)[:, :100]
    assert bool((error <= step * 0.5 + 1e-3).all())  # padded columns need not be 0: they meet 0 inputs


def test_symmetric_blocks_are_q4_0():
    q, d, m = quantize_q4(torch.randn(16, 64), mins=False)
    torch.testing.assert_close(m.float(), -8 * d.float())


@pytest.mark.parametrize("out, n_in, rows", [(37, 100, 1), (37, 100, 5), (48, 768, 8), (300, 3072, 300)])
def test_kernel_products_equal_the_dequantized_reference(kernel, out, n_in, rows):
    """Exact up to float summation order: the reference quantizes activations per row the same way (rows past 256
    take the prefill's blocking, widths past whole blocks the padding)."""
    gen = torch.Generator().manual_seed(out + rows)
    weight, bias, x = torch.randn(out, n_in, generator=gen), torch.randn(out, generator=gen), \
        torch.randn(rows, n_in, generator=gen) * torch.linspace(0.1, 3, rows)[:, None]
    packed = pack_q4(weight, bias, kernel)
    assert packed.weight.dtype == torch.uint8
    expected = reference_product(x, _dequantized(packed)[:, :n_in], bias)
    torch.testing.assert_close(packed(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    gelu = torch.nn.functional.gelu(expected, approximate="tanh")  # the fused activation of the MLP's first layer
    torch.testing.assert_close(packed.tanh_gelu(x), gelu, atol=1e-4 * float(expected.abs().max()), rtol=0)


def _like_the_kernel(engine) -> None:
    """From now on the engine's products (prefills and torch steps) are the references, not the kernel."""
    def q4(linear, out=None):
        weight = _dequantized(linear, out)
        return lambda x: reference_product(x, weight[:, :x.shape[1]], linear.bias)

    def int8(linear):
        q = native.untile_int8(linear.weight, linear.scale.shape[0]).float()

        def forward(x):
            sx = x.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
            return (torch.round(x / sx) @ q.T) * sx * linear.scale

        return forward

    for layer in engine.layers:
        for linear in (layer.qkv, layer.proj, layer.fc, layer.out):
            linear.forward = q4(linear)
            linear.forward_gelu = None  # the fused GELU would still be the kernel's
    head = engine.lm_head
    head.forward = int8(head) if head.weight.dtype == torch.int8 else q4(head, engine.vocab_size)


@pytest.mark.parametrize("width", [32, 64])  # 32: every product padded to a whole block of 64
def test_native_q4_step_equals_the_reference_step(kernel, tiny, tiny64, width):
    loaded = tiny64 if width == 64 else tiny
    ids = prompt_ids(loaded)
    compiled, by_torch = (create_engine(loaded, "fast-q4") for _ in range(2))
    assert compiled.native is not None and compiled.name == "fast-q4"
    by_torch.native = None
    _like_the_kernel(by_torch)
    continuation = [5, 17, 240, 3, 99, 1024, 7]
    torch.testing.assert_close(run_tokens(compiled, ids, continuation), run_tokens(by_torch, ids, continuation),
                               atol=2e-4, rtol=1e-5)


def test_an_int8_head_mixes_with_q4_layers(kernel):
    """A head that is a small share of the weights stays at int8 (as for 13B); the step reads both types."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=2)).eval()
    assert q4_head_format(model, kernel) == "int8" and q4_head_format(model, None) == "q4"
    compiled, by_torch = (FastEngine(model, 32, 2, "q4") for _ in range(2))
    assert compiled.lm_head.weight.dtype == torch.int8 and compiled.layers[0].fc.weight.dtype == torch.uint8
    by_torch.native = None
    _like_the_kernel(by_torch)
    ids, continuation = [3, 17, 42, 5, 60], [8, 1, 33, 2]
    torch.testing.assert_close(run_tokens(compiled, ids, continuation), run_tokens(by_torch, ids, continuation),
                               atol=2e-4, rtol=1e-5)


def test_the_head_of_a_small_model_is_q4(tiny64, kernel):
    assert q4_head_format(tiny64.model, kernel) == "q4"  # 8000 x 64 against 2 layers of 64: most of the weights


def test_rows_stepped_together_give_the_logits_of_rows_alone(kernel, tiny64):
    """Each row's activations are quantized on their own and the block sums are integers: batching changes no
    bit, so greedy ids are the same too."""
    texts = ("Буря мглою", "Я помню чудное мгновенье, передо мной", "Ночь", "Мой дядя")
    prompts = [prompt_ids(tiny64, text) for text in texts]
    engine = create_engine(tiny64, "fast-q4", max_rows=4)

    def greedy(rows_prompts):
        rows, logits = zip(*(engine.prefill(p) for p in rows_prompts), strict=True)
        rows, steps = list(rows), [torch.stack(logits)]
        for _ in range(6):
            steps.append(engine.step(rows, steps[-1].argmax(-1).tolist()))
        engine.release_all()
        return torch.stack(steps, 1)  # [rows, steps, vocab]

    alone = torch.cat([greedy([p]) for p in prompts])
    together = greedy(prompts)
    assert torch.equal(together.argmax(-1), alone.argmax(-1))
    torch.testing.assert_close(together, alone, atol=0, rtol=0)


@pytest.fixture
def no_kernel(tmp_path, monkeypatch):
    """step_kernel() decided anew with RUGPT_NATIVE=0, and forgotten afterwards."""
    from rugpt.engines import q4

    monkeypatch.setenv("RUGPT_CACHE", str(tmp_path))
    monkeypatch.setenv("RUGPT_NATIVE", "0")
    native.step_kernel.cache_clear()
    q4._say_dequantizing.cache_clear()
    yield
    native.step_kernel.cache_clear()


def test_without_the_kernel_q4_dequantizes_each_layer(tiny, no_kernel, caplog):
    with caplog.at_level(logging.WARNING):
        engine = create_engine(tiny, "fast-q4")
    assert engine.native is None
    assert "RUGPT_NATIVE=0" in caplog.text and "dequantizing" in caplog.text
    reference = create_engine(tiny, "fast")
    reference.native = None
    for layer, mine in zip(reference.layers, engine.layers, strict=True):
        for name in ("qkv", "proj", "fc", "out"):
            theirs = getattr(layer, name)
            weight = _dequantized(getattr(mine, name))[:, :theirs.weight.shape[1]]
            theirs.forward = lambda x, w=weight, b=theirs.bias: torch.nn.functional.linear(x, w, b)
            theirs.forward_gelu = None
    head = _dequantized(engine.lm_head, engine.vocab_size)[:, :tiny.model.config.n_embd]
    reference.lm_head.forward = lambda x: x @ head.T
    ids = prompt_ids(tiny)
    torch.testing.assert_close(run_tokens(engine, ids, [5, 6]), run_tokens(reference, ids, [5, 6]), atol=1e-4, rtol=0)


def test_the_compiled_quantizer_writes_the_reference_bytes(kernel):
    """The C quantizer (engine start) and quantize_q4 + tile_q4 (the torch reference) agree byte for byte, reading
    a transposed view (GPT-2's Conv1D weights) in place."""
    from rugpt.engines.q4 import kernel_quantize_q4, padded

    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(200, 45, generator=gen) * 0.05).t()  # [45, 200], not contiguous
    weight[3, :64] = 0  # a block of zeros
    reference = tile_q4(*quantize_q4(weight, pad_to=padded(200, BLOCK)))
    assert torch.equal(kernel_quantize_q4(kernel, weight), reference)


def test_prefill_extend_and_steps_agree_to_the_bit(kernel, tiny):
    """Products of a prefill, an extend and a step quantize each token's activations alone and sum integers, so how
    tokens are grouped changes no product (only attention's float sums may differ in their last bits): what exact
    speculative decoding (a draft verified in one extend) needs. Measured here: equal to the bit."""
    engine = create_engine(tiny, "fast-q4")
    ids = prompt_ids(tiny, "Я помню чудное мгновенье: передо мной явилась ты, как мимолётное виденье")
    _, whole = engine.prefill(ids)
    row, _ = engine.prefill(ids[:3])
    for start in range(3, len(ids), 5):
        chunked = engine.extend(row, ids[start:start + 5])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    continuation = [5, 17, 99, 4]
    stepped = run_tokens(engine, ids, continuation)[1:]
    torch.testing.assert_close(engine.extend(row, continuation, all_logits=True), stepped, atol=1e-5, rtol=0)
