"""ruGPT-3 XL (community conversion layout) on rugpt's own architecture: parity with a hand-written reference
that applies DeepSpeed's "fixed" sparse layout token by token, the cache, generate, padding, loss, and loading
without ever running the checkpoint's own code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from layouts.xl import PADDED_ROWS, REMOTE_CODE_SENTINEL, build_xl
from rugpt.architectures import register
from rugpt.architectures.rugpt3xl import RuGPT3XLConfig, RuGPT3XLForCausalLM, fixed_sparsity_layout
from rugpt.errors import UsageError

register()


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build_xl(tmp_path_factory.mktemp("xl"))


def _load(folder, dtype=torch.float32, trust_remote_code=False) -> RuGPT3XLForCausalLM:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


@pytest.fixture(scope="module")
def xl(xl_dir) -> RuGPT3XLForCausalLM:
    return _load(xl_dir)


def _ids(length: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (1, length), generator=generator)


# --- an independent reference: the pattern as Child et al. / DeepSpeed describe it, one token pair at a time ---

def reads(config, layer: int, head: int, query: int, key: int) -> bool:
    """May token `query` read token `key` in this layer and head? Written from the description of the
    "fixed" pattern (full local windows only), not from rugpt's layout code."""
    if key > query:
        return False
    if config.sparse_mode == "none" or (config.sparse_mode == "alternating" and layer % 2 == 1):
        return True
    size, local, global_ = config.sparse_block_size, config.sparse_num_local_blocks, config.sparse_num_global_blocks
    query_block, key_block = query // size, key // size
    if query_block // local == key_block // local:
        return True  # the same local window
    # an earlier window: only its global blocks, which for head h sit (1 + h % patterns) groups from its end
    first = local - (1 + head % config.sparse_num_different_global_patterns) * global_
    return first <= key_block % local < first + global_


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(model, ids: torch.Tensor, rule=reads) -> torch.Tensor:
    """The forward pass in float64 from the state dict with plain tensor algebra: [T, vocab] for one row."""
    config = model.config
    weights = {name: tensor.double() for name, tensor in model.state_dict().items()}
    (length,) = ids[0].shape
    heads, width = config.num_attention_heads, config.hidden_size
    head_dim = width // heads

    def norm(x, name):
        return F.layer_norm(x, (width,), weights[f"{name}.weight"], weights[f"{name}.bias"], config.layer_norm_eps)

    def linear(x, name):
        return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    x = weights["model.embed_tokens.weight"][ids[0]] + weights["model.embed_positions.weight"][:length]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        h = norm(x, f"{prefix}.input_layernorm")
        q, k, v = (linear(h, f"{prefix}.self_attn.{p}_proj").view(length, heads, head_dim) for p in "qkv")
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        allowed = torch.tensor([[[rule(config, layer, head, i, j) for j in range(length)] for i in range(length)]
                                for head in range(heads)])
        weights_ = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attended = torch.einsum("hqk,khd->qhd", weights_, v).reshape(length, width)
        x = x + linear(attended, f"{prefix}.self_attn.o_proj")
        h = norm(x, f"{prefix}.post_attention_layernorm")
        x = x + linear(gelu_tanh(linear(h, f"{prefix}.mlp.up_proj")), f"{prefix}.mlp.down_proj")
    return norm(x, "model.norm") @ weights["lm_head.weight"].T


# --- the layout ---

def test_layout_by_hand_with_a_short_last_window():
    # 5 blocks, windows of 2 (the last one short), 1 global block, 2 patterns; worked out from DeepSpeed's
    # set_local_layout / set_global_layout by hand.
    head0 = [[1, 0, 0, 0, 0],
             [1, 1, 0, 0, 0],
             [0, 1, 1, 0, 0],
             [0, 1, 1, 1, 0],
             [0, 1, 0, 1, 1]]
    head1 = [[1, 0, 0, 0, 0],
             [1, 1, 0, 0, 0],
             [1, 0, 1, 0, 0],
             [1, 0, 1, 1, 0],
             [1, 0, 1, 0, 1]]
    layout = fixed_sparsity_layout(num_heads=2, num_blocks=5, num_local_blocks=2, num_global_blocks=1, num_patterns=2)
    assert layout.int().tolist() == [head0, head1]


