"""One weight-decay rule and one optimizer factory for every trainer; the lighter optimizers."""

import pytest
import torch

from rugpt.errors import UsageError
from rugpt.training.optimizers import decays, make_optimizer, parameter_groups, unavailable
from rugpt.training.settings import Optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_decay_falls_on_matrices_but_not_biases_norms_or_position_tables(tiny):
    named = dict(tiny.model.named_parameters())
    assert decays("transformer.h.0.attn.c_attn.weight", named["transformer.h.0.attn.c_attn.weight"])
    assert decays("transformer.wte.weight", named["transformer.wte.weight"])
    assert not decays("transformer.wpe.weight", named["transformer.wpe.weight"])
    assert not decays("transformer.h.0.ln_1.weight", named["transformer.h.0.ln_1.weight"])
    assert not decays("transformer.h.0.attn.c_attn.bias", named["transformer.h.0.attn.c_attn.bias"])
    groups = parameter_groups(tiny.model.named_parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(tiny.model.parameters()))


def test_frozen_parameters_are_left_out():
    layer = torch.nn.Linear(4, 4)
    layer.bias.requires_grad_(False)
    groups = parameter_groups(layer.named_parameters(), 0.0)
    assert len(groups) == 1 and groups[0]["params"] == [layer.weight]


@pytest.mark.parametrize("kind", [Optimizer.adamw, Optimizer.adafactor])
def test_each_optimizer_lowers_a_loss(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    optimizer = make_optimizer(model, kind, lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_adafactor_keeps_factored_state_only():
    model = torch.nn.Linear(64, 32, bias=False)
    optimizer = make_optimizer(model, Optimizer.adafactor, lr=1e-3, weight_decay=0.0)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    state = optimizer.state[model.weight]
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert sum(t.numel() for t in tensors) == 64 + 32  # a row and a column, not 64 × 32 moments


def test_eight_bit_adamw_says_why_it_cannot_run_here():
    assert "CUDA" in unavailable(Optimizer.adamw8bit, "cpu")
    with pytest.raises(UsageError, match="needs a CUDA GPU; use --optimizer adafactor"):
        make_optimizer(torch.nn.Linear(2, 2), Optimizer.adamw8bit, lr=1e-3, weight_decay=0.0)
