"""`rugpt download`: the file filter, the disk check, the cached copy offline and each hub failure as one line.

No network at all: huggingface_hub's model_info and snapshot_download are replaced by a fake hub.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from typer.testing import CliRunner

from rugpt.cli import app
from rugpt.download import download, format_size, select_files
from rugpt.errors import DiskFull, ModelNotFound
from rugpt.models import BUNDLED_DIR

# ai-forever/rugpt3small_based_on_gpt2 as the hub lists it (sizes in bytes, close to the real ones).
SMALL_REPO = {
    "config.json": 720, "flax_model.msgpack": 551_000_000, "merges.txt": 456_000, "pytorch_model.bin": 551_300_000,
    "special_tokens_map.json": 150, "vocab.json": 1_040_000, "tokenizer_config.json": 300,
}
SMALL_NEEDED = ["config.json", "merges.txt", "pytorch_model.bin", "special_tokens_map.json", "tokenizer_config.json",
                "vocab.json"]
LARGE_FILE_SUFFIXES = (".bin", ".msgpack", ".safetensors", ".h5", ".ot", ".onnx", ".pt")


def _sibling(name: str, size: int) -> RepoSibling:
    blob_id = hashlib.sha1(name.encode()).hexdigest()
    if name.endswith(LARGE_FILE_SUFFIXES):  # LFS: the sibling's own size is the pointer's
        lfs = BlobLfsInfo(size=size, sha256=hashlib.sha256(name.encode()).hexdigest(), pointer_size=134)
        return RepoSibling(rfilename=name, size=134, blob_id=blob_id, lfs=lfs)
    return RepoSibling(rfilename=name, size=size, blob_id=blob_id)


def _response(status: int) -> SimpleNamespace:
    # What HfHubHTTPError reads from an HTTP response.
    return SimpleNamespace(status_code=status, headers={}, request=None)


class FakeHub:
    """model_info and snapshot_download over a fixed file listing; records what was asked for."""

    def __init__(self, cache: Path):
        self.files = dict(SMALL_REPO)
        self.cache = cache
        self.free = 10**12
        self.info_error: Exception | None = None
        self.download_error: Exception | None = None
        self.info_calls: list[dict] = []
        self.download_calls: list[dict] = []

    def model_info(self, repo_id, **kwargs):
        self.info_calls.append({"repo_id": repo_id, **kwargs})
        if self.info_error is not None:
            raise self.info_error
        return SimpleNamespace(sha="0" * 40, siblings=[_sibling(n, s) for n, s in self.files.items()])

    def snapshot_download(self, repo_id, **kwargs):
        self.download_calls.append({"repo_id": repo_id, **kwargs})
        if self.download_error is not None:
            raise self.download_error
        return str(self.cache / "snapshot")

    def disk_usage(self, path):
        return SimpleNamespace(total=2 * self.free, used=self.free, free=self.free)

    @property
    def requested(self) -> list[str]:
        return self.download_calls[-1]["allow_patterns"]


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    """An online machine (conftest makes the test process offline) whose hub is a FakeHub."""
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake.cache))
    monkeypatch.setattr(huggingface_hub, "model_info", fake.model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(shutil, "disk_usage", fake.disk_usage)
    return fake


def test_small_fetches_exactly_what_rugpt_reads(hub):
    folder = download("small")
    assert folder == hub.cache / "snapshot"
    assert hub.info_calls[0]["repo_id"] == "ai-forever/rugpt3small_based_on_gpt2"
    assert hub.info_calls[0]["files_metadata"] is True
    assert sorted(hub.requested) == SMALL_NEEDED  # no flax_model.msgpack
    call = hub.download_calls[0]
    assert call["repo_id"] == "ai-forever/rugpt3small_based_on_gpt2" and call["revision"] is None
    assert call["cache_dir"] == hub.cache and call["tqdm_class"] is None  # huggingface_hub's own progress bars


def test_revision_and_token_reach_the_hub(hub):
    download("ai-forever/rugpt3small_based_on_gpt2", revision="refs/pr/3", token="hf_x", progress=False)
    assert hub.info_calls[0]["revision"] == "refs/pr/3" and hub.info_calls[0]["token"] == "hf_x"
    call = hub.download_calls[0]
    assert call["revision"] == "refs/pr/3" and call["token"] == "hf_x"
    assert call["tqdm_class"] is not None and call["tqdm_class"](total=1).disable


def test_safetensors_weights_leave_the_bin_copies_and_other_formats(hub):
    hub.files = {
        "config.json": 900, "model.safetensors": 2_600_000_000, "pytorch_model.bin": 2_600_000_000,
        "pytorch_model.bin.index.json": 20_000, "tokenizer.json": 2_000_000, "tokenizer_config.json": 300,
        "modeling_rugpt3xl.py": 30_000, "tf_model.h5": 2_600_000_000, "rust_model.ot": 2_600_000_000,
        "model.onnx": 2_600_000_000, "model.ckpt": 2_600_000_000, "mp_rank_00_model_states.json": 100,
        "onnx/config.json": 900, "README.md": 4_000,
    }
    download("xl")
    assert hub.info_calls[0]["repo_id"] == "evilfreelancer/ruGPT3XL"
    assert sorted(hub.requested) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_sharded_bin_weights_are_fetched_without_safetensors(hub):
    shards = {f"pytorch_model-0000{i}-of-00006.bin": 9_800_000_000 for i in range(1, 7)}
    hub.files = {"config.json": 900, "pytorch_model.bin.index.json": 30_000, **shards}
    download("13b")
    assert sorted(hub.requested) == sorted(["config.json", "pytorch_model.bin.index.json", *shards])


def test_file_names_are_requested_literally(hub):
    hub.files = {"config.json": 900, "model[1].safetensors": 100}
    download("someone/odd-names")
    assert sorted(hub.requested) == ["config.json", "model[[]1].safetensors"]


def test_a_full_disk_refuses_before_downloading(hub):
    hub.free = 100_000_000
    with pytest.raises(DiskFull) as info:
        download("small")
    message = str(info.value)
    assert "needs 553 MB more" in message and "100 MB is free" in message and str(hub.cache) in message
    assert "\n" not in message
    assert hub.download_calls == []


def test_what_the_cache_holds_is_not_counted_again(hub):
    weights = _sibling("pytorch_model.bin", SMALL_REPO["pytorch_model.bin"])
    blobs = hub.cache / "models--ai-forever--rugpt3small_based_on_gpt2" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / weights.lfs.sha256).write_bytes(b"cached")
    hub.free = 10_000_000  # enough for the small files, not for the weights
    download("small")
    assert "pytorch_model.bin" in hub.requested  # still listed: snapshot_download links the cached blob


def test_nothing_left_to_fetch_shows_no_progress_bars(hub):
    blobs = hub.cache / "models--ai-forever--rugpt3small_based_on_gpt2" / "blobs"
    blobs.mkdir(parents=True)
    for name, size in SMALL_REPO.items():
        sibling = _sibling(name, size)
        (blobs / (sibling.lfs.sha256 if sibling.lfs else sibling.blob_id)).write_bytes(b"cached")
    download("small")
    assert hub.download_calls[0]["tqdm_class"] is not None  # the silent bar: rugpt.load calls this every time


def _cache_snapshot(cache: Path, hub_id: str, files: dict[str, str]) -> Path:
    """A snapshot laid out as huggingface_hub leaves it: refs/main naming a commit folder under snapshots/."""
    storage = cache / f"models--{hub_id.replace('/', '--')}"
    commit = "a" * 40
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    folder = storage / "snapshots" / commit
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_offline_with_a_complete_cached_copy_returns_it(hub, monkeypatch):
    folder = _cache_snapshot(hub.cache, "ai-forever/rugpt3small_based_on_gpt2",
                             {"config.json": "{}", "pytorch_model.bin": "w", "vocab.json": "{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download("small") == folder
    assert hub.info_calls == [] and hub.download_calls == []


def test_unreachable_hub_falls_back_to_the_cache(hub):
    folder = _cache_snapshot(hub.cache, "evilfreelancer/ruGPT3XL", {"config.json": "{}", "model.safetensors": "w"})
    hub.info_error = ConnectionError("Network is unreachable")
    assert download("xl") == folder


def test_a_cached_copy_missing_a_shard_is_not_used(hub):
    shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    index = json.dumps({"weight_map": {"h.0.w": shards[0], "h.1.w": shards[1]}})
    _cache_snapshot(hub.cache, "ai-forever/ruGPT-3.5-13B",
                    {"config.json": "{}", "pytorch_model.bin.index.json": index, shards[0]: "w"})
    hub.info_error = ConnectionError("Network is unreachable")
    with pytest.raises(ModelNotFound, match="no complete copy"):
        download("13b")


def test_the_bundled_model_is_already_here(hub):
    assert download("tiny") == BUNDLED_DIR
    assert hub.info_calls == [] and hub.download_calls == []


def test_offline_machine_refuses_without_calling_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_calls(*args, **kwargs):
        raise AssertionError("the hub was called while offline")

    monkeypatch.setattr(huggingface_hub, "model_info", no_calls)
    with pytest.raises(ModelNotFound, match=r"cannot download small \(ai-forever/.*\): this machine is offline"):
        download("small")


def _connect_error() -> Exception:
    httpx2 = pytest.importorskip("httpx2")
    return httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize(
    "make_error, kind, needles",
    [
        (lambda: GatedRepoError("403 Client Error", response=_response(403)), ModelNotFound,
         ("gated", "--token", "hf auth login")),
        (lambda: RepositoryNotFoundError("404 Client Error", response=_response(404)), ModelNotFound,
         ("no such model",)),
        (lambda: RevisionNotFoundError("404 Client Error", response=_response(404)), ModelNotFound,
         ("revision 'v9' does not exist",)),
        (_connect_error, ModelNotFound, ("offline or huggingface.co is unreachable", "ConnectError")),
        (lambda: ConnectionError("Network is unreachable"), ModelNotFound, ("offline",)),
        (lambda: HfHubHTTPError("500 Server Error", response=_response(500)), ModelNotFound, ("HTTP 500",)),
    ],
)
def test_hub_failures_are_one_line_each(hub, make_error, kind, needles):
    hub.info_error = make_error()
    with pytest.raises(kind) as info:
        download("small", revision="v9")
    message = str(info.value)
    assert message.startswith("cannot download small (ai-forever/rugpt3small_based_on_gpt2)")
    assert all(needle in message for needle in needles), message
    assert "\n" not in message


def test_disk_filling_up_during_the_download(hub):
    hub.download_error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFull, match="filled up.*rerun"):
        download("small")


def test_unforeseen_errors_are_not_hidden(hub):
    hub.download_error = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        download("small")


def test_sizes_read_like_the_hub_shows_them():
    assert format_size(551_300_000) == "551 MB"
    assert format_size(3_390_000_000) == "3.39 GB"
    assert format_size(58_800_000_000) == "58.8 GB"
    assert format_size(1_234_000_000_000) == "1234 GB"
    assert format_size(300) == "300 B"


runner = CliRunner()


def test_cli_download_prints_the_folder(hub):
    result = runner.invoke(app, ["download", "small", "--revision", "main"])
    assert result.exit_code == 0, result.output
    assert str(hub.cache / "snapshot") in result.stdout
    assert hub.download_calls[0]["revision"] == "main"


def test_cli_download_failure_is_one_line_exit_2(hub):
    hub.info_error = GatedRepoError("403 Client Error", response=_response(403))
    result = runner.invoke(app, ["download", "small"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "hf auth login" in result.stderr
    assert "Traceback" not in result.output


def test_models_json_has_sizes_ids_and_cache():
    from transformers import AutoTokenizer

    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["alias"]: row for row in json.loads(result.stdout)}
    assert rows["small"]["download_gb"] == 0.55 and rows["13b"]["download_gb"] == 59.0
    assert rows["small"]["special_ids"] == {"pad": 0, "bos": 1, "eos": 2}
    assert rows["13b"]["special_ids"] == {"pad": 0, "bos": 2, "eos": 3}
    assert rows["xl"]["special_ids"] == {"pad": 0, "bos": 2, "eos": 1}
    assert rows["xl"]["hub_id"] == "evilfreelancer/ruGPT3XL" and rows["xl"]["download_gb"] == 2.6
    bundled = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    assert rows["tiny"]["special_ids"] == {"pad": bundled.pad_token_id, "bos": bundled.bos_token_id,
                                           "eos": bundled.eos_token_id}
    assert rows["tiny"]["download_gb"] is None and rows["tiny"]["path"] == str(BUNDLED_DIR)
    assert rows["small"]["path"] is None and rows["small"]["available"] == "no"
    table = runner.invoke(app, ["models"])
    assert "≈0.55 GB download (published size)" in table.stdout and "pad/bos/eos 0/2/3" in table.stdout


def test_a_marian_translator_gets_its_sentencepiece_models():
    listing = ["config.json", "generation_config.json", "pytorch_model.bin", "source.spm", "target.spm",
               "tokenizer_config.json", "vocab.json", "tf_model.h5", "rust_model.ot"]
    assert select_files(listing) == ["config.json", "generation_config.json", "pytorch_model.bin", "source.spm",
                                     "target.spm", "tokenizer_config.json", "vocab.json"]
