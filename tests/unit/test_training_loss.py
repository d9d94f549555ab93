"""The chunked next-token loss: the plain computation's loss and gradients (1e-5), without the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from rugpt.training.loss import (
    IGNORE_INDEX,
    NextTokenLoss,
    count_targets,
    linear_cross_entropy,
    loss_on_targets,
    next_token_loss,
    shift_labels,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def plain(hidden, weight, labels, reduction):
    return F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("needs", ["both", "hidden", "weight"])
def test_fused_loss_and_gradients_equal_the_plain_computation(reduction, chunk, needs):
    torch.manual_seed(0)
    hidden = torch.randn(61, 24, requires_grad=needs != "weight")
    weight = (torch.randn(301, 24) * 0.3).requires_grad_(needs != "hidden")
    labels = torch.randint(0, 301, (61,))
    labels[::4] = IGNORE_INDEX
    wrt = [t for t in (hidden, weight) if t.requires_grad]
    want = plain(hidden, weight, labels, reduction)
    incoming = torch.randn_like(want)  # per-token weights, as a classification loss over label words gives
    want_grads = torch.autograd.grad(want, wrt, incoming)
    got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, reduction=reduction)
    got_grads = torch.autograd.grad(got, wrt, incoming)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert bool((got[::4] == 0).all())  # ignored rows count nothing


def test_model_loss_matches_transformers_and_its_gradients_without_the_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 8000, (3, 17))
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.3, IGNORE_INDEX)
    reference, fused = (AutoModelForCausalLM.from_pretrained(tiny_model_dir) for _ in range(2))
    out = reference(input_ids=ids, labels=labels)
    (out.loss * count_targets(labels)).backward()

    def no_logits(*args, **kwargs):
        raise AssertionError("the head's forward ran: the whole logits were made")

    fused.lm_head.forward = no_logits
    loss = next_token_loss(fused, ids, labels, chunk_tokens=5)
    loss.backward()
    torch.testing.assert_close(loss, out.loss * count_targets(labels), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_aligned_targets_and_per_position_losses(tiny):
    torch.manual_seed(1)
    window = torch.randint(0, 8000, (2, 11))
    with torch.no_grad():
        logits = tiny.model(window[:, :-1]).logits
        want = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="none").view(2, 10)
        got = loss_on_targets(tiny.model, window[:, :-1], window[:, 1:], reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, IGNORE_INDEX]]


def test_lora_models_take_the_fused_path_and_train_only_adapters(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
    ids = torch.randint(0, 8000, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss * count_targets(ids)
    loss = NextTokenLoss(model)(input_ids=ids, labels=ids)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)


def test_bf16_autocast_stays_close_to_fp32(tiny):
    torch.manual_seed(2)
    ids = torch.randint(0, 8000, (2, 16))
    with torch.no_grad():
        fp32 = next_token_loss(tiny.model, ids, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = next_token_loss(tiny.model, ids, ids)
    assert float(bf16) == pytest.approx(float(fp32), rel=2e-2)
