"""Fine-tuning across processes and interruptions: SIGKILL then --resume, Ctrl-C then --resume, and 2 CPU
processes (torchrun, gloo) all end where one uninterrupted process does."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _finetune_helpers import (
    metrics,
    poems_txt,
    tiny_gpt2,
)

from rugpt.training.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

# Dropout is on (0.1): matching losses show that dropout, like data order, follows seed and step alone.
SETTINGS = {"block_size": 32, "batch_size": 4, "micro_batch_size": 2, "max_steps": 30, "eval_every": 10,
            "save_every": 5, "lr": 1e-3}
ARGS = [arg for key, value in SETTINGS.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Model, data, a launcher script and the uninterrupted single-process run everything is compared with."""
    root = tmp_path_factory.mktemp("finetune-processes")
    model_dir, poems = tiny_gpt2(root / "tiny", dropout=0.1), poems_txt(root / "poems.txt")
    launcher = root / "rugpt_cli.py"
    launcher.write_text("from rugpt.cli import main\nmain()\n")
    whole = finetune(poems, root / "whole", str(model_dir), **SETTINGS)
    assert whole.stopped == "finished"
    return {"model": model_dir, "poems": poems, "launcher": launcher, "whole": root / "whole"}


def command(base, out, *launch):
    return [*launch, str(base["launcher"]), "finetune", str(base["poems"]), "--model", str(base["model"]),
            "--out", str(out), *ARGS]


def assert_same_result(out, reference, tolerance=1e-4):
    got, want = metrics(out), metrics(reference)
    assert got["steps"] == want["steps"] == SETTINGS["max_steps"]
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=tolerance)
    assert got["eval_loss_after"] == pytest.approx(want["eval_loss_after"], abs=tolerance)
    losses = [[h["loss"] for h in m["history"]] for m in (got, want)]
    assert losses[0] == pytest.approx(losses[1], abs=tolerance)


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(base, tmp_path):
    out = tmp_path / "killed"
    first_checkpoint = out / "checkpoints" / "step-000005"
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(command(base, out, sys.executable), stdout=log, stderr=subprocess.STDOUT,
                                   env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300  # seconds on an idle machine; generous for a busy one
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()
    assert first_checkpoint.exists(), "no checkpoint within the deadline: the machine is too busy for this test"
    assert not (out / "metrics.json").exists()  # killed mid-run
    resumed = finetune(base["poems"], out, str(base["model"]), resume=True, **SETTINGS)
    assert resumed.stopped == "finished"
    assert_same_result(out, base["whole"])


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_like_an_uninterrupted_run(base, tmp_path):
    def press_ctrl_c(event):
        if event.kind == "step" and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "interrupted"
    first = finetune(base["poems"], out, str(base["model"]), on_event=press_ctrl_c, **SETTINGS)
    assert first.stopped == "interrupted" and first.steps < SETTINGS["max_steps"]
    assert (out / "checkpoints" / f"step-{first.steps:06d}").is_dir() and not (out / "metrics.json").exists()
    finetune(base["poems"], out, str(base["model"]), resume=True, **SETTINGS)
    assert_same_result(out, base["whole"])


def test_two_cpu_processes_train_like_one(base, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(command(base, out, *launch), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 processes" in (out / "README.md").read_text()
    assert_same_result(out, base["whole"])
    got, want = load_file(out / "model.safetensors"), load_file(base["whole"] / "model.safetensors")
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-4, rtol=1e-3)
