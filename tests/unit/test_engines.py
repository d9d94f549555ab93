import pytest
import torch
from _engine_helpers import prompt_ids, run_tokens

from rugpt.engines import create_engine
from rugpt.engines.fast import FastEngine
from rugpt.engines.linear import _int8_packed_mm, pack_linear, quantize_int8
from rugpt.errors import UsageError


def test_fast_logits_match_transformers_at_every_step(tiny):
    ids = prompt_ids(tiny)
    continuation = list(range(100, 140))
    reference = run_tokens(create_engine(tiny, "transformers"), ids, continuation)
    fast = run_tokens(create_engine(tiny, "fast"), ids, continuation)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)


def test_batched_ragged_step_equals_rows_alone(tiny):
    engine = create_engine(tiny, "fast")
    prompts = [prompt_ids(tiny, t) for t in ("Буря мглою", "Я помню чудное мгновенье, передо мной", "Ночь")]
    alone = [run_tokens(engine, p, [7, 8, 9]) for p in prompts]
    rows = [engine.prefill(p)[0] for p in prompts]
    batched = [engine.step(rows, [t, t, t]) for t in (7, 8, 9)]
    for i in range(3):
        torch.testing.assert_close(torch.stack([b[i] for b in batched]), alone[i][1:], atol=1e-5, rtol=1e-5)


def test_release_keeps_the_other_rows_intact(tiny):
    engine = create_engine(tiny, "fast")
    a, b, c = (engine.prefill(prompt_ids(tiny, t))[0] for t in ("Один", "Два слова", "Три слова тут"))
    expected_c = run_tokens(create_engine(tiny, "fast"), prompt_ids(tiny, "Три слова тут"), [5, 6])[1:]
    engine.release(a)  # row c moves into a's slot
    got = torch.stack([engine.step([c, b], [5, 5])[0], engine.step([c, b], [6, 6])[0]])
    torch.testing.assert_close(got, expected_c, atol=1e-5, rtol=1e-5)
    assert sorted(engine.active_rows) == sorted([b, c])


def test_step_in_any_order_returns_logits_in_that_order(tiny):
    engine = create_engine(tiny, "fast")
    r1 = engine.prefill(prompt_ids(tiny, "Один"))[0]
    r2 = engine.prefill(prompt_ids(tiny, "Два"))[0]
    forward = engine.step([r1, r2], [3, 4])
    engine2 = create_engine(tiny, "fast")
    s1 = engine2.prefill(prompt_ids(tiny, "Один"))[0]
    s2 = engine2.prefill(prompt_ids(tiny, "Два"))[0]
    backward = engine2.step([s2, s1], [4, 3])
    torch.testing.assert_close(backward[[1, 0]], forward)


def test_prefill_with_embeddings_equals_token_prefill(tiny):
    engine = create_engine(tiny, "fast")
    ids = prompt_ids(tiny)
    _, by_ids = engine.prefill(ids)
    _, by_embeds = engine.prefill(ids, tiny.model.get_input_embeddings()(torch.tensor(ids)))
    torch.testing.assert_close(by_embeds, by_ids)


