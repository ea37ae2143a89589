"""glibc malloc settings for the command-line process: freed tensor memory is reused.

torch's CPU tensors come from ``malloc``. glibc gives each thread that allocates an arena of
its own, returns the free top of a heap to the kernel once it exceeds a trim threshold, and
serves large blocks with ``mmap``. A merge frees and allocates tensors of the same few sizes
all run long (one model's layer at a time, on reading and math threads), so by default most of
them come back as fresh pages: every page is faulted in and zeroed again. On the 2-core
benchmark box that was 1.5M page faults in one TIES run of the large set (6 GB touched afresh),
and filling a fresh 131 MB float32 tensor took 47 ms against 3.3 ms for one already mapped.

:func:`tune_malloc` keeps freed blocks for reuse instead: blocks up to 32 MiB (glibc's
largest ``mmap`` threshold; larger ones, such as whole embedding matrices, are mapped and
unmapped each time: the runner reuses those itself, :mod:`tvrecipe.exec.buffers`) come from the
arenas, and no arena's free top is trimmed below 1 GiB.
Peak memory is that of the live tensors plus what the arenas leave free between them. (One
arena for all threads as well was no faster and held 30% more memory in a DARE run.) Only
the ``tvrecipe`` console script calls it, never the library: a process that imports tvrecipe
keeps its own allocator settings. Measured in ``benchmarks/README.md``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from functools import cache

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit systems (4 MiB × sizeof(long))
TRIM_THRESHOLD = 1 << 30
# What a user may set to choose for themselves; any of them leaves glibc's settings alone.
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def tune_malloc() -> bool:
    """Apply the settings above to this process's glibc malloc; return whether they were.

    Nothing is changed off Linux, with a C library other than glibc, or when the environment
    already sets malloc (``USER_SETTINGS``, e.g. jemalloc through ``LD_PRELOAD``). Call it
    before the command starts its threads.
    """
    if any(os.environ.get(v) for v in USER_SETTINGS):
        return False
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def trim() -> bool:
    """Give the free memory of every malloc arena back to the kernel (glibc's ``malloc_trim``),
    before a step that needs much memory at once; False where malloc is not glibc's."""
    malloc_trim = _glibc("malloc_trim", (ctypes.c_size_t,))
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def _glibc(name: str, argtypes: tuple) -> Callable | None:
    """glibc's function ``name`` (returning an int), or None off Linux or with another C
    library."""
    return _lookup(name, argtypes) if sys.platform.startswith("linux") else None


@cache
def _lookup(name: str, argtypes: tuple) -> Callable | None:
    # Once per function: trim() runs before every tensor of a fold stream.
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn
