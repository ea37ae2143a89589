"""Faults: runs killed at random points, a full disk, a folder that cannot be written, and broken
or dangerous inputs. Whatever happens, the target holds a complete output or none, a failed run
writes nothing, and the message says what is wrong and what to do.

Covered in tests/test_cli_errors.py and not repeated here: a ``.bin``-only folder (pickled
weights) and NaN in a fine-tune with and without ``--allow-nonfinite``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tvrecipe.store.output as output_module
import tvrecipe.store.writer as writer_module
from tests.conftest import base_weights, finetune, listing, save_model, snapshot
from tests.test_cli_errors import checkpoints, nothing_written, simple
from tvrecipe.store.cache import TensorCache


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder, read with safetensors (fails on a partial file)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                out[k] = h.get_tensor(k)
    return out


# ---- 1. killed runs -------------------------------------------------------------------------

BIG_RECIPE = """\
tvrecipe: 1
models:
  base: ./base
  a: ./a
  b: ./b
  c: ./c
steps:
  tv: {op: extract, base: base, finetuned: [a, b, c]}
  merged: {op: sum, inputs: [tv.a, tv.b, tv.c], weights: [0.5, 0.3, -0.2]}
  model: {op: apply, base: base, delta: merged}
outputs:
  model: {from: model, path: ./out/model, shard_size: 8MB}
