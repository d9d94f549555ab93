"""`rugpt download`: fetch a registry model (or any hub id) into the Hugging Face cache, only the files rugpt reads.

Before a byte moves, the repo is listed with its file sizes, what the cache already holds is subtracted and the free
space at the cache is checked, so a 59 GB download that cannot fit fails in a second instead of at 90 %.
huggingface_hub's `snapshot_download` does the fetching: files land in the shared cache, where `rugpt.load` and
transformers look, and a rerun fetches only what is still missing. When the hub cannot be asked (offline, no
network) or refuses, a complete cached copy is used, as transformers does; `rugpt.load` relies on that.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import tqdm as hf_tqdm

from rugpt.errors import DiskFull, ModelNotFound, RugptError, UsageError
from rugpt.models import resolve

log = logging.getLogger(__name__)

# What rugpt reads from a checkpoint folder: the configs, the tokenizer (vocab.json + merges.txt, tokenizer.json,
# a sentencepiece *.model, a Marian translator's source.spm / target.spm) and the weights.
WANTED = ("*.json", "*.txt", "*.model", "*.spm", "*.safetensors", "pytorch_model*.bin")
# Copies of the weights for other frameworks and the Megatron training shards: never read here, so never fetched.
UNWANTED = ("*.msgpack", "*.h5", "*.ckpt", "*.onnx", "rust_model.ot", "mp_rank_*")


@dataclass(frozen=True)
class RepoFile:
    """One file of a hub repo as the cache will store it."""

    name: str
    size: int  # bytes; 0 where the hub did not say
    blob: str | None  # the cache's name for its content: the LFS sha256, else the git blob id


@dataclass(frozen=True)
class DownloadPlan:
    """What a download of one repo fetches, and how much of it the cache does not hold yet."""

    hub_id: str
    files: tuple[RepoFile, ...]
    missing_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def select_files(names: Iterable[str]) -> list[str]:
    """The files rugpt needs out of a repo listing; when the repo has safetensors weights, its .bin copies are left."""
    # Only the top folder: rugpt loads a snapshot's root, so subfolders (onnx/, original/, ...) are never read.
    chosen = sorted(
        name for name in names
        if "/" not in name
        and any(fnmatchcase(name, pattern) for pattern in WANTED)
        and not any(fnmatchcase(name, pattern) for pattern in UNWANTED)
    )
    if any(name.endswith(".safetensors") for name in chosen):
        # The .bin files (and their index) are a pickled copy of the same weights.
        chosen = [name for name in chosen if not (name.startswith("pytorch_model") and ".bin" in name)]
    return chosen


def plan_download(hub_id: str, revision: str | None, token: str | None, cache: Path) -> DownloadPlan:
    """List the repo with file sizes (one hub call) and work out what the cache still lacks."""
    info = huggingface_hub.model_info(hub_id, revision=revision, files_metadata=True, token=token)
    listing = {sibling.rfilename: _repo_file(sibling) for sibling in info.siblings or ()}
    files = tuple(listing[name] for name in select_files(listing))
    if not files:
        shown = ", ".join(sorted(listing)[:5]) or "nothing"
        raise ModelNotFound(f"cannot download {hub_id}: it has no files rugpt reads (config, tokenizer, weights); "
                            f"it holds {shown}")
    blobs = cache / repo_folder_name(repo_id=hub_id, repo_type="model") / "blobs"
    missing = sum(f.size for f in files if not (f.blob and (blobs / f.blob).is_file()))
    return DownloadPlan(hub_id=hub_id, files=files, missing_bytes=missing)


def _repo_file(sibling) -> RepoFile:
    # For LFS files `size` may be the pointer's; the LFS entry has the real size and the blob's name in the cache.
    if sibling.lfs is not None:
        return RepoFile(sibling.rfilename, sibling.lfs.size or 0, sibling.lfs.sha256)
    return RepoFile(sibling.rfilename, sibling.size or 0, sibling.blob_id)


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder`, which need not exist yet (the cache appears on first use)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk_space(plan: DownloadPlan, cache: Path, label: str) -> None:
    free = free_bytes(cache)
    if plan.missing_bytes > free:
        raise DiskFull(f"cannot download {label}: it needs {format_size(plan.missing_bytes)} more "
                       f"(of {format_size(plan.total_bytes)}) but only {format_size(free)} is free at {cache}; "
                       f"free some space or point HF_HOME at a bigger disk")


def format_size(n_bytes: int) -> str:
    """Decimal units, as the hub shows file sizes: 551 MB, 3.39 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{n_bytes} B"