@pytest.mark.parametrize("shape", [(4, 32, 2, 2), (16, 40, 8, 8)], ids=["fixture", "xl-1.3b"])
def test_layout_agrees_with_the_token_rule(shape):
    heads, blocks, local, patterns = shape
    config = RuGPT3XLConfig(num_attention_heads=heads, hidden_size=heads * 4, sparse_mode="all", sparse_block_size=1,
                            sparse_num_local_blocks=local, sparse_num_different_global_patterns=patterns)
    layout = fixed_sparsity_layout(heads, blocks, local, 1, patterns)
    expected = torch.tensor([[[reads(config, 0, h, q, k) for k in range(blocks)] for q in range(blocks)]
                             for h in range(heads)])
    assert torch.equal(layout, expected)


# --- the forward pass ---

@pytest.mark.parametrize("mode", ["alternating", "all", "none"])
def test_logits_match_the_reference(tmp_path, mode):
    model = _load(build_xl(tmp_path / mode, sparse_mode=mode), dtype=torch.float64)
    ids = _ids(40)
    with torch.no_grad():
        logits = model(ids).logits[0]
    torch.testing.assert_close(logits, reference_logits(model, ids))


def test_the_sparse_mask_changes_the_logits(xl):
    ids = _ids(40)
    with torch.no_grad():
        logits = xl(ids).logits[0].double()
    dense = reference_logits(xl, ids, rule=lambda config, layer, head, q, k: k <= q)
    window = xl.config.sparse_block_size * xl.config.sparse_num_local_blocks
    # inside the first local window everything is visible, so sparse and dense agree there ...
    torch.testing.assert_close(logits[:window], dense[:window], rtol=1e-4, atol=1e-4)
    # ... and beyond it the mask hides keys and the logits move
    assert (logits[window:] - dense[window:]).abs().amax(-1).min() > 1e-2


def test_cached_steps_equal_the_full_forward(xl):
    from transformers import DynamicCache

    ids = _ids(30, seed=1)
    with torch.no_grad():
        full = xl(ids).logits
        cache = DynamicCache(config=xl.config)
        out = xl(ids[:, :13], past_key_values=cache, use_cache=True)  # a prefill, then one token at a time
        steps = [out.logits]
        for t in range(13, 30):
            out = xl(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert cache.get_seq_length() == 30
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_padding_left_or_right_does_not_change_a_row(xl):
    long, short = _ids(24, seed=2), _ids(15, seed=3)
    pad = torch.zeros(1, 9, dtype=torch.long)
    with torch.no_grad():
        alone = xl(short).logits
        left = xl(torch.cat([torch.cat([pad, short], 1), long]),
                  attention_mask=torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long)]))
        right = xl(torch.cat([short, pad], 1), attention_mask=torch.cat([torch.ones_like(short), pad], 1))
    torch.testing.assert_close(left.logits[0, 9:], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(left.logits[1], xl(long).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(right.logits[0, :15], alone[0], rtol=1e-4, atol=1e-4)


def test_generate_greedy_follows_the_argmax(xl):
    ids = _ids(12, seed=4)
    out = xl.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      repetition_penalty=1.0, eos_token_id=None, pad_token_id=0)
    expected = ids
    with torch.no_grad():
        for _ in range(8):
            expected = torch.cat([expected, xl(expected).logits[:, -1:].argmax(-1)], 1)
    assert out.tolist() == expected.tolist()


def test_batched_generate_with_left_padding_matches_each_row_alone(xl):
    rows = [_ids(10, seed=5), _ids(17, seed=6)]
    width = max(r.shape[1] for r in rows)
    ids = torch.cat([F.pad(r, (width - r.shape[1], 0)) for r in rows])
    mask = torch.cat([F.pad(torch.ones_like(r), (width - r.shape[1], 0)) for r in rows])
    settings = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0, "eos_token_id": None,
                "pad_token_id": 0}
    batched = xl.generate(ids, attention_mask=mask, **settings)[:, width:]
    for row, alone in zip(batched, rows, strict=True):
        assert row.tolist() == xl.generate(alone, **settings)[0, alone.shape[1]:].tolist()


