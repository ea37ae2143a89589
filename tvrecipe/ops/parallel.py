"""Independent per-tensor work spread over the cores with threads.

Torch releases the GIL inside its kernels, so independent pieces of work (one input's
threshold, one member's DARE mask, one range of a merge) run in parallel Python threads.
Every piece is exact and deterministic on its own, so results never depend on the number
of threads or their order. On a machine where the executor's reading thread competes for
the cores this beat torch's intra-op threads (a TIES merge of 8 inputs: 13 s against 18 s
on 2 cores, benchmarks/run.py): the OS shares the cores out instead of spinning teams.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["cores", "machine_cores", "parallel_map", "serial", "share_cores", "splits"]

T = TypeVar("T")
R = TypeVar("R")

# Work on tensors smaller than this many entries stays on the calling thread.
PARALLEL_MIN = 1 << 18

_POOL: ThreadPoolExecutor | None = None
_POOL_WIDTH = 0
_local = threading.local()


_SHARE: list[int] = []  # a cluster worker's share of its machine's cores (share_cores)


def cores() -> int:
    """The number of cores this process may run on (a cluster worker's share of them while
    :func:`share_cores` says so)."""
    if _SHARE:
        return _SHARE[-1]
    return machine_cores()


def machine_cores() -> int:
    """The number of cores this process's machine lets it run on: the CPUs it may be
    scheduled on, fewer where its cgroup's CPU quota says so (a container limited to 2
    CPUs on a 64-core host: 64 threads would only queue for the 2)."""
    try:
        usable = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count() or 1
    quota = cgroup_cores()
    return usable if quota is None else max(1, min(usable, quota))


# Where Linux says a cgroup's CPU quota: v2's "QUOTA PERIOD" (or "max PERIOD"), v1's two files.
CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cores() -> int | None:
    """The CPUs this process's cgroup may use (its quota over its period, rounded up), or
    None where there is no quota (or no cgroup file to read)."""
    def read(path: str) -> str | None:
        try:
            with open(path, encoding="ascii") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError):
            return None

    v2 = read(CGROUP_V2)
    parts = v2.split() if v2 else [read(CGROUP_V1[0]) or "", read(CGROUP_V1[1]) or ""]
    try:
        quota, period = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):  # "max" (no quota), or nothing readable
        return None
    if quota <= 0 or period <= 0:  # (v1 says -1 for no quota)
        return None
    return -(-quota // period)


@contextmanager
def share_cores(n: int) -> Iterator[None]:
    """Within the block, :func:`cores` says ``n`` (at least 1): a Dask worker process that
    shares its machine with others counts only its share for its math threads and ranges
    (the results do not depend on the count, see the module's docstring)."""
    _SHARE.append(max(1, n))
    try:
        yield
    finally:
        _SHARE.pop()


def _worth_it(numel: int, device: torch.device) -> bool:
    # Nested calls stay on their thread: a worker waiting on the pool could deadlock it.
    return (numel >= PARALLEL_MIN and device.type == "cpu" and cores() > 1
            and not getattr(_local, "worker", False))


def splits(numel: int, device: torch.device) -> int:
    """Into how many ranges to cut entrywise work on ``numel`` entries: one per core when
    :func:`parallel_map` would run them in parallel, but none of fewer than
    ``PARALLEL_MIN`` entries; else 1.

    Each range costs Python calls, one per kernel, made holding the GIL that all the
    threads share: cut in 16 ranges, a 1M-entry tensor's TIES merge made 4 times the calls
    it makes in 2 (16 chunks instead of 4), each on a kernel a quarter as long. On the
    large benchmark TIES's math threads made 1.75 times the torch calls on 16 cores as on 2,
    and 1.1 times with this (``benchmarks/calls.py``).
    """
    return min(cores(), numel // PARALLEL_MIN) if _worth_it(numel, device) else 1


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, numel: int,
                 device: torch.device) -> Iterable[R]:
    """``map(fn, items)``, on one thread per core for CPU tensors of at least
    ``PARALLEL_MIN`` entries (``numel``); results come back in the order of ``items``.
    ``device`` is where the work runs: pass the CPU for CPU work on another device's tensors
    (the CPU draws of a random op on a GPU run)."""
    if len(items) < 2 or not _worth_it(numel, device):
        return map(fn, items)
    return _pool().map(fn, items)


_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The math threads, started together, each with one torch thread of its own.

    Torch's thread count is per thread, and a new thread takes the count last set anywhere:
    a worker would otherwise run its kernels on as many OpenMP threads as the main thread,
    one team per worker (16 workers × 15 threads on a 16-core machine, where a decompose of
    the large benchmark ran over 200 s; 13.2 s with this). So each worker sets 1 as it
    starts, all of them start here (a barrier keeps each on its own thread), and the
    caller's count is set back after, for the threads started later.

    One thread per core of :func:`cores`: a cluster worker whose share changes (a later
    run's cluster has other workers) gets a pool of the new width; the old one finishes what
    it was given and ends.
    """
    global _POOL, _POOL_WIDTH
    with _POOL_LOCK:
        n = cores()
        if _POOL is None or _POOL_WIDTH != n:
            old = _POOL
            keep = torch.get_num_threads()
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tvrecipe-math")
            started = threading.Barrier(n)
            list(pool.map(lambda _i: _start_worker(started), range(n)))
            torch.set_num_threads(keep)
            _POOL, _POOL_WIDTH = pool, n
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def _start_worker(started: threading.Barrier) -> None:
    _local.worker = True
    # A thread's first torch call sets its count from torch's default, once: make that call
    # first, or it would later undo the 1.
    torch.get_num_threads()
    torch.set_num_threads(1)
    started.wait()


@contextmanager
def serial() -> Iterator[None]:
    """Run torch on one thread inside the block, for the kernels whose bytes depend on how
    many threads share them: LAPACK's factorisations (eigh, svd, qr, cholesky), MKL's
    products of thin or small matrices (a 704 × 256 matrix times a 256 × 26 one gave other
    bits on 3 threads than on 1), and torch's reductions of a whole tensor to a few numbers
    (a sum, a norm), whose threads' partial results are added in an order set by their
    number. Inside it these give the same bytes on a 2-core laptop and a 64-core server,
    so a lock written on one verifies on the other (``tests/test_threads.py``).

    Entrywise kernels need none of this (each entry is one rounding, on any thread). Large
    products keep their speed by being cut into pieces fixed by the shape, which the math
    threads (one torch thread each) take several at a time (``ops/spectral.py``)."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
