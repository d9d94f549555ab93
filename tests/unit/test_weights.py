"""Pickled `.bin` checkpoints: read only through the weights-only loader, converted once, atomically."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from layouts import build_13b_sharded, build_small_2023
from rugpt import weights
from rugpt.errors import ModelNotFound
from rugpt.models import load


class Payload:
    """What a hostile checkpoint would carry: unpickling it runs code (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return build_small_2023(tmp_path_factory.mktemp("small-2023"))


def test_bin_is_converted_once_and_gives_the_same_logits(small_dir, monkeypatch):
    from transformers import GPT2LMHeadModel

    loaded = load(str(small_dir))
    target = weights.weights_folder(small_dir)
    assert target.parent == weights.cache_dir() / "safetensors" and (target / "model.safetensors").is_file()
    state = torch.load(small_dir / "pytorch_model.bin", weights_only=True)
    reference = GPT2LMHeadModel(loaded.model.config)
    reference.load_state_dict({k: v for k, v in state.items() if not k.endswith("attn.bias")}, strict=False)
    reference.eval()
    ids = torch.tensor([[5, 60, 7, 300, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    def no_pickles(*args, **kwargs):
        raise AssertionError("the .bin was read again")

    monkeypatch.setattr(torch, "load", no_pickles)
    load(str(small_dir))  # from the cache: the pickle is never opened again


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "evil": Payload(marker)}, path)
    with pytest.raises(ModelNotFound) as info:
        weights.read_bin(path)
    assert "holds objects other than tensors" in str(info.value) and "GLOBAL posix.mkdir" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ({"transformer.wte.weight": torch.zeros(2), "step": 3}, "not a mapping of names to tensors"),
    ([torch.zeros(2)], "not a mapping of names to tensors"),
    ({}, "holds no tensors"),
])
def test_anything_but_a_mapping_of_tensors_is_refused(tmp_path, content, message):
    path = tmp_path / "pytorch_model.bin"
    torch.save(content, path)
    with pytest.raises(ModelNotFound, match=message):
        weights.read_bin(path)


def test_a_file_that_is_not_torch_weights_gets_one_sentence(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"<html>404: this is a login page, not weights</html>")
    with pytest.raises(ModelNotFound, match="cannot read .* as torch weights: it is neither"):
        weights.read_bin(path)


def test_tied_head_is_stored_once():
    wte = torch.randn(4, 3)
    kept = weights._drop_shared({"transformer.wte.weight": wte, "lm_head.weight": wte, "other": torch.randn(4, 3)})
    assert list(kept) == ["transformer.wte.weight", "other"]


def test_sharded_bin_converts_shard_by_shard_with_an_index(tmp_path, monkeypatch):
    folder = build_13b_sharded(tmp_path / "13b", shards=3, seed=5)  # weights no other test converted
    opened = []
    real_read = weights.read_bin
    monkeypatch.setattr(weights, "read_bin", lambda path: opened.append(path.name) or real_read(path))
    target = weights.weights_folder(folder)
    assert opened == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    index = json.loads((target / weights.SAFE_INDEX).read_text())
    assert set(index["weight_map"].values()) == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    assert sorted(p.name for p in target.iterdir()) == sorted({weights.SAFE_INDEX, *index["weight_map"].values()})
    loaded = load(str(folder))
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.bos_token_id, loaded.tokenizer.eos_token_id) == (0, 2, 3)


def test_a_crash_while_converting_leaves_nothing_behind(tmp_path, monkeypatch):
    folder = build_13b_sharded(tmp_path / "13b", shards=3, seed=1)
    from safetensors import torch as st

    real_save, calls = st.save_file, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(st, "save_file", crash_on_second)
    with pytest.raises(OSError, match="No space left"):
        weights.weights_folder(folder)
    cache = weights.cache_dir() / "safetensors"
    assert not [p for p in cache.iterdir() if not weights.has_safetensors(p)]  # no half-written folder
    monkeypatch.setattr(st, "save_file", real_save)
    assert weights.has_safetensors(weights.weights_folder(folder))


def test_missing_shard_is_named(tmp_path):
    folder = build_13b_sharded(tmp_path / "13b", shards=3, seed=2)
    (folder / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(ModelNotFound, match="lacks shard.*pytorch_model-00002-of-00003.bin"):
        load(str(folder))


def test_hf_cache_blob_name_is_the_hash(tmp_path):
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    link = tmp_path / "pytorch_model.bin"
    link.symlink_to(blob)
    assert weights.file_sha256(link) == "ab" * 32
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"weights")
    assert weights.file_sha256(plain) == hashlib.sha256(b"weights").hexdigest()


def test_casting_load_gives_exactly_the_cast_weights_and_misses_nothing(small_dir):
    full = load(str(small_dir), dtype="float32")
    half = load(str(small_dir), dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    reference = {k: v.to(torch.bfloat16) for k, v in full.model.state_dict().items()}
    for name, tensor in half.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert half.model.lm_head.weight.data_ptr() == half.model.transformer.wte.weight.data_ptr()  # still tied
    assert half.model.generation_config.eos_token_id == 2 and half.tokenizer.eos_token_id == 2


def test_casting_load_refuses_a_checkpoint_missing_a_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = build_small_2023(tmp_path / "partial", seed=7)
    target = weights.weights_folder(folder)
    state = load_file(target / "model.safetensors")
    del state["transformer.h.0.mlp.c_fc.bias"]
    (folder / "pytorch_model.bin").unlink()
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelNotFound, match=r"lacks weights: transformer\.h\.0\.mlp\.c_fc\.bias"):
        load(str(folder), dtype="float16")
