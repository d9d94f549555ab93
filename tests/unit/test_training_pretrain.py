"""The bundled-model recipe on the shared training parts: a tiny corpus, tokenizer, pre-training with resume
(checkpoints, loss curve) and export; the corpus default says what to give."""

import json
import random

import pytest

from rugpt.errors import UsageError
from rugpt.training.pretrain import PretrainSettings, corpus_folder, pretrain, train_recipe_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

WORDS = "мороз солнце день чудесный еще ты дремлешь друг прелестный пора красавица проснись открой взоры".split()


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "ruslit" / "poems"
    folder.mkdir(parents=True)
    for i in range(30):
        lines = (" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(20))
        (folder / f"{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    return tmp_path / "ruslit"


def test_without_a_corpus_the_error_says_what_to_give(tmp_path):
    with pytest.raises(UsageError, match="no corpus: give --corpus FOLDER, a copy of RusLit"):
        corpus_folder(PretrainSettings(tokenizer=tmp_path / "tok"))
    with pytest.raises(UsageError, match=r"corpus='.*nope' is not a folder"):
        corpus_folder(PretrainSettings(corpus=tmp_path / "nope"))


def test_pretrain_resumes_from_its_checkpoint_and_exports(corpus, tmp_path):
    from rugpt.training.bundle import export_bundle
    from rugpt.training.checkpoints import latest_checkpoint

    common = {"tokenizer": tmp_path / "run" / "tokenizer", "out": tmp_path / "run", "vocab_size": 300,
              "fortunes": False, "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 128, "batch_size": 2,
              "minutes": 0, "eval_every": 5, "eval_blocks": 4, "warmup_steps": 2, "heldout_fraction": 0.3}
    train_recipe_tokenizer(PretrainSettings(corpus=corpus, max_steps=1, **common))
    first = pretrain(PretrainSettings(max_steps=5, **common))  # the corpus comes from the tokenizer's record
    assert first["step"] == 5 and (tmp_path / "run" / "loss_curve.png").is_file()
    second = pretrain(PretrainSettings(max_steps=10, **common))
    assert second["step"] == 10 and second["eval_loss"] < first["eval_loss"]
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert [e["step"] for e in state["evals"]] == [5, 10] and state["tokens_seen"] == 10 * 2 * 128
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000010"]
    metrics = export_bundle(tmp_path / "run", tmp_path / "bundle")
    assert metrics["steps"] == 10 and (tmp_path / "bundle" / "model.safetensors").is_file()


def test_pretraining_continues_from_init_from_weights(corpus, tmp_path):
    """Continued pre-training starts from the given model's weights, not random ones, and checks the fit."""
    import torch
    from transformers import GPT2LMHeadModel

    from rugpt.training.checkpoints import latest_checkpoint

    common = {"tokenizer": tmp_path / "tok", "vocab_size": 300, "fortunes": False, "n_layer": 1, "n_embd": 32,
              "n_head": 2, "block_size": 192, "batch_size": 2, "minutes": 0, "eval_every": 100, "eval_blocks": 4,
              "warmup_steps": 1, "heldout_fraction": 0.3}
    train_recipe_tokenizer(PretrainSettings(corpus=corpus, max_steps=1, out=tmp_path / "a", **common))
    first = pretrain(PretrainSettings(max_steps=30, out=tmp_path / "a", **common))
    base = latest_checkpoint(tmp_path / "a") / "model"
    continued = pretrain(PretrainSettings(max_steps=1, lr=1e-9, min_lr=1e-9, out=tmp_path / "b", init_from=base,
                                          **{**common, "n_layer": 3}))  # the folder's shape wins
    assert continued["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-3)
    model = GPT2LMHeadModel.from_pretrained(latest_checkpoint(tmp_path / "b") / "model")
    assert model.config.n_layer == 1 and torch.isfinite(model.transformer.wte.weight).all()
    from rugpt.training.bundle import SAMPLES_FILE, export_bundle

    export_bundle(tmp_path / "a", tmp_path / "bundle")
    metrics = export_bundle(tmp_path / "b", tmp_path / "bundle")  # replaces the edition it continued from
    assert [s["steps"] for s in metrics["stages"]] == [30, 1] and metrics["steps"] == 31
    assert metrics["stages"][1]["init_from"] == str(base)
    # a run on from a run that was never exported: both are stages of the edition it makes
    pretrain(PretrainSettings(max_steps=2, out=tmp_path / "e", init_from=latest_checkpoint(tmp_path / "b") / "model",
                              seed=7, **common))
    chained = export_bundle(tmp_path / "e", tmp_path / "bundle2")
    assert [s["steps"] for s in chained["stages"]] == [30, 1, 2] and chained["stages"][2]["seed"] == 7
    assert "--seed 7" in (tmp_path / "bundle2" / "README.md").read_text()
    page = (tmp_path / "bundle" / SAMPLES_FILE).read_text()
    assert page.count("**This edition:**") == 20 and page.count("**Previous edition:**") == 20
    assert "previous edition | perplexity" in (tmp_path / "bundle" / "README.md").read_text()
    with pytest.raises(UsageError, match=r"block_size=256 is longer than init_from's context \(192\)"):
        pretrain(PretrainSettings(max_steps=1, out=tmp_path / "c", init_from=base, **{**common, "block_size": 256}))
    with pytest.raises(UsageError, match="is not a model folder"):
        pretrain(PretrainSettings(max_steps=1, out=tmp_path / "d", init_from=tmp_path, **common))