def download(name: str, revision: str | None = None, token: str | None = None, progress: bool = True) -> Path:
    """Fetch a model's config, tokenizer and weights into the Hugging Face cache; return the snapshot folder.

    `name` is a registry alias (small, medium, large, xl, gpt2-large, 13b) or a hub id; the bundled model, a
    local folder or file is already here and comes back as it is. `token` is for gated or private repos (default:
    the one `hf auth login` saved). Offline, or when the hub fails, a complete cached copy is returned. Raises
    ModelNotFound when the model cannot be had here (with why and what to do), DiskFull when it would not fit.
    """
    source = resolve(name)
    if Path(source).exists():
        return Path(source)
    hub_id = source
    label = hub_id if name == hub_id else f"{name} ({hub_id})"
    cache = Path(constants.HF_HUB_CACHE)
    try:
        with _hub_errors(label, hub_id, revision, cache):
            if _offline():
                raise OfflineModeIsEnabled("HF_HUB_OFFLINE=1")
            plan = plan_download(hub_id, revision, token, cache)
    except ModelNotFound:
        cached = cached_snapshot(hub_id, revision, cache)
        if cached is None:
            raise
        # The usual path offline, so not a warning.
        log.info("%s: the hub could not be asked; using the cached copy in %s", label, cached)
        return cached
    check_disk_space(plan, cache, label)
    log.info("%s: %d files, %s, %s of it not cached yet", label, len(plan.files), format_size(plan.total_bytes),
             format_size(plan.missing_bytes))
    with _hub_errors(label, hub_id, revision, cache):
        folder = huggingface_hub.snapshot_download(
            hub_id, revision=revision, token=token, cache_dir=cache,
            allow_patterns=[_literal(f.name) for f in plan.files],
            # Bars only for bytes that move: rugpt.load calls this on every load of a hub model.
            tqdm_class=None if progress and plan.missing_bytes else _SilentBar,
        )
    return Path(folder)


def cached_snapshot(hub_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot of `hub_id` at `revision` (a branch, tag or commit) if it has a config and all weights."""
    storage = cache / repo_folder_name(repo_id=hub_id, repo_type="model")
    revision = revision or constants.DEFAULT_REVISION
    ref = storage / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    folder = storage / "snapshots" / commit
    return folder if _has_config_and_weights(folder) else None


def _has_config_and_weights(folder: Path) -> bool:
    # Snapshot files are links into blobs/: is_file() is False for a link whose blob never finished.
    if not (folder / "config.json").is_file():
        return False
    indexes = list(folder.glob("*.index.json"))
    if indexes:  # sharded weights: every shard the index names must be there
        return any(_shards_present(folder, index) for index in indexes)
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _shards_present(folder: Path, index: Path) -> bool:
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return bool(shards) and all((folder / shard).is_file() for shard in shards)


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, when imported; the variable as it is now counts too.
    from_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return bool(constants.HF_HUB_OFFLINE) or from_env


def _literal(name: str) -> str:
    """A file name as an fnmatch pattern that matches only itself ([, * and ? are wildcards there)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class _SilentBar(hf_tqdm):
    """huggingface_hub's progress bar, always off (download(progress=False))."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x talks through httpx, 2.x through its fork httpx2; a dropped connection is theirs.
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(module).TransportError)
    return tuple(found)


@contextlib.contextmanager
def _hub_errors(label: str, hub_id: str, revision: str | None, cache: Path) -> Iterator[None]:
    """Turn what huggingface_hub raises into one-line rugpt errors; anything unforeseen passes through."""
    try:
        yield
    except RugptError:
        raise
    except Exception as exc:
        error = _explain(exc, label, hub_id, revision, cache)
        if error is None:
            raise
        raise error from None


def _explain(exc: Exception, label: str, hub_id: str, revision: str | None, cache: Path) -> RugptError | None:
    what = f"cannot download {label}"
    if isinstance(exc, GatedRepoError):
        return ModelNotFound(f"{what}: the repo is gated; accept its terms at https://huggingface.co/{hub_id}, "
                             f"then pass --token or run `hf auth login`")
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(f"{what}: revision {revision!r} does not exist there; use a branch, tag or commit "
                             f"of https://huggingface.co/{hub_id}")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFound(f"{what}: the hub has no such model (if it is private, pass --token or run "
                             f"`hf auth login`)")
    if isinstance(exc, DisabledRepoError):
        return ModelNotFound(f"{what}: the hub has disabled this repo")
    if isinstance(exc, HFValidationError):
        return UsageError(f"{what}: {hub_id!r} is not a valid hub id (owner/name)")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFull(f"{what}: the disk at {cache} filled up; free some space or point HF_HOME at a bigger "
                        f"disk and rerun (finished files are kept)")
    if isinstance(exc, OfflineModeIsEnabled) and _offline():
        return ModelNotFound(f"{what}: this machine is offline (HF_HUB_OFFLINE=1) and the Hugging Face cache has "
                             f"no complete copy; run `rugpt download {hub_id}` on a connected machine and copy "
                             f"the cache, or unset HF_HUB_OFFLINE")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", "?")
        return ModelNotFound(f"{what}: the hub answered HTTP {status} and the cache has no complete copy; "
                             f"try again later")
    if isinstance(exc, _network_errors()):
        return ModelNotFound(f"{what}: this machine is offline or huggingface.co is unreachable "
                             f"({type(exc).__name__}) and the cache has no complete copy; check the network "
                             f"(and HTTPS_PROXY) and rerun")
    return None
