"""LoRA over an int8 base: the int8 layer's product and gradient, PEFT wrapping it, and an adapter that loads
in plain PEFT on the float model."""

import json
from pathlib import Path

import pytest
import torch
from _finetune_helpers import poems_txt, tiny_gpt2

from rugpt.training import quantized
from rugpt.training.quantized import Int8Linear, load_int8_base, quantize_linears, quantize_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_rows_round_to_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(16, 40)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert float((q.float() * scale[:, None] - weight).abs().max()) <= float(scale.max()) / 2 + 1e-7


@pytest.mark.parametrize("conv1d_layout", [False, True])
def test_int8_layer_equals_the_dequantized_product_and_gives_the_input_its_gradient(conv1d_layout, monkeypatch):
    import rugpt.training.quantized as quantized

    monkeypatch.setattr(quantized, "_BLOCK_BYTES", 3 * 40 * 4)  # 3 rows at a time: several blocks
    torch.manual_seed(0)
    weight, bias = torch.randn(10, 40), torch.randn(10)
    layer = Int8Linear.from_float(weight.T if conv1d_layout else weight, bias, in_out_layout=conv1d_layout)
    x = torch.randn(2, 5, 40, requires_grad=True)
    y = layer(x)
    want = torch.nn.functional.linear(x, layer.dequantized(), bias)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    incoming = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, incoming)
    torch.testing.assert_close(grad, incoming @ layer.dequantized(), rtol=1e-5, atol=1e-5)
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.int8


def test_quantized_model_stays_close_and_peft_wraps_its_layers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 8000, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        assert quantize_linears(model) == 8  # c_attn, c_proj, c_fc, mlp.c_proj × 2 layers; not the head
        after = model(ids).logits
    assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
    wrapped = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(wrapped.base_layer, Int8Linear) and "default" in wrapped.lora_A


def test_streaming_loader_quantizes_while_reading(tiny_model_dir):
    loaded = load_int8_base(str(tiny_model_dir))
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 8 and all(m.weight.dtype == torch.int8 for m in layers)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight  # still tied
    assert not any(t.is_meta for t in loaded.model.parameters())


def mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_streaming_loader_keeps_no_read_tensor_of_the_file_resident(tmp_path, monkeypatch):
    folder = tiny_gpt2(tmp_path / "base", n_embd=256)  # an 8 MB embedding and two 3 MB blocks, in one file
    [file] = folder.glob("*.safetensors")
    resident = []
    place = quantized._place
    monkeypatch.setattr(quantized, "_place", lambda *args: (resident.append(mapped_kb(file)), place(*args))[1])
    load_int8_base(str(folder))
    assert len(resident) > 10 and file.stat().st_size > 10 * 2**20
    # Before each tensor is placed, what the earlier ones left: the pages the kernel maps around each read
    # (fault-around, readahead), not the tensors read so far (they would pass 6 MB here).
    assert max(resident) < 1024, resident


def test_lora_over_int8_trains_and_its_adapter_loads_in_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rugpt.training.finetune import finetune

    base = tiny_gpt2(tmp_path / "base")
    data = poems_txt(tmp_path / "poems.txt")
    result = finetune(data, tmp_path / "run", str(base), method="lora", quantize_base=True, block_size=32,
                      batch_size=4, max_steps=6, lr=3e-3, eval_every=3, save_every=3)
    assert result.eval_loss_after < result.eval_loss_before
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True  # for the float checkpoint's Conv1D layers
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "run")
    ids = torch.randint(0, 8000, (1, 10))
    with torch.no_grad():
        quantized_run = load_int8_base(str(base)).model
        quantized_peft = PeftModel.from_pretrained(quantized_run, tmp_path / "run")
        close = plain(ids).logits, quantized_peft(ids).logits
    assert float((close[0] - close[1]).abs().max()) < 0.05 * float(close[0].abs().max())

    merged = finetune(data, tmp_path / "merged", str(base), method="lora", quantize_base=True, merge=True,
                      block_size=32, batch_size=4, max_steps=6, lr=3e-3, eval_every=3, save_every=3)
    assert merged.steps == 6
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged_model(ids).logits, plain.merge_and_unload()(ids).logits, rtol=1e-4,
                                   atol=1e-4)