def test_inputs_embeds_and_a_replaced_embedding_module(xl_dir):
    model = _load(xl_dir)
    ids = _ids(20, seed=7)
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        by_ids = model(ids).logits
        torch.testing.assert_close(model(inputs_embeds=embedding(ids)).logits, by_ids)

        class Doubled(torch.nn.Module):  # what a trained prompt does: a module in the embedding's place
            def __init__(self, base):
                super().__init__()
                self.base = base

            def forward(self, input_ids):
                return self.base(input_ids) * 2

        model.set_input_embeddings(Doubled(embedding))
        assert isinstance(model.get_input_embeddings(), Doubled)
        assert not torch.allclose(model(ids).logits, by_ids)
        assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 22)


def test_labels_give_the_shifted_loss_and_checkpointing_keeps_gradients(xl_dir):
    model = _load(xl_dir).train()
    for module in model.modules():  # no dropout, so the two backward passes can be compared
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    ids = _ids(33, seed=8)
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels, use_cache=False)
    expected = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(block.gradient_checkpointing for block in model.model.layers)
    model(ids, labels=labels, use_cache=False).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert plain["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


# --- loading ---

@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_loading_never_runs_the_checkpoints_own_code(tmp_path, trust_remote_code):
    from transformers import AutoConfig

    folder = build_xl(tmp_path / "xl")
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = _load(folder, trust_remote_code=trust_remote_code)
    assert type(config) is RuGPT3XLConfig and type(model) is RuGPT3XLForCausalLM
    assert not (folder / REMOTE_CODE_SENTINEL).exists()
    assert not [name for name in sys.modules if "modeling_rugpt3xl" in name or "configuration_rugpt3xl" in name]


@pytest.mark.slow
def test_the_trap_is_live_without_register(tmp_path):
    """Without rugpt's registration transformers refuses the folder, and trusting it runs the files: so the
    sentinel's absence above means the files were skipped, not that they were harmless."""
    folder = build_xl(tmp_path / "xl")
    script = (f"from transformers import AutoConfig\n"
              f"try:\n    AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=False)\n"
              f"except ValueError as exc:\n    print('refused:', 'trust_remote_code' in str(exc))\n"
              f"AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "refused: True" in result.stdout
    assert result.returncode == 1 and "remote code was imported" in result.stderr
    assert (folder / REMOTE_CODE_SENTINEL).exists()


def test_models_load_keeps_the_padded_rows(xl_dir):
    from rugpt.models import load

    loaded = load(str(xl_dir), device="cpu")
    vocab = len(loaded.tokenizer)
    assert isinstance(loaded.model, RuGPT3XLForCausalLM)
    assert loaded.model.config.vocab_size == vocab + PADDED_ROWS and loaded.context_length == 128
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id, loaded.tokenizer.bos_token_id) == (0, 1, 2)
    ids = loaded.tokenizer("Привет, как дела?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert loaded.model(ids).logits.shape[-1] == vocab + PADDED_ROWS
    assert not loaded.model.get_input_embeddings().weight[vocab:].any()


def test_cli_runs_xl_on_transformers_and_fast_refuses_in_one_line(xl_dir):
    from rugpt.cli import app

    runner = CliRunner()
    base = ["generate", "Привет", "--model", str(xl_dir), "--max-new-tokens", "5"]
    auto = runner.invoke(app, [*base, "--json"])
    assert auto.exit_code == 0, auto.output
    assert json.loads(auto.stdout)["engine"] == "transformers"
    fast = runner.invoke(app, [*base, "--engine", "fast"])
    assert fast.exit_code == 2
    assert fast.stderr.strip().count("\n") == 0 and "not GPT-2" in fast.stderr


# --- configuration errors ---

@pytest.mark.parametrize("keys, needle", [
    ({"sparse_mode": "sparse"}, "sparse_mode='sparse'"),
    ({"sparse_mode": "all", "sparse_num_local_blocks": 3, "sparse_num_global_blocks": 2}, "sparse_num_local_blocks=3"),
    ({"sparse_mode": "all", "sparse_num_different_global_patterns": 9}, "sparse_num_different_global_patterns=9"),
    ({"hidden_size": 66, "num_attention_heads": 4}, "hidden_size=66"),
])
def test_bad_config_values_are_named(keys, needle):
    with pytest.raises(UsageError, match=needle):
        RuGPT3XLConfig(**keys)


def test_attention_mask_of_the_wrong_length_is_refused(xl):
    ids = _ids(6)
    with pytest.raises(ValueError, match=r"attention_mask of shape \(1, 5\)"):
        xl(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))
