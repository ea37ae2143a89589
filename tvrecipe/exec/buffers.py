"""Reuse of large CPU buffers within a run (whole embedding matrices and the like).

glibc serves every block over 32 MiB (its largest ``mmap`` threshold, see
:mod:`tvrecipe.exec.allocator`) with a fresh mapping and unmaps it on free, so each large
tensor a run reads or converts is faulted in and zeroed page by page again: filling a fresh
131 MB float32 tensor from bfloat16 took 30 ms on the 2-core benchmark box, against 4 ms for
one already mapped. A whole-tensor stream (TIES, ``cluster_basis``' merge) reads every
member's embedding whole, so a TIES run of the large benchmark faulted in about 5 GB.

:class:`BufferPool` hands out tensors over anonymous memory maps it keeps, and lends a map
again once no tensor (or view) made from it is alive. A tensor built with
``torch.frombuffer`` holds a reference to its map until its storage is freed, so a map is
free exactly when only the pool refers to it. Memory: the pool never holds more than the
most its tensors ever needed at once (its high-water mark); a request that fits no free map
drops free maps of other sizes first, oldest first, to stay under that mark. Small requests
go to ``torch.empty`` unchanged.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading

import torch

# glibc's largest mmap threshold: smaller blocks are reused by malloc's arenas already.
MIN_BYTES = 32 << 20


def _refs(m: mmap.mmap) -> int:
    return sys.getrefcount(m)


def _new_map(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # private: not shmem-backed


class BufferPool:
    """Large CPU tensors over memory maps that are lent again once nothing uses them.

    Thread-safe. ``empty`` is a drop-in for ``torch.empty(shape, dtype=dtype)`` on the CPU
    (the contents are undefined: a reused map holds whatever its last tensor left).
    """

    def __init__(self, min_bytes: int | None = None):
        self.min_bytes = max(1, MIN_BYTES if min_bytes is None else min_bytes)
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: plain allocations
            self.min_bytes = sys.maxsize
        self._maps: list[mmap.mmap] = []  # oldest first
        self._lock = threading.Lock()
        self._held = 0  # bytes of all maps
        self._mark = 0  # the most bytes in use at once
        # What _refs reports for a map only the pool refers to (the list, the loop's name,
        # the call's argument): measured the same way as every later check, so it holds on
        # any Python version.
        self._free_refs = 0
        if self.min_bytes < sys.maxsize:
            probe = [_new_map(mmap.PAGESIZE)]
            for m in probe:
                self._free_refs = _refs(m)
            probe[0].close()
        self.reused = 0  # requests served by a map lent before (for tests and reports)

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = []
            for m in self._maps:
                if _refs(m) == self._free_refs:
                    free.append(m)
            hit = next((m for m in free if len(m) == nbytes), None)
            if hit is not None:
                self.reused += 1
            else:
                in_use = self._held - sum(len(m) for m in free)
                self._mark = max(self._mark, in_use + nbytes)
                for m in free:  # oldest first
                    if self._held + nbytes <= self._mark:
                        break
                    self._maps.remove(m)
                    self._held -= len(m)
                    m.close()
                hit = _new_map(nbytes)
                self._maps.append(hit)
                self._held += nbytes
            return torch.frombuffer(hit, dtype=dtype, count=numel).view(shape)
