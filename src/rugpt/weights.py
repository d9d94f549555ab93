"""Checkpoint weights on disk: safetensors as they are, pickled `.bin` files converted once, safely.

Most of the ruGPT-3 family is published as `pytorch_model.bin` (small, medium, large, ruGPT-2 large)
or as `.bin` shards with `pytorch_model.bin.index.json` (ruGPT-3.5-13B). A `.bin` file is a pickle,
and unpickling can run arbitrary code, so:

- security: a `.bin` is read only through torch's `weights_only` loader (an allowlist of tensor and
  container types; never full unpickling), and anything but a flat mapping of names to tensors is
  refused with one sentence;
- it is converted once into rugpt's cache as safetensors, shard by shard (memory: one shard at a
  time), written through a temp folder and a rename, in a folder keyed by the source files' SHA-256;
  later loads map that folder's files and never touch the pickle again;
- no remote conversion service is ever asked (transformers' hub auto-conversion is not used).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from pathlib import Path

from rugpt.atomic import atomic_write_dir
from rugpt.cache import cache_dir
from rugpt.errors import ModelNotFound, first_line

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / SAFE_INDEX).is_file()


def bin_files(folder: Path) -> list[Path]:
    """The `.bin` weight files of a folder: the shards its index names, or the single file."""
    index = folder / BIN_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelNotFound(f"{index} is not a valid shard index ({exc})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelNotFound(f"model folder {str(folder)!r} lacks shard(s) {', '.join(missing)} "
                                f"named by {BIN_INDEX}")
        return [folder / n for n in names]
    return [folder / BIN_SINGLE] if (folder / BIN_SINGLE).is_file() else []


def weights_folder(folder: Path) -> Path:
    """Where `folder`'s weights are as safetensors: `folder` itself, or its `.bin` weights converted in the cache
    (that folder holds weights only: load the config from `folder`)."""
    folder = Path(folder)
    if has_safetensors(folder):
        return folder
    sources = bin_files(folder)
    if not sources:
        raise ModelNotFound(f"model folder {str(folder)!r} has no weights: expected model.safetensors, "
                            f"{SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
    target = cache_dir() / "safetensors" / _sources_key(sources)
    if has_safetensors(target):
        return target
    log.info("converting %s (%d file(s)) to safetensors in %s, once", folder, len(sources), target)
    with atomic_write_dir(target) as tmp:
        _convert(folder, sources, tmp)
    return target


def _sources_key(sources: list[Path]) -> str:
    """SHA-256 over the files' own SHA-256s (in the HF cache a file's blob name already is its SHA-256)."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:32]


def file_sha256(path: Path) -> str:
    blob = path.resolve()
    if path.is_symlink() and _HEX64.match(blob.name):
        return blob.name
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _convert(folder: Path, sources: list[Path], out: Path) -> None:
    """Write each `.bin` as a safetensors file (one in memory at a time) and an index if sharded.

    Only weights go into the cache (keyed by their hash); config and tokenizer are read from the source folder.
    """
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for number, source in enumerate(sources, 1):
        tensors = read_bin(source)
        name = "model.safetensors" if len(sources) == 1 else f"model-{number:05d}-of-{len(sources):05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt", "source": source.name})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(sources) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")


def read_bin(path: Path) -> dict:
    """A `.bin` state dict through torch's weights-only loader; tied (shared) tensors kept once."""
    import torch

    if not _looks_like_torch_file(path):
        raise ModelNotFound(f"cannot read {str(path)!r} as torch weights: it is neither a torch zip archive nor "
                            f"a pickle (a failed download, or another format?)")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # files from torch < 1.6 are not zip archives and cannot be mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelNotFound(f"refused {str(path)!r}: it holds objects other than tensors, and rugpt reads pickled "
                            f"weights only through torch's weights-only loader ({_refusal(exc)})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelNotFound(f"cannot read {str(path)!r} as torch weights: {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelNotFound(f"refused {str(path)!r}: it is not a mapping of names to tensors (found "
                            f"{type(state).__name__}), so it is not a checkpoint rugpt can read")
    if not state:
        raise ModelNotFound(f"refused {str(path)!r}: it holds no tensors")
    return _drop_shared(state)


def _drop_shared(state: dict) -> dict:
    """safetensors refuses tensors that share memory; GPT-2's tied head is such a pair, re-tied on load."""
    seen: dict[tuple, str] = {}
    kept = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            log.debug("%s shares memory with %s; kept once", name, seen[key])
            continue
        seen[key] = name
        kept[name] = tensor.contiguous()
    return kept


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (torch >= 1.6) or, before that, a pickle (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refusal(exc: BaseException) -> str:
    """The line of torch's weights-only error that names what was refused, e.g. 'unsupported GLOBAL posix.mkdir'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    return (named or lines or [type(exc).__name__])[0].rstrip(".")


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a safetensors folder, in the order its index names them (or the single file)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        return [folder / n for n in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
    return [folder / "model.safetensors"]


def stored_dtype(folder: Path) -> str:
    """The dtype the floating-point weights are stored in ('float32', 'float16', ...), from the first file's header."""
    from safetensors import safe_open

    with safe_open(safetensors_files(folder)[0], framework="pt") as f:
        for name in f.keys():
            kind = f.get_slice(name).get_dtype()
            if kind in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[kind]
    return "float32"


def load_cast(model, folder: Path, dtype) -> list[str]:
    """Copy the weights of `folder` into `model` (already allocated in `dtype`), one file at a time.

    Why not transformers' loader: it keeps every shard mapped until the end, so loading a float32
    checkpoint into bf16 touches the whole float32 file (59 GB for ruGPT-3.5-13B). Here one file is
    open at a time and closed (unmapped) before the next: memory stays near the final weights plus one
    file. Returns the model's tensor names no file held (tied copies excluded).
    """
    import torch
    from safetensors import safe_open

    state = model.state_dict()
    filled: set[int] = set()
    with torch.no_grad():
        for file in safetensors_files(folder):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name in state:
                        state[name].copy_(f.get_tensor(name).to(dtype))
                        filled.add(state[name].data_ptr())
    return [name for name, tensor in state.items() if tensor.data_ptr() not in filled]