@pytest.mark.parametrize("weights, tolerance", [("bf16", 0.1), ("fp16", 0.02), ("int8", 0.1)])
def test_compressed_weights_stay_close(tiny, weights, tolerance):
    ids = prompt_ids(tiny)
    reference = run_tokens(create_engine(tiny, "fast"), ids, [10, 11, 12])
    compressed = run_tokens(FastEngine(tiny.model, tiny.context_length, 4, weights), ids, [10, 11, 12])
    scale = reference.abs().max()
    assert (compressed - reference).abs().max() / scale < tolerance
    assert (compressed.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75


def test_int8_quantisation_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    torch.testing.assert_close(q.float() * scale[:, None], w, atol=float(scale.max()) / 2 + 1e-6, rtol=0)


@pytest.mark.parametrize("fmt, tolerance", [("fp32", 1e-6), ("bf16", 0.02), ("fp16", 0.002), ("int8", 0.05)])
def test_packed_linear_computes_x_times_w_transposed(fmt, tolerance):
    torch.manual_seed(0)
    w, bias, x = torch.randn(48, 32), torch.randn(48), torch.randn(3, 32)
    exact = x @ w.t() + bias
    packed = pack_linear(w, bias, fmt)
    scales = 48 * 4 if fmt == "int8" else 0
    assert packed.nbytes == w.numel() * {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}[fmt] + scales
    assert (packed(x) - exact).abs().max() <= tolerance * exact.abs().max()


def test_int8_without_fbgemm_runs_weight_only_int8():
    torch.manual_seed(0)
    w, bias, x = torch.randn(48, 32), torch.randn(48), torch.randn(3, 32)
    exact = x @ w.t() + bias
    packed = _int8_packed_mm(w, bias)
    assert packed.nbytes == w.numel() + 48 * 4
    assert (packed(x) - exact).abs().max() <= 0.05 * exact.abs().max()


def test_fp32_engine_shares_the_models_weights(tiny):
    conv = tiny.model.transformer.h[0].mlp.c_fc
    before = conv(torch.ones(1, tiny.model.config.n_embd))
    engine = create_engine(tiny, "fast")
    weight = engine.layers[0].fc
    assert conv.weight.t().is_contiguous()  # re-laid out in place as [out, in]: the engine reads the same memory
    torch.testing.assert_close(conv(torch.ones(1, tiny.model.config.n_embd)), before)
    assert weight.nbytes == conv.weight.numel() * 4


def test_engine_limits_are_errors(tiny):
    engine = create_engine(tiny, "fast", max_rows=1)
    row, _ = engine.prefill([1, 2])
    with pytest.raises(UsageError, match="max_rows=1"):
        engine.prefill([1, 2])
    with pytest.raises(UsageError, match="not active"):
        engine.step([row + 5], [1])
    with pytest.raises(UsageError, match="does not fit"):
        create_engine(tiny, "fast").prefill(list(range(tiny.context_length)))
    engine.release(row)
    engine.release(row)  # releasing twice is harmless


def test_fast_engine_refuses_other_architectures(tiny):
    tiny.model.config.scale_attn_by_inverse_layer_idx = True
    try:
        with pytest.raises(UsageError, match="non-default attention scaling"):
            create_engine(tiny, "fast")
        assert create_engine(tiny, "auto").name == "transformers"
    finally:
        tiny.model.config.scale_attn_by_inverse_layer_idx = False


ROW_API_ENGINES = ["transformers", "fast", "fast-bf16", "fast-fp16", "fast-int8", "fast-q4"]
# A step of 16-bit or int8 weights may run on the compiled kernel, a prefill or extend on torch's, and int8
# quantizes a batch's activations together: results then depend on how tokens were grouped, by about as much
# as the formats differ from fp32 (test_compressed_weights_stay_close).
GROUPING_TOLERANCE = {"transformers": 1e-5, "fast": 1e-5, "fast-bf16": 0.1, "fast-fp16": 0.1, "fast-int8": 0.1,
                      "fast-q4": 0.1}


def assert_near(got: torch.Tensor, expected: torch.Tensor, choice: str) -> None:
    assert (got - expected).abs().max() / expected.abs().max() < GROUPING_TOLERANCE[choice]


@pytest.mark.parametrize("choice", ROW_API_ENGINES)
def test_extend_in_chunks_equals_one_prefill_and_single_steps(tiny, choice):
    engine = create_engine(tiny, choice)
    ids = prompt_ids(tiny, "Я помню чудное мгновенье: передо мной явилась ты, как мимолётное виденье")
    _, whole = engine.prefill(ids)
    row, _ = engine.prefill(ids[:3])
    for start in range(3, len(ids), 5):
        chunked = engine.extend(row, ids[start : start + 5])
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    # every position's logits at once equal the logits of stepping the same tokens one at a time
    continuation = [5, 17, 99, 4]
    stepped = run_tokens(engine, ids, continuation)[1:]
    all_at_once = engine.extend(row, continuation, all_logits=True)
    assert all_at_once.shape == (len(continuation), engine.vocab_size)
    assert_near(all_at_once, stepped, choice)


@pytest.mark.parametrize("choice", ROW_API_ENGINES)
def test_truncate_then_step_equals_never_having_appended(tiny, choice):
    engine = create_engine(tiny, choice)
    ids = prompt_ids(tiny)
    plain, _ = engine.prefill(ids)
    engine.extend(plain, [7])
    expected = engine.step([plain], [8])[0]
    row, _ = engine.prefill(ids)
    engine.extend(row, [7, 30, 31, 32])  # a draft whose last three tokens are rejected
    engine.truncate(row, len(ids) + 1)
    assert engine.lengths[row] == len(ids) + 1
    assert_near(engine.step([row], [8])[0], expected, choice)


@pytest.mark.parametrize("choice", ["transformers", "fast"])
def test_a_row_opened_from_exported_kv_continues_like_the_original(tiny, choice):
    engine = create_engine(tiny, choice)
    ids = prompt_ids(tiny, "Буря мглою небо кроет, вихри снежные крутя")
    source, expected = engine.prefill(ids)
    kv = engine.export_kv(source, 0, len(ids) - 2)
    assert kv.shape[:2] == (tiny.model.config.n_layer, 2) and kv.shape[3] == len(ids) - 2
    engine.release(source)
    row = engine.open_row(kv)
    torch.testing.assert_close(engine.extend(row, ids[-2:]), expected, atol=1e-4, rtol=1e-4)


def test_row_api_limits_are_errors(tiny):
    engine = create_engine(tiny, "fast")
    row, _ = engine.prefill([1, 2, 3])
    with pytest.raises(UsageError, match="no tokens"):
        engine.extend(row, [])
    with pytest.raises(UsageError, match="do not fit the context"):
        engine.extend(row, [1] * tiny.context_length)
    with pytest.raises(UsageError, match="from 0 to 3"):
        engine.truncate(row, 4)
    with pytest.raises(UsageError, match="not active"):
        engine.extend(row + 1, [1])
    with pytest.raises(UsageError, match="cannot export positions"):
        engine.export_kv(row, 2, 5)


def test_an_engine_without_the_row_api_names_itself(tiny):
    from rugpt.engines.base import DecodeEngine

    class Minimal(DecodeEngine):
        name = "minimal"

        def _prefill(self, row, token_ids, embeds):
            return torch.zeros(4)

        def _step(self, rows, token_ids):
            return torch.zeros(len(rows), 4)

        def _release(self, row):
            pass

    engine = Minimal(16, 4, 2)
    row, _ = engine.prefill([1])
    for call in (lambda: engine.extend(row, [2]), lambda: engine.truncate(row, 0),
                 lambda: engine.export_kv(row, 0, 1), lambda: engine.open_row(torch.zeros(1, 2, 1, 1, 1))):
        with pytest.raises(UsageError, match="'minimal' cannot"):
            call()
