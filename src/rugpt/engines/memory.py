"""Give back the resident pages of weights read from a memory-mapped safetensors file once they are copied.

transformers maps a safetensors file into memory and its tensors are views of that mapping. When the
fast engine re-lays a weight out into new memory, the old pages it read stay counted in the process's
resident memory while the file stays mapped (other tensors still use it), so the weights would sit in
memory twice. For a read-only file mapping MADV_DONTNEED is safe: the pages leave this process, and
the same bytes come back from the file if anything ever reads them again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import sys

import torch

log = logging.getLogger(__name__)
_MADV_DONTNEED = 4


@functools.cache
def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def _file_mapping(start: int, end: int) -> str | None:
    """The path of the file mapped over [start, end), or None when that range is not a file mapping."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(part, 16) for part in fields[0].split("-"))
            if low <= start and end <= high:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the resident pages under `tensor` when it is a view of a mapped .safetensors file; True if done.

    Call only once nothing reads `tensor` any more: it stays valid, but reading it faults pages in again.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return False
    page = mmap.PAGESIZE
    first = tensor.data_ptr()
    start = -(-first // page) * page  # whole pages inside the tensor only: neighbours keep theirs
    end = (first + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return False
    path = _file_mapping(start, end)
    if not path or not path.endswith(".safetensors"):
        return False
    if _madvise()(start, end - start, _MADV_DONTNEED) != 0:
        log.debug("madvise failed with errno %d", ctypes.get_errno())
        return False
    return True
