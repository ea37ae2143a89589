"""The console script's glibc malloc settings (tvrecipe/exec/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tvrecipe.exec import allocator

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

# Each round, on one long-lived worker thread as the engine's reading and math threads are:
# allocate and fill three 12 MiB (even rounds) or 16 MiB (odd rounds) and three 4 MiB float32
# tensors, then free them. Prints whether the settings applied and the minor page faults of
# rounds 3 to 8 (the first two map the memory in any case). The library is imported first, so
# the untuned run also shows that importing it tunes nothing. (Fresh threads per round would
# race: Python's join returns before a finished thread hands its malloc arena back.)
ROUNDS = """
import resource, sys, torch
from concurrent.futures import ThreadPoolExecutor
import tvrecipe.cli, tvrecipe.exec.runner, tvrecipe.ops
from tvrecipe.exec.allocator import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else False

def once(i):
    big = [torch.empty((3 + i % 2) << 20).fill_(1.0) for _ in range(3)]
    small = [torch.empty(1 << 20).fill_(1.0) for _ in range(3)]
    del big, small

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

with ThreadPoolExecutor(1) as pool:
    pool.submit(once, 0).result()
    pool.submit(once, 1).result()
    start = faults()
    for i in range(2, 8):
        pool.submit(once, i).result()
print(applied, faults() - start)
"""


def _rounds(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True,
                         check=True, env={**environ, **env, "OMP_NUM_THREADS": "1"})
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    # Untuned, glibc gives the freed blocks back and faults their pages in again: more than
    # one 16 MiB block's 4096 pages over rounds 3-8 (24578 on the benchmark box, every time).
    # Tuned, the rounds reuse the blocks: 0 faults there (glibc 2.36); 33621 against 79712
    # on the H200 machine of benchmarks/README.md (its glibc deletes more emptied heaps).
    applied, untuned = _rounds("default")
    assert applied == "False" and untuned > 4096
    applied, tuned = _rounds("tuned")
    assert applied == "True" and tuned < untuned / 2


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize("var", ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD"])
def test_a_users_own_malloc_settings_are_left_alone(var):
    value = {"MALLOC_ARENA_MAX": "4", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4",
             "LD_PRELOAD": ""}[var]
    if var == "LD_PRELOAD":  # an empty LD_PRELOAD sets nothing: the settings still apply
        assert _rounds("tuned", LD_PRELOAD="")[0] == "True"
        return
    assert _rounds("tuned", **{var: value})[0] == "False"


def test_off_linux_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.tune_malloc() is False


def test_the_console_script_tunes_before_the_command(monkeypatch):
    import signal

    from tvrecipe import cli

    order: list[str] = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda: order.append("tune"))
    monkeypatch.setattr(cli, "main", lambda: order.append("main"))

    def leave(code):
        raise RuntimeError(f"exit {code}")

    monkeypatch.setattr(cli.os, "_exit", leave)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(RuntimeError, match="exit 0"):
            cli.entry()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert order == ["tune", "main"]