"""


def big_models(root: Path, rows: int = 3000, cols: int = 256, n: int = 6) -> Path:
    """4 models of ``n`` float32 tensors ``rows`` x ``cols`` (about 3 MB each); the recipe."""
    g = torch.Generator().manual_seed(7)
    base = {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(n)}
    for name in ("base", "a", "b", "c"):
        w = base if name == "base" else {
            k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        (root / name).mkdir(parents=True)
        save_file(w, str(root / name / "model.safetensors"))
    recipe = root / "r.yaml"
    recipe.write_text(BIG_RECIPE)
    return recipe


def start_run(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TVRECIPE_CACHE", None)
    return subprocess.Popen([sys.executable, "-m", "tvrecipe.cli", "run", recipe.name, "--force",
                             "-q"], cwd=recipe.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def staging(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name.startswith(".")} if out.is_dir() else set()


def stamp(path: Path) -> tuple[int, int] | None:
    """Identity of a file's current version (the lock is replaced, not rewritten)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_until(proc: subprocess.Popen, done) -> float:
    """Poll ``done()`` until it holds or the process ends; returns the time it did."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if done() or proc.poll() is not None:
            return time.monotonic()
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the run did not get there in 120 s")


def test_killed_runs_leave_the_old_or_the_new_output(tmp_path):
    recipe = big_models(tmp_path)
    out, target = tmp_path / "out", tmp_path / "out" / "model"
    lock = tmp_path / "r.yaml.lock"
    cache = TensorCache(tmp_path / ".tvrecipe" / "cache")

    # A first complete run gives the reference bytes, and how long a run spends between
    # creating its staging folder and writing the lock (the span worth interrupting).
    proc = start_run(recipe)
    started = wait_until(proc, lambda: staging(out))
    window = wait_until(proc, lock.exists) - started
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    reference = snapshot(target)
    ref_tensors = read_all(target)
    assert len(reference) >= 2 and len(ref_tensors) == 6

    rng = random.Random(20240611)
    for sig in (signal.SIGINT, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        name = signal.Signals(sig).name
        # A run that finishes before its signal lands interrupts nothing: try again, the
        # signal sooner each time (a noisy machine makes the window of the first, cold run a
        # poor guess for later, warm ones), until one is interrupted.
        for attempt in range(6):
            if interrupted_once(recipe, out, target, lock, cache, sig, reference, ref_tensors,
                                rng, window * 0.5 ** attempt):
                break
        else:
            raise AssertionError(f"{name}: six runs finished before the signal landed")

    proc = start_run(recipe)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert snapshot(target) == reference
    assert staging(out) == set()  # the SIGKILLed runs' staging folders were swept

    # Leftovers of killed runs: gc removes them once they are old enough to belong to no run.
    tmp_files = list(cache.root.rglob("*.tmp"))
    assert tmp_files, "no SIGKILL cut a cache entry short: nothing for gc to do"
    old = time.time() - 2 * 3600
    for p in tmp_files:
        os.utime(p, (old, old))
    gc = subprocess.run([sys.executable, "-m", "tvrecipe.cli", "cache", "gc", "--recipe",
                         recipe.name], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        check=False)
    assert gc.returncode == 0, gc.stderr
    n = len(tmp_files)
    assert gc.stdout.strip() == f"removed {n} file{'' if n == 1 else 's'}"
    assert not list(cache.root.rglob("*.tmp"))
    assert cache.entries(), "gc without --older-than keeps complete entries"


def interrupted_once(recipe, out, target, lock, cache, sig, reference, ref_tensors, rng,
                     window) -> bool:
    """One run, sent ``sig`` early in ``window``; whether it was interrupted. Either way the
    target must hold the previous complete output or the new one (the same bytes)."""
    # Drop the cached sum, so each run writes a cache entry that a kill can cut short.
    for entry in cache.entries():
        cache.remove(entry.key)
    before, locked = staging(out), stamp(lock)
    proc = start_run(recipe)
    wait_until(proc, lambda: staging(out) - before)
    share = (0.03, 0.35) if sig == signal.SIGKILL else (0.0, 0.45)
    time.sleep(rng.uniform(*share) * window)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    code, name = proc.returncode, signal.Signals(sig).name
    interrupted = stamp(lock) == locked  # the signal came before the run finished its work
    if interrupted:
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, f"{name}: exit {code}\n{err}"
        else:
            assert code == 130, f"{name}: exit {code}\n{err}"
            assert err.splitlines() == [
                "tvrecipe: interrupted:",
                "  interrupted; temporary outputs were removed, the cache is intact"], err
            # Cleaned up: no staging or set-aside folder of this run is left.
            # (A SIGKILLed run's leftover may have been swept meanwhile.)
            assert staging(out) <= before, f"{name}: left {staging(out) - before}"
    # Else the run had written everything (see test_signal_after_the_work_is_done).
    assert snapshot(target) == reference, f"{name} (exit {code}) left a different output"
    got = read_all(target)
    assert got.keys() == ref_tensors.keys()
    assert all(torch.equal(got[k], ref_tensors[k]) for k in got)
    return interrupted


def test_signal_after_the_work_is_done(tmp_path):
    # Once the command has returned, Ctrl-C must not turn a finished run into a traceback
    # (the console script exits without interpreter teardown, so the window is the final
    # flush): send SIGINT from inside that flush.
    script = tmp_path / "late_signal.py"
    script.write_text(
        "import os, signal, sys\n"
        "import tvrecipe.cli as cli\n"
        "cli.main = lambda: sys.exit(0)  # a command that finished, as click ends it\n"
        "class Out:\n"
        "    def __init__(self, f): self.f = f\n"
        "    def flush(self): os.kill(os.getpid(), signal.SIGINT); self.f.flush()\n"
        "    def __getattr__(self, name): return getattr(self.f, name)\n"
        "sys.stdout = Out(sys.stdout)\n"
        "cli.entry()\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr


def test_console_script_keeps_exit_codes(tmp_path):
    # entry() skips interpreter teardown: the exit code must still be the command's.
    bad = tmp_path / "bad.yaml"
    bad.write_text("tvrecipe: 1\nsteps: {a: {op: nosuch}}\n")
    run = [sys.executable, "-m", "tvrecipe.cli"]
    got = subprocess.run([*run, "validate", str(bad)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert got.returncode == 2 and "tvrecipe: recipe error" in got.stderr
    got = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert got.returncode == 0 and got.stdout.startswith("tvrecipe, version ")


def test_interrupt_between_the_two_renames_keeps_the_previous_output(cli, tmp_path,
                                                                     monkeypatch):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    cli.ok("run", "r.yaml")
    target = tmp_path / "out" / "model"
    previous = snapshot(target)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".model.tmp-"):  # the new output moving into place
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(output_module.os, "rename", rename)
    res = cli.fails(130, "run", "r.yaml", "--force")
    assert "interrupted" in res.stderr
    assert snapshot(target) == previous


@pytest.mark.parametrize("where", ["removing the previous output", "writing the lock"])
def test_ctrl_c_while_committing_leaves_new_outputs_and_their_lock(cli, tmp_path, monkeypatch,
                                                                   where):
    # Ctrl-C after the new output was renamed into place, while the previous one was being
    # deleted or the lock written: it used to leave the new output with the old lock (the
    # next run refused it as changed) and the previous output in .model.old-*. The renames
    # and the lock are now one step that a signal waits for.
    from tvrecipe.exec import lockfile

    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    cli.ok("run", "r.yaml")
    cli.write("r.yaml", simple().replace("delta: tv}", "delta: tv, scale: 0.5}"))

    def ctrl_c(real):
        def call(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            return real(*args, **kwargs)
        return call

    with monkeypatch.context() as m:
        if where == "writing the lock":
            m.setattr(lockfile, "stage_run_lock", ctrl_c(lockfile.stage_run_lock))
        else:
            m.setattr(output_module.shutil, "rmtree", ctrl_c(output_module.shutil.rmtree))
        res = cli.fails(130, "run", "r.yaml", "--no-cache")
    assert res.err_lines == ["tvrecipe: interrupted:", ("interrupted once the outputs and their "
                             "lock were written (they are complete)")]
    assert not list((tmp_path / "out").glob(".model.*"))
    cli.ok("verify", "r.yaml")  # the outputs are the new ones, and the lock says so
    res = cli.ok("run", "r.yaml")
    assert "outputs are up to date with the lock" in res.stdout
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "r.yaml.lock").stat().st_mode & 0o777 == 0o666 & ~mask  # not 0600


def test_ctrl_c_while_the_finished_command_cleans_up_keeps_its_exit(cli, tmp_path,
                                                                    monkeypatch):
    # A Ctrl-C in handle_errors' cleanup, after the run and its lock were written, escaped as
    # click's "Aborted!" with exit 1; it is dropped there now.
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    real = output_module.OutputFolder.abort_all

    def abort_all():
        os.kill(os.getpid(), signal.SIGINT)
        real()

    monkeypatch.setattr(output_module.OutputFolder, "abort_all", staticmethod(abort_all))
    res = cli.ok("run", "r.yaml")
    assert "Aborted" not in res.stderr and (tmp_path / "r.yaml.lock").exists()


def test_ctrl_c_that_pydantic_wrapped_is_an_interrupt(cli, tmp_path, monkeypatch):
    # A Ctrl-C while pydantic-core builds the recipe models comes out as its SchemaError
    # quoting the KeyboardInterrupt: exit 130, not an internal error (70).
    import pydantic_core

    import tvrecipe.cli as cli_module

    checkpoints(tmp_path)
    cli.write("r.yaml", simple())

    def building(*_args, **_kwargs):
        raise pydantic_core.SchemaError('Error building "model" validator:\n  KeyboardInterrupt: ')

    monkeypatch.setattr(cli_module, "_compile", building)
    res = cli.fails(130, "run", "r.yaml")
    assert res.err_lines == ["tvrecipe: interrupted:",
                             "interrupted; temporary outputs were removed, the cache is intact"]


# ---- 2. a full disk -------------------------------------------------------------------------

FULL_RECIPE = """\
tvrecipe: 1
models:
  base: ./ckpt/base
  a: ./ckpt/a
  b: ./ckpt/b
