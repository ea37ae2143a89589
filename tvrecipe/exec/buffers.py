"""Reuse of large CPU buffers within a run (whole embedding matrices and the like).

glibc serves every block over 32 MiB (its largest ``mmap`` threshold, see
:mod:`tvrecipe.exec.allocator`) with a fresh mapping and unmaps it on free, so each large
tensor a run reads or converts is faulted in and zeroed page by page again: filling a fresh
131 MB float32 tensor from bfloat16 took 30 ms on the 2-core benchmark box, against 4 ms for
one already mapped. A whole-tensor stream (TIES, the spectral ops) reads every member's
embedding whole, so a TIES run of the large benchmark faulted in about 5 GB.

:class:`BufferPool` hands out tensors over private anonymous memory maps it keeps, and lends
a map again once no tensor (or view) made from it is alive. Each loan is a numpy array over
the map that the tensor is built on (``torch.from_numpy`` holds it until the tensor's
storage, shared by every view, is freed); the pool keeps a weak reference to it, so a map is
free exactly when that array is gone, whatever else refers to the map itself. Memory: the
pool never holds more than the most its tensors ever needed at once (its high-water mark); a
request that fits no free map drops free maps of other sizes first, oldest first, to stay
under that mark, and the runner unmaps the free ones at the end of each pass
(:meth:`BufferPool.release`). Small requests go to ``torch.empty`` unchanged.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
import weakref

import numpy as np
import torch

# glibc's largest mmap threshold: smaller blocks are reused by malloc's arenas already.
MIN_BYTES = 32 << 20


def _new_map(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # private: not shmem-backed


class _Map:
    """One map and its current loan (a weak reference to the array a tensor holds)."""

    __slots__ = ("loan", "map")

    def __init__(self, nbytes: int):
        self.map = _new_map(nbytes)
        self.loan: weakref.ref | None = None

    @property
    def size(self) -> int:
        return len(self.map)

    @property
    def free(self) -> bool:
        return self.loan is None or self.loan() is None

    def lend(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        array = np.frombuffer(self.map, dtype=np.uint8)
        self.loan = weakref.ref(array)
        return torch.from_numpy(array).view(dtype).view(shape)


def fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of its own, from ``torch.empty`` (:meth:`BufferPool.empty`'s signature)."""
    return torch.empty(shape, dtype=dtype)


def pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in page-locked memory (:meth:`BufferPool.empty`'s signature), for what a
    GPU run reads: it is copied to the GPU from there without a staging copy, and torch's
    caching host allocator lends its block again only once that copy is done."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class BufferPool:
    """Large CPU tensors over memory maps that are lent again once nothing uses them.

    Thread-safe. ``empty`` is a drop-in for ``torch.empty(shape, dtype=dtype)`` on the CPU
    (the contents are undefined: a reused map holds whatever its last tensor left).
    """

    def __init__(self, min_bytes: int | None = None):
        self.min_bytes = max(1, MIN_BYTES if min_bytes is None else min_bytes)
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: plain allocations
            self.min_bytes = sys.maxsize
        self._maps: list[_Map] = []  # oldest first
        self._lock = threading.Lock()
        self._mark = 0  # the most bytes in use at once
        self.reused = 0  # requests served by a map lent before (for tests and reports)

    @property
    def _held(self) -> int:
        """Bytes of all maps."""
        return sum(m.size for m in self._maps)

    def _unmap(self, m: _Map) -> None:
        self._maps.remove(m)
        m.map.close()

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = [m for m in self._maps if m.free]
            hit = next((m for m in free if m.size == nbytes), None)
            if hit is not None:
                self.reused += 1
            else:
                in_use = self._held - sum(m.size for m in free)
                self._mark = max(self._mark, in_use + nbytes)
                for m in free:  # oldest first
                    if self._held + nbytes <= self._mark:
                        break
                    self._unmap(m)
                hit = _Map(nbytes)
                self._maps.append(hit)
            return hit.lend(shape, dtype)

    def release(self) -> None:
        """Unmap every free map (a pass ends: the next may not need their sizes, and they
        would stand beside its own memory); maps still lent stay, for later loans."""
        with self._lock:
            for m in [m for m in self._maps if m.free]:
                self._unmap(m)
            self._mark = self._held
