"""Checkpoints: atomic (a crash while writing keeps the previous one the latest), the last K kept, exact state."""

import json

import pytest
import torch
from _finetune_helpers import (
    tiny_gpt2,
)

from rugpt.training import checkpoints
from rugpt.training.checkpoints import (
    TrainerState,
    checkpoint_dirs,
    latest_checkpoint,
    load_training_state,
    load_weights,
    remove_partial,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2(tmp_path_factory.mktemp("tiny")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    return Accelerator(cpu=True), model, optimizer


def save(setup, out, step, keep=3):
    accelerator, model, optimizer = setup
    return save_checkpoint(accelerator, out, model, optimizer, TrainerState(step=step), keep, sharded_optimizer=False)


def test_crash_while_writing_keeps_the_previous_checkpoint_latest(setup, tmp_path, monkeypatch):
    good = save(setup, tmp_path, 10)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", crash)  # the model is written, then the optimizer fails
    with pytest.raises(OSError, match="disk full"):
        save(setup, tmp_path, 20)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000010"]


def test_leftovers_of_a_killed_writer_are_ignored_then_removed(setup, tmp_path):
    good = save(setup, tmp_path, 10)
    half = tmp_path / "checkpoints" / ".step-000020.abc123.tmp"  # what SIGKILL during atomic_write_dir leaves
    (half / "model").mkdir(parents=True)
    (half / "state.json").write_text("{")
    deleting = tmp_path / "checkpoints" / ".deleting-step-000005"  # and during pruning
    deleting.mkdir()
    assert latest_checkpoint(tmp_path) == good
    remove_partial(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000010"]


def test_keeps_the_last_k(setup, tmp_path):
    for step in (5, 10, 15, 20):
        save(setup, tmp_path, step, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000015", "step-000020"]
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["step"] == 20


def test_restores_weights_and_optimizer(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    accelerator, model, optimizer = setup
    folder = save(setup, tmp_path, 3)
    fresh = AutoModelForCausalLM.from_pretrained(folder / "model")
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    load_weights(folder, fresh, lora=False)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_training_state(folder, accelerator, fresh_optimizer)
    assert state.step == 3
    exp_avg = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    assert len(exp_avg) == len(list(model.parameters())) and any(t.abs().sum() > 0 for t in exp_avg)