steps:
  tv: {op: extract, base: base, finetuned: [a, b]}
  merged: {op: sum, inputs: tv, weights: {a: 0.5, b: 0.5}}
  model: {op: apply, base: base, delta: merged}
outputs:
  model: {from: model, path: ./out/model, shard_size: 600}
  vectors: {from: tv, path: ./out/vectors}
"""


class FullDisk:
    """A file whose ``write`` fails with ENOSPC after ``budget`` successful calls (all files
    together), or whose ``flush`` fails when ``budget`` is None; ``full = False`` frees space."""

    calls = 0
    budget: int | None = 0
    full = True

    def __init__(self, f):
        self._f = f

    def write(self, data):
        FullDisk.calls += 1
        if self.full and self.budget is not None and FullDisk.calls > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def flush(self):
        if self.full and self.budget is None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)




@pytest.mark.parametrize("budget", [
    pytest.param(0, id="first-header"),
    pytest.param(1, id="second-header"),
    pytest.param(4, id="early"), pytest.param(12, id="middle"), pytest.param(30, id="late"),
    pytest.param(None, id="flush"),
])
def test_full_disk_while_writing(cli, tmp_path, monkeypatch, budget):
    base = base_weights(0)
    for i, name in enumerate(("base", "a", "b")):
        save_model(tmp_path / "ckpt" / name, base if name == "base" else finetune(base, i))
    cli.write("r.yaml", FULL_RECIPE)
    monkeypatch.setattr(FullDisk, "calls", 0)
    monkeypatch.setattr(FullDisk, "budget", budget)
    monkeypatch.setattr(FullDisk, "full", True)
    monkeypatch.setattr(writer_module, "open",
                        lambda *a, **k: FullDisk(open(*a, **k)),  # noqa: SIM115
                        raising=False)
    res = cli.fails(4, "run", "r.yaml")
    assert FullDisk.calls > 0 or budget is None
    lines = res.err_lines
    assert lines[0] == "tvrecipe: output error:"
    assert len(lines) == 2
    assert lines[1].startswith(f"cannot write {tmp_path}/")
    assert lines[1].endswith(": No space left on device; free space on that disk or write the "
                             "output elsewhere")
    nothing_written(tmp_path)
    nothing_written(tmp_path, "out/vectors")
    cache = TensorCache(tmp_path / ".tvrecipe" / "cache")
    assert cache.entries() == []
    assert cache.leftovers() == []
    # Space freed: the same command now succeeds.
    FullDisk.full = False
    cli.ok("run", "r.yaml")
    assert (tmp_path / "out" / "model" / "model.safetensors.index.json").is_file()


def test_a_lock_that_cannot_be_written_replaces_no_output(cli, tmp_path, monkeypatch):
    # The recipe's disk fills up between the check before the run and the lock: the lock is
    # written (beside its place) before any output is renamed, so nothing is replaced and
    # outputs and lock stay as they were.
    from tvrecipe.exec import lockfile

    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    cli.ok("run", "r.yaml", "-q")
    before = snapshot(tmp_path / "out")
    lock = (tmp_path / "r.yaml.lock").read_bytes()
    cli.write("r.yaml", simple().replace("delta: tv}", "delta: tv, scale: 0.5}"))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(lockfile, "write_lock_temp", full)
        res = cli.fails(4, "run", "r.yaml")
    assert res.err_lines == ["tvrecipe: output error:", (
        f"cannot write the lock file r.yaml.lock: No space left on device; check the space on "
        f"its disk and the permissions of {tmp_path} (no output was replaced)")]
    assert snapshot(tmp_path / "out") == before
    assert (tmp_path / "r.yaml.lock").read_bytes() == lock
    assert not list((tmp_path / "out").glob(".model.*"))
    cli.ok("run", "r.yaml", "-q")  # space again: the run replaces the output, with its lock
    cli.ok("verify", "r.yaml")
    assert snapshot(tmp_path / "out") != before


def _run_two_outputs_then_edit(cli, tmp_path) -> tuple[dict, bytes]:
    """Run a recipe of two outputs, then edit it: the outputs' files and the lock as the
    first run left them."""
    base = base_weights(0)
    for i, name in enumerate(("base", "a", "b")):
        save_model(tmp_path / "ckpt" / name, base if name == "base" else finetune(base, i))
    cli.write("r.yaml", FULL_RECIPE)
    cli.ok("run", "r.yaml", "-q")
    before = {n: snapshot(tmp_path / "out" / n) for n in ("model", "vectors")}
    lock = (tmp_path / "r.yaml.lock").read_bytes()
    cli.write("r.yaml", FULL_RECIPE.replace("a: 0.5, b: 0.5", "a: 0.25, b: 0.5"))
    return before, lock


def test_an_output_that_cannot_go_in_puts_the_others_back(cli, tmp_path, monkeypatch):
    # Two outputs: the first is in place when the second's rename fails. The first one's
    # previous folder goes back, so outputs and lock stay all old, and a rerun replaces both.
    before, lock = _run_two_outputs_then_edit(cli, tmp_path)
    real = os.rename
    swapped = []

    def rename(src, dst):
        src, dst = Path(src), Path(dst)
        if dst == tmp_path / "out" / "vectors" and ".tmp-" in src.name:
            raise OSError(errno.EACCES, "Permission denied")
        if dst == tmp_path / "out" / "model" and ".tmp-" in src.name:
            swapped.append(dst)
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(output_module.os, "rename", rename)
        res = cli.fails(4, "run", "r.yaml", "--force")
    assert swapped  # (the model went in first, then came out again)
    out = tmp_path / "out"
    assert res.err_lines == ["tvrecipe: output error:", (
        f"cannot write {out / 'vectors'}: Permission denied; check the permissions of {out} "
        "or write the output elsewhere")]
    assert {n: snapshot(tmp_path / "out" / n) for n in ("model", "vectors")} == before
    assert (tmp_path / "r.yaml.lock").read_bytes() == lock
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model", "vectors"]
    cli.ok("run", "r.yaml", "--force", "-q")
    assert snapshot(tmp_path / "out" / "model") != before["model"]
    cli.ok("verify", "r.yaml")


def test_a_lock_that_cannot_be_renamed_into_place_takes_the_outputs_back(cli, tmp_path,
                                                                          monkeypatch):
    # Every output is in place when the lock's rename fails: they go back out, and their
    # previous folders back in, so outputs and lock stay all old.
    before, lock = _run_two_outputs_then_edit(cli, tmp_path)
    from tvrecipe.exec import lockfile
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "r.yaml.lock":
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(lockfile.os, "replace", replace)
        res = cli.fails(4, "run", "r.yaml", "--force")
    assert res.err_lines == ["tvrecipe: output error:", (
        "cannot write the lock file r.yaml.lock: Input/output error; check the "
        f"permissions of {tmp_path} (no output was replaced)")]
    assert {n: snapshot(tmp_path / "out" / n) for n in ("model", "vectors")} == before
    assert (tmp_path / "r.yaml.lock").read_bytes() == lock
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model", "vectors"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".r.yaml")) == []


def test_ctrl_c_while_cache_entries_are_opened_leaves_no_temp_file(cli, tmp_path, monkeypatch):
    base = base_weights(0)
    for i, name in enumerate(("base", "a", "b")):
        save_model(tmp_path / "ckpt" / name, base if name == "base" else finetune(base, i))
    cli.write("r.yaml", FULL_RECIPE.replace(  # (two cached steps: sum and ties)
        "  model: {op: apply", "  t: {op: ties, inputs: tv, density: 0.5}\n  model: {op: apply"
        ) + "  t: {from: t, path: ./out/t}\n")
    real = TensorCache.pending
    opened = []

    def pending(self, *args, **kwargs):
        if opened:  # the second entry: Ctrl-C, the first one open
            raise KeyboardInterrupt
        opened.append(real(self, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(TensorCache, "pending", pending)
    cli.fails(130, "run", "r.yaml")
    assert opened and not opened[0].failed
    cache = TensorCache(tmp_path / ".tvrecipe" / "cache")
    assert cache.leftovers() == [] and cache.entries() == []
    nothing_written(tmp_path)
    nothing_written(tmp_path, "out/t")


# ---- 3. permission denied -------------------------------------------------------------------


def test_output_folder_not_writable(cli, tmp_path):
    checkpoints(tmp_path)
    locked = tmp_path / "out"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod 0o500 does not stop writes")
        cli.write("r.yaml", simple())
        res = cli.fails(4, "run", "r.yaml")
        assert res.err_lines[0] == "tvrecipe: output error:"
        assert res.err_lines[1].startswith(f"cannot write {locked}: Permission denied; ")
        assert listing(locked) == []
    finally:
        locked.chmod(0o700)


def _deny_mkdtemp(monkeypatch):
    """What a folder without write permission does to the staging folder (works as root)."""

    def make_staging(parent, name):
        raise PermissionError(errno.EACCES, "Permission denied",
                              os.path.join(parent, f".{name}.tmp-abcd1234"))

    monkeypatch.setattr(output_module, "_make_staging", make_staging)


def test_permission_denied_names_the_path(cli, tmp_path, monkeypatch):
    checkpoints(tmp_path)
    (tmp_path / "out").mkdir()
    cli.write("r.yaml", simple())
    _deny_mkdtemp(monkeypatch)
    res = cli.fails(4, "run", "r.yaml")
    assert res.err_lines[0] == "tvrecipe: output error:"
    assert res.err_lines[1].startswith(f"cannot write {tmp_path / 'out'}: Permission denied; "
                                       "check the permissions of ")
    assert res.err_lines[1].endswith(" or write the output elsewhere")
    assert listing(tmp_path / "out") == []
    assert not (tmp_path / "r.yaml.lock").exists()


def test_permission_denied_hint_names_the_unwritable_folder(cli, tmp_path, monkeypatch):
    checkpoints(tmp_path)
    (tmp_path / "out").mkdir()
    cli.write("r.yaml", simple())
    _deny_mkdtemp(monkeypatch)
    res = cli.fails(4, "run", "r.yaml")
    assert f"check the permissions of {tmp_path / 'out'} or write" in res.err_lines[1]


# ---- 4. broken or dangerous inputs ----------------------------------------------------------


def input_error(cli, tmp_path, command: str = "run") -> list[str]:
    """Run ``command`` on r.yaml expecting exit 3 and nothing written; returns stderr lines."""
    before = listing(tmp_path / "ckpt")
    res = cli.fails(3, command, "r.yaml")
    nothing_written(tmp_path)
    assert listing(tmp_path / "ckpt") == before
    assert res.err_lines[0] == "tvrecipe: input error:"
    return res.err_lines[1:]


def test_corrupt_safetensors_header(cli, tmp_path):
    base = checkpoints(tmp_path)
    save_model(tmp_path / "ckpt" / "bad", finetune(base, 2))
    f = tmp_path / "ckpt" / "bad" / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes(data[:8] + b"{garbage" + b" " * (n - 8) + data[8 + n:])
    cli.write("r.yaml", simple(ft="./ckpt/bad"))
    for command in ("run", "plan"):
        assert input_error(cli, tmp_path, command) == [
            (f"model 'ft' (./ckpt/bad): {f}: corrupt safetensors file: header is not valid JSON "
            "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
            "re-download or re-export it")]


def test_index_names_a_missing_shard(cli, tmp_path):
    base = checkpoints(tmp_path)
    ft = finetune(base, 2)
    folder = tmp_path / "ckpt" / "sharded"
    folder.mkdir()
    names = list(ft)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({k: ft[k] for k in names[:4]}, str(folder / first))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        k: first if i < 4 else second for i, k in enumerate(names)}}))
    cli.write("r.yaml", simple(ft="./ckpt/sharded"))
    assert input_error(cli, tmp_path) == [
        (f"model 'ft' (./ckpt/sharded): {index}: names shard '{second}', but {folder / second} "
        "does not exist; download the missing shard or regenerate the index")]


@pytest.mark.parametrize("model, dtype, other", [
    ("ft", "F32", "I64"),   # the base's integer buffer is floating in the fine-tune
    ("ft", "I32", "F32"),   # a floating tensor of the base is integer in the fine-tune
])
def test_dtype_kind_mismatch(cli, tmp_path, model, dtype, other):
    base = checkpoints(tmp_path)
    ft = finetune(base, 2)
    name = "model.position_ids" if other == "I64" else "model.layers.0.mlp.up_proj.bias"
    ft[name] = (ft[name].float() if dtype == "F32" else torch.zeros(12, dtype=torch.int32))
    save_model(tmp_path / "ckpt" / "mixed", ft)
    cli.write("r.yaml", simple(ft="./ckpt/mixed"))
    assert input_error(cli, tmp_path) == [
        "the inputs' tensors do not line up:",
        f"tensor '{name}' is {dtype} in model '{model}' but {other} in 'base'",
        ("(merging needs the same tensors in every input: check that every model is a "
         "fine-tune of the same base)")]


def test_an_output_layer_in_some_models_only_points_at_tied_embeddings(cli, tmp_path):
    base = checkpoints(tmp_path)
    ft = finetune(base, 2)
    del ft["lm_head.weight"]  # a fine-tune that ties its output layer to its embeddings
    save_model(tmp_path / "ckpt" / "tied", ft)
    cli.write("r.yaml", simple(ft="./ckpt/tied"))
    assert input_error(cli, tmp_path) == [
        "the inputs' tensors do not line up:",
        "tensor 'lm_head.weight' is missing from model 'ft' (present in 'base')",
        ("('lm_head.weight' in some models only: a model whose config ties its output layer to "
         "its input embeddings (tie_word_embeddings) stores none, and tvrecipe does not stand "
         "the embeddings in for it (mergekit does): save the tied model with its output layer "
         "written out, or merge only tied models)"),
        ("(merging needs the same tensors in every input: check that every model is a "
         "fine-tune of the same base)")]


@pytest.mark.parametrize("link_to, out, relation", [
    ("ckpt/base", "./link/merged", "is inside"),
    ("ckpt/ft", "./link", "is"),
    ("ckpt", "./link/base", "is"),
])
def test_output_inside_an_input_through_a_symlink(cli, tmp_path, link_to, out, relation):
    checkpoints(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / link_to, target_is_directory=True)
    before = snapshot(tmp_path / "ckpt")
    cli.write("r.yaml", simple(out=out))
    inp = {"ckpt/base": "base", "ckpt/ft": "ft", "ckpt": "base"}[link_to]
    for flags in ((), ("--force",)):  # (the links are followed when the recipe is read)
        res = cli.fails(2, "run", "r.yaml", *flags)
        assert res.err_lines[0] == "tvrecipe: recipe error:"
        assert res.err_lines[1].endswith(
            f"outputs.model.path: output path {out!r} {relation} the input {inp!r} "
            f"(./ckpt/{inp}); writing it could destroy the input (choose an output path "
            "outside every input)")
    assert snapshot(tmp_path / "ckpt") == before
    assert (tmp_path / "link").is_symlink()
    assert not (tmp_path / "r.yaml.lock").exists()


def test_inf_in_the_base_is_refused_unless_allowed(cli, tmp_path):
    base = base_weights(0)
    ft = finetune(base, 1)
    base["model.layers.0.mlp.up_proj.bias"][3] = float("-inf")
    save_model(tmp_path / "ckpt" / "base", base)
    save_model(tmp_path / "ckpt" / "ft", ft)
    cli.write("r.yaml", simple())
    assert input_error(cli, tmp_path) == [
        ("model 'base': tensor 'model.layers.0.mlp.up_proj.bias' contains NaN or Inf; fix the "
        "checkpoint, or pass --allow-nonfinite to merge it anyway")]
    cli.ok("run", "r.yaml", "--allow-nonfinite")
    with safe_open(str(tmp_path / "out" / "model" / "model.safetensors"), framework="pt") as h:
        bias = h.get_tensor("model.layers.0.mlp.up_proj.bias")
    # apply(base, ft - base) at an infinite base entry: inf + (x - inf) = NaN, as IEEE says.
    assert int((~torch.isfinite(bias)).sum()) == 1


def test_a_failed_write_stops_the_reads_ahead(cli, tmp_path, monkeypatch):
    # Inputs are read a few row blocks ahead on a thread. When a write fails, reads not yet
    # started must not run after the run has closed its inputs (they would reopen the files
    # and leak the handles); no read runs once the command has returned.
    import threading

    from tvrecipe.exec import results, runner
    from tvrecipe.plan.tensors import TensorPlan
    from tvrecipe.store.checkpoint import Checkpoint
    base = base_weights(0)
    for i, name in enumerate(("base", "a", "b")):
        save_model(tmp_path / "ckpt" / name, base if name == "base" else finetune(base, i))
    cli.write("r.yaml", "tvrecipe: 1\nmodels:\n  base: ./ckpt/base\n  a: ./ckpt/a\n"
                        "  b: ./ckpt/b\nsteps:\n  tv: {op: extract, base: base, finetuned: [a, b]}\n"
                        "  s: {op: sum, inputs: tv}\n  m: {op: apply, base: base, delta: s}\n"
                        "outputs:\n  m: {from: m, path: ./out}\n")
    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 8)  # many row blocks
    closed = threading.Event()
    reads, late = [], []
    real_get, real_close, real_write = Checkpoint.get, TensorPlan.close, results.Output.write

    def get(self, name, rows=None, **kw):
        time.sleep(0.01)  # slow reads: some are queued when the write fails
        reads.append(name)
        if closed.is_set():
            late.append((name, rows))
        return real_get(self, name, rows, **kw)

    def close(self):
        closed.set()
        return real_close(self)

    def write(self, tensor, info, value):
        if len(reads) > 12:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))
        return real_write(self, tensor, info, value)

    monkeypatch.setattr(Checkpoint, "get", get)
    monkeypatch.setattr(TensorPlan, "close", close)  # the run closing its inputs
    monkeypatch.setattr(results.Output, "write", write)
    cli.fails(4, "run", "r.yaml")
    assert closed.is_set()
    n = len(reads)
    time.sleep(0.2)
    assert len(reads) == n, "reads went on after the command returned"
    assert late == []
    nothing_written(tmp_path)


@pytest.mark.parametrize("where", ["before the lock", "after the lock"])
def test_a_run_killed_between_its_outputs_and_its_lock_is_undone_by_the_next(cli, tmp_path,
                                                                             where):
    # SIGKILL (or a power cut) once every output is in place: before the lock goes in, the
    # next run puts the previous outputs back (the lock describes them); after it, the new
    # outputs stay and their previous folders go. Either way outputs and lock agree again.
    before, lock = _run_two_outputs_then_edit(cli, tmp_path)
    edited = (tmp_path / "r.yaml").read_text()
    hook = ("lockfile.StagedLock.commit" if where == "before the lock"
            else "output.OutputFolder.finish")
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from tvrecipe.exec import lockfile\n"
        "from tvrecipe.store import output\n"
        f"{hook} = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from tvrecipe.cli import main\n"
        "sys.argv = ['tvrecipe', 'run', 'r.yaml', '--force', '-q']\n"
        "main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, timeout=300,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) != []  # (asides)
    new = {n: snapshot(out / n) for n in ("model", "vectors")}
    assert new != before  # (every output went in)
    if where == "before the lock":
        assert (tmp_path / "r.yaml.lock").read_bytes() == lock
        cli.write("r.yaml", FULL_RECIPE)  # (the recipe the lock and the previous outputs are of)
        res = cli.ok("run", "r.yaml")
        assert "up to date" in res.stdout, res.stdout
        assert {n: snapshot(out / n) for n in ("model", "vectors")} == before
        cli.write("r.yaml", edited)
    else:
        assert (tmp_path / "r.yaml.lock").read_bytes() != lock
        res = cli.ok("run", "r.yaml")
        assert "up to date" in res.stdout, res.stdout
        assert {n: snapshot(out / n) for n in ("model", "vectors")} == new
    assert sorted(p.name for p in out.iterdir()) == ["model", "vectors"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".r.yaml")) == []
    cli.ok("run", "r.yaml", "-q")
    cli.ok("verify", "r.yaml")
