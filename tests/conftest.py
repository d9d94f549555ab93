"""Shared fixtures: tiny random GPT-2 models built from a config (no downloads), offline hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Converted checkpoints and compiled kernels go to a cache of the test run's own, never the user's.
os.environ.setdefault("RUGPT_CACHE", __import__("tempfile").mkdtemp(prefix="rugpt-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and several OpenMP pools on 2 cores slow each other badly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rugpt.models import BUNDLED_DIR  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_tiny_model(folder: Path, n_positions: int = 128, seed: int = 0, n_embd: int = 32) -> Path:
    """A 2-layer GPT-2 (width 32 unless told) with the bundled tokenizer, saved as safetensors in `folder`."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    # Random init at std 0.02 makes nearly flat distributions; widen it so greedy paths are well separated.
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from rugpt.models import load

    return load(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def bundled():
    from rugpt.models import load

    if not (BUNDLED_DIR / "model.safetensors").exists():
        pytest.skip("the bundled model's weights are not in the package")
    return load(None, device="cpu")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (a user's fresh clone)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and far faster when other jobs share the cores; a module opts in
    with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
