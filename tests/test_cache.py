"""The step-result cache: hits, invalidation, corruption, interruption and concurrency."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tests.conftest import snapshot
from tvrecipe.cli import main

RECIPE = """\
tvrecipe: 1
models:
  base: ./base
  a: ./a
  b: ./b
  c: ./c
steps:
  tv: {op: extract, base: base, finetuned: [a, b, c]}
  merged: {op: ties, inputs: tv, density: 0.5}
  model: {op: apply, base: base, delta: merged, scale: SCALE}
outputs:
  model: {from: model, path: ./out}
"""


def _make(tmp: Path, scale: float = 1.0, rows: int = 64) -> Path:
    gen = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b", "c"):
        (tmp / name).mkdir(exist_ok=True)
        save_file({f"w{i}": torch.randn(rows, 32, generator=gen) for i in range(6)}
                  | {"n": torch.randn(32, generator=gen)}, str(tmp / name / "model.safetensors"))
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE.replace("SCALE", str(scale)))
    return recipe


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _entries(tmp: Path) -> list[Path]:
    return sorted((tmp / ".tvrecipe" / "cache").glob("*/*.json"))


def test_changed_apply_scale_reuses_ties_and_matches_uncached(tmp_path):
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    assert len(_entries(tmp_path)) == 1  # the ties result
    recipe.write_text(RECIPE.replace("SCALE", "0.5"))
    res = _cli("run", str(recipe), "--force")
    assert res.exit_code == 0, res.output
    assert "from cache: merged" in res.output
    cached = (tmp_path / "out" / "model.safetensors").read_bytes()
    res = _cli("run", str(recipe), "--force", "--no-cache", "-q")
    assert res.exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == cached


def test_corrupt_entry_is_detected_warned_and_recomputed(tmp_path):
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    (entry,) = [p for p in (tmp_path / ".tvrecipe" / "cache").glob("*/*.safetensors")]
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0x40
    entry.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["run", str(recipe), "--force"])
    assert res.exit_code == 0
    assert "is corrupt" in res.output and "recomputing it" in res.output
    assert "from cache" not in res.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first


def test_entry_of_an_older_format_is_recomputed_quietly(tmp_path):
    # Format 3 manifests held CRC-32s: read with today's checksum they would all "mismatch".
    # They are misses instead: removed and written again, with no corruption warning.
    import json
    import zlib

    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    (manifest,) = _entries(tmp_path)
    info = json.loads(manifest.read_text())
    assert info["format"] == 4
    data = load_file(str(manifest.with_suffix(".safetensors")))
    info["format"] = 3
    info["tensors"] = {"": {n: f"{zlib.crc32(t.numpy().tobytes()):08x}"
                            for n, t in data.items()}}
    manifest.write_text(json.dumps(info))
    res = _cli("run", str(recipe), "--force")
    assert res.exit_code == 0, res.output
    assert "corrupt" not in res.output and "from cache" not in res.output
    assert json.loads(manifest.read_text())["format"] == 4  # replaced
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert "from cache: merged" in _cli("run", str(recipe), "--force").output


def test_truncated_entry_is_recomputed(tmp_path):
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    (entry,) = [p for p in (tmp_path / ".tvrecipe" / "cache").glob("*/*.safetensors")]
    entry.write_bytes(entry.read_bytes()[:-100])
    res = _cli("run", str(recipe), "--force")
    assert res.exit_code == 0 and "is corrupt" in res.output


def test_cache_commands(tmp_path):
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    res = _cli("cache", "ls", str(recipe))
    assert res.output.startswith("merged  ties-")  # (its steps' entries, by step name)
    assert _cli("cache", "ls", "--recipe", str(recipe)).output == res.output  # the old flag
    leftover = tmp_path / ".tvrecipe" / "cache" / "ab" / ".ties-x.123.tmp"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"partial")
    young = leftover.with_name(".ties-y.124.tmp")
    young.write_bytes(b"partial")
    assert _cli("cache", "gc", str(recipe)).output == (
        "removed 0 files; kept 2 leftover files under an hour old (a run may still be "
        "writing them: gc removes them once they are an hour old)\n")
    young.unlink()
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert "1 entry, " in _cli("cache", "du", str(recipe)).output
    assert "; 1 leftover file of interrupted runs" in _cli("cache", "du", str(recipe)).output
    assert _cli("cache", "gc", str(recipe)).output.strip() == "removed 1 file"
    assert not leftover.exists() and len(_entries(tmp_path)) == 1
    shards = list((tmp_path / ".tvrecipe" / "cache").iterdir())
    assert shards and all(any(d.iterdir()) for d in shards)  # (a folder gc emptied goes too)
    cache = tmp_path / ".tvrecipe" / "cache"
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    assert _cli("cache", "clear", "--cache-dir", str(cache)).output == (
        f"cleared {cache}: removed {len(files)} files\n")
    assert _entries(tmp_path) == [] and not cache.exists()
    assert _cli("cache", "ls", str(recipe)).output == f"cache is empty: {cache}\n"
    assert _cli("cache", "clear", str(recipe)).output == f"cache is empty: {cache}\n"
    assert _cli("cache", "gc", str(recipe)).output == "removed 0 files\n"


def _run_proc(recipe: Path, *extra: str) -> subprocess.Popen:
    # -v: an unexpected error shows its traceback in the test's failure.
    return subprocess.Popen([sys.executable, "-m", "tvrecipe.cli", "-v", "run", str(recipe),
                             "-q", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_concurrent_runs_agree(tmp_path):
    recipe = _make(tmp_path)
    other = tmp_path / "r2.yaml"
    other.write_text(RECIPE.replace("SCALE", "1.0").replace("./out", "./out2"))
    procs = [_run_proc(recipe), _run_proc(other)]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    a = load_file(str(tmp_path / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "out2" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(_entries(tmp_path)) == 1


def _kill_runs_then_finish(tmp_path: Path, recipe: Path, reference: Path, delay: float
                           ) -> None:
    """SIGINT, then SIGKILL, a run of ``recipe`` ``delay`` s after it starts writing; then run
    it to the end: no partial output at any point, and the final one equals ``reference``'s
    (run uncached)."""
    assert _cli("run", str(reference), "-q", "--no-cache").exit_code == 0
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    for sig in (signal.SIGINT, signal.SIGKILL):
        p = _run_proc(recipe, "--force")
        # Signal once the run is writing (its staging folder exists), not while the
        # interpreter still starts: a slow import would make the test about Python instead.
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.tmp*")) and p.poll() is None:
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(sig)
        _out, err = p.communicate(timeout=60)
        if sig == signal.SIGINT and p.returncode not in (0,):
            assert p.returncode == 130, err.decode()
        if sig == signal.SIGINT:  # cleaned up; after SIGKILL a staging folder may remain
            assert not list(tmp_path.glob(".out.tmp*"))
        # The signal may land before the output is committed (no output) or after it (while
        # the lock is written, or at exit): never a partial output either way.
        if (tmp_path / "out").exists():
            done = load_file(str(tmp_path / "out" / "model.safetensors"))
            assert done.keys() == ref.keys() and all(torch.equal(done[k], ref[k]) for k in ref)
            (tmp_path / "out").rename(tmp_path / f"done-{sig}-{time.monotonic_ns()}")
        else:
            assert p.returncode != 0
    assert _cli("run", str(recipe), "-q").exit_code == 0
    assert not list(tmp_path.glob(".out.tmp*"))  # the SIGKILLed run's staging folder was swept
    got_t = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(got_t[k], ref[k]) for k in ref)


def test_killed_run_leaves_no_output_and_next_run_is_identical(tmp_path):
    recipe = _make(tmp_path, rows=20000)  # big enough to be killed mid-way
    reference = tmp_path / "ref.yaml"
    reference.write_text(RECIPE.replace("SCALE", "1.0").replace("./out", "./ref"))
    _kill_runs_then_finish(tmp_path, recipe, reference, delay=0.2)


def test_killed_rerun_in_numpy_leaves_no_output_either(tmp_path):
    # After a change of the apply scale the rerun runs in numpy (exec/light.py): same rules.
    recipe = _make(tmp_path, rows=20000)
    assert _cli("run", str(recipe), "-q").exit_code == 0  # fills the cache
    shutil.rmtree(tmp_path / "out")
    recipe.write_text(RECIPE.replace("SCALE", "0.5"))
    reference = tmp_path / "ref.yaml"
    reference.write_text(RECIPE.replace("SCALE", "0.5").replace("./out", "./ref"))
    _kill_runs_then_finish(tmp_path, recipe, reference, delay=0.0)  # it writes for ~50 ms


def test_plan_marks_cached_and_computed_steps(tmp_path):
    recipe = _make(tmp_path)
    res = _cli("plan", str(recipe))
    assert "[compute] merged" in res.output and "a run computes 3 of 3 steps" in res.output
    _cli("run", str(recipe), "-q")
    recipe.write_text(RECIPE.replace("SCALE", "0.25"))
    res = _cli("plan", str(recipe))
    assert res.exit_code == 0, res.output
    assert "[skipped] tv" in res.output
    assert "[cached]  merged" in res.output
    assert "[compute] model" in res.output
    assert "a run computes 1 of 3 steps" in res.output


def test_corruption_in_a_row_block_is_caught_before_the_output_lands(tmp_path, monkeypatch):
    # Row-wise recipes stream big tensors in row blocks; the checksum of a cached tensor is
    # complete only at its last block, but the run must still be restarted without the entry
    # and give the uncached bytes.
    import tvrecipe.exec.runner as runner_module
    monkeypatch.setattr(runner_module, "CHUNK_ELEMENTS", 64)  # 2 rows of 32 per block
    recipe = _make(tmp_path)
    recipe.write_text(recipe.read_text().replace("{op: ties, inputs: tv, density: 0.5}",
                                                 "{op: sum, inputs: tv, weights: 0.5}"))
    assert _cli("run", str(recipe), "-q").exit_code == 0
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    (entry,) = (tmp_path / ".tvrecipe" / "cache").glob("*/*.safetensors")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside some tensor, away from its last row block
    entry.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["run", str(recipe), "--force"])
    assert res.exit_code == 0, res.output
    key = entry.name.removesuffix(".safetensors")
    warning = [ln for ln in res.output.splitlines() if "warning" in ln]
    assert len(warning) == 1 and warning[0].startswith(
        f"tvrecipe: warning: cache entry {key} is corrupt (tensor 'w")
    assert warning[0].endswith("' does not match its checksum); recomputing it")
    assert "from cache" not in res.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert len(_entries(tmp_path)) == 1  # written again, sound this time
    res = _cli("run", str(recipe), "--force")
    assert "from cache: merged" in res.output and "warning" not in res.output


def test_entry_check_blocks_must_come_in_order():
    import pytest
    import xxhash

    from tvrecipe.store.cache import CacheCorrupt, EntryCheck
    t = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    check = EntryCheck("sum-1", {"": {"w": xxhash.xxh3_64_hexdigest(t.numpy().tobytes())}})
    check("", "w", (0, 4), 6, t[:4])
    check("", "w", (4, 6), 6, t[4:])  # complete and matching
    check("", "w", None, 6, t)
    with pytest.raises(CacheCorrupt, match=r"^cache entry sum-1 is corrupt \(tensor 'w' was "
                                           r"read out of order\); recomputing it$"):
        check("", "w", (4, 6), 6, t[4:])
    with pytest.raises(CacheCorrupt, match="tensor 'w' does not match its checksum"):
        check("", "w", None, 6, t + 1)


def test_entry_of_a_run_that_allowed_nan_is_not_trusted_by_one_that_does_not(tmp_path):
    # Cached tensors are not checked for NaN/Inf on read: their inputs were, when they were
    # computed. So an entry computed with --allow-nonfinite must not serve a run without it,
    # which would otherwise write NaN without the error a cold run gives.
    recipe = _make(tmp_path)
    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    tensors["w2"][3, 4] = float("nan")
    save_file(tensors, str(tmp_path / "a" / "model.safetensors"))
    res = _cli("run", str(recipe), "-q")
    assert res.exit_code == 3
    assert "model 'a': tensor 'w2' contains NaN or Inf" in res.output
    assert _cli("run", str(recipe), "-q", "--allow-nonfinite").exit_code == 0
    assert len(_entries(tmp_path)) == 1
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    recipe.write_text(RECIPE.replace("SCALE", "0.5"))
    assert "[compute] merged" in _cli("plan", str(recipe)).output  # as a plain run sees it
    res = _cli("run", str(recipe), "--force")
    assert res.exit_code == 3, res.output
    assert "model 'a': tensor 'w2' contains NaN or Inf" in res.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # left as it was
    res = _cli("run", str(recipe), "--force", "--allow-nonfinite")
    assert res.exit_code == 0 and "from cache: merged" in res.output


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files via /proc")
def test_cache_files_skip_fsync_and_outputs_are_synced(tmp_path, monkeypatch):
    # A cache entry cut short by a crash fails its checksums and is recomputed, so it is not
    # synced; outputs are (releases must survive a crash once the run said it wrote them).
    from tvrecipe.store import writer
    synced = []
    real = os.fsync
    monkeypatch.setattr(writer.os, "fsync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                    real(fd))[1])
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    assert len(_entries(tmp_path)) == 1
    files = {Path(p).name for p in synced if p.endswith(".safetensors")}
    assert files == {"model.safetensors"}  # the output's file, still in its staging folder
    assert not any(".tvrecipe" in p for p in synced)


def test_cache_clear_removes_only_what_a_cache_writes(tmp_path):
    """Pointed at a folder that is not only a cache (a project's, by mistake), `cache clear`
    refuses and removes nothing; a cache's own entries and temp files go, then its folders."""
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q", "--cache-dir", str(tmp_path / "cc")).exit_code == 0
    entries = sorted((tmp_path / "cc").rglob("*"))
    assert entries
    for stray in (tmp_path / "cc" / "notes.txt", tmp_path / "cc" / entries[0].name / "x.py"):
        stray.write_text("mine")
        before = sorted((tmp_path / "cc").rglob("*"))
        res = _cli("cache", "clear", "--cache-dir", str(tmp_path / "cc"))
        assert res.exit_code == 4
        assert res.output.splitlines()[-1] == (
            f"  {tmp_path / 'cc'} is not only a tvrecipe cache: it holds {stray}, which no cache "
            "writes; nothing was removed. Point --cache-dir (or TVRECIPE_CACHE) at the cache "
            "folder itself, by default .tvrecipe/cache beside the recipe")
        assert sorted((tmp_path / "cc").rglob("*")) == before
        stray.unlink()
    # A project folder, or a model's, given as the cache: its files stay (gc's too, however
    # old they are), and nothing in them is listed as an entry.
    old = time.time() - 90 * 86400
    for f in (tmp_path / "c" / "model.safetensors", recipe):
        os.utime(f, (old, old))
    for folder in (tmp_path, tmp_path / "c"):
        for command in (("clear",), ("gc", "--older-than", "1s")):
            res = _cli("cache", *command, "--cache-dir", str(folder))
            assert res.exit_code == 4 and "nothing was removed" in res.output, command
        assert _cli("cache", "ls", "--cache-dir", str(folder)).output == (
            f"cache is empty: {folder}\n")
    assert (tmp_path / "c" / "model.safetensors").is_file() and recipe.is_file()
    res = _cli("cache", "clear", "--cache-dir", str(tmp_path / "cc"))
    assert res.exit_code == 0 and not (tmp_path / "cc").exists()
    assert _cli("cache", "clear", "--cache-dir", str(tmp_path / "cc")).output == (
        f"cache is empty: {tmp_path / 'cc'}\n")


@pytest.mark.parametrize("where", ["start", "write", "commit"])
def test_a_cache_that_cannot_be_written_costs_the_entry_not_the_run(tmp_path, monkeypatch,
                                                                   where):
    """A full or read-only cache: the run writes its outputs as without a cache, warns, and
    leaves no entry (and no temp file) behind; the next run fills the cache."""
    import errno

    import tvrecipe.store.cache as cache_mod
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q", "--no-cache").exit_code == 0
    want = load_file(str(tmp_path / "out" / "model.safetensors"))
    full = OSError(errno.ENOSPC, "No space left on device")

    def fail(*_args, **_kwargs):
        raise full

    # (the cache module's own os and tempfile: the lock and the outputs write as usual)
    if where == "start":
        monkeypatch.setattr(cache_mod, "tempfile", SimpleNamespace(mkstemp=fail))
    elif where == "write":
        class Full:  # the entry's file, on a disk that fills at tensor w3
            def __init__(self, f):
                self.f = f

            def write(self, _data):
                raise full

            def __getattr__(self, name):
                return getattr(self.f, name)

        class Failing(cache_mod.SafetensorsStreamWriter):
            def write(self, name, tensor):
                if name == "w3" and not isinstance(self._file, Full):
                    self._file = Full(self._file)
                super().write(name, tensor)

        monkeypatch.setattr(cache_mod, "SafetensorsStreamWriter", Failing)
    else:
        monkeypatch.setattr(cache_mod, "os", SimpleNamespace(**{**vars(os), "replace": fail}))
    res = _cli("run", str(recipe), "--force")
    assert res.exit_code == 0, res.output
    cache = tmp_path / ".tvrecipe" / "cache"
    assert "tvrecipe: warning: could not write the cache entry ties-" in res.output
    assert (f"in {cache} (No space left on device); the run goes on without caching it (a "
            "writable --cache-dir, or --no-cache, avoids this)") in res.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _entries(tmp_path) == []
    assert [p for p in cache.rglob("*.tmp")] == []
    monkeypatch.undo()
    os.chdir(tmp_path)
    assert _cli("run", str(recipe), "--force", "-q").exit_code == 0
    assert len(_entries(tmp_path)) == 1


def test_a_read_only_cache_serves_its_entries(tmp_path, monkeypatch):
    """A shared cache mounted read-only: its entries serve (their use is not recorded), and a
    new step's entry is a warning, not a failure."""
    import errno

    import tvrecipe.store.cache as cache_mod
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    want = load_file(str(tmp_path / "out" / "model.safetensors"))

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    fake_os = SimpleNamespace(**{**vars(os), "utime": read_only, "replace": read_only})
    monkeypatch.setattr(cache_mod, "os", fake_os)
    monkeypatch.setattr(cache_mod, "tempfile", SimpleNamespace(mkstemp=read_only))
    res = _cli("run", str(recipe), "--force")
    assert res.exit_code == 0, res.output
    assert "from cache: merged" in res.output and "warning" not in res.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    recipe.write_text(RECIPE.replace("SCALE", "1.0").replace("density: 0.5", "density: 0.4"))
    res = _cli("run", str(recipe))
    assert res.exit_code == 0, res.output
    assert "could not write the cache entry ties-" in res.output


def test_cache_clear_through_a_link_empties_the_cache_and_keeps_the_link(tmp_path):
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q", "--cache-dir", str(tmp_path / "real")).exit_code == 0
    (tmp_path / "link").symlink_to(tmp_path / "real")
    res = _cli("cache", "clear", "--cache-dir", str(tmp_path / "link"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "real").iterdir()) == []


def test_renamed_or_swapped_task_names_are_new_keys(tmp_path):
    """A task vector's name decides what bytes a run gives: a selection (tv.x), a random
    op's draws (seeded by member name), the files of a vectors output, a report's names.
    So extract's key covers the names: a rename or a swap of a mapping's names recomputes
    (a cached set under the old names raised KeyError; dare's cached masks were drawn for
    the old names; a swap reused a merge of the other task)."""
    _make(tmp_path)
    text = """\
tvrecipe: 1
models: {base: ./base, a: ./a, b: ./b, c: ./c}
steps:
  tv: {op: extract, base: base, finetuned: {X: a, Y: b, Z: c}}
  drop: {op: dare, input: tv, density: 0.5}
  merged: {op: sum, inputs: [drop.X, drop.Y], weights: [1.0, 0.25]}
  basis: {op: cluster_basis, inputs: tv, k: 2}
  comp: {op: compress_basis, inputs: tv, m: 2}
  back: {op: rebuild, basis: comp}
  model: {op: apply, base: base, delta: merged}
outputs:
  model: {from: model, path: ./out}
  drop: {from: drop, path: ./drop}
  basis: {from: basis, path: ./basis}
  back: {from: back, path: ./back}
"""
    recipe = tmp_path / "r.yaml"
    folders = ("out", "drop", "basis", "back")
    recipe.write_text(text)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    for edit in ({"X": "x", "Y": "y"},                      # a rename
                 {"X: a, Y: b": "X: b, Y: a"}):             # a swap of the names
        edited = text
        for old, new in edit.items():
            edited = edited.replace(old, new)
        recipe.write_text(edited)
        res = _cli("run", str(recipe), "--force")
        assert res.exit_code == 0, res.output
        assert "from cache:" not in res.output
        cached = [snapshot(tmp_path / f) for f in folders]
        fresh = _cli("run", str(recipe), "--force", "--no-cache")
        assert fresh.exit_code == 0, fresh.output
        assert [snapshot(tmp_path / f) for f in folders] == cached
        assert res.output.splitlines()[:-1] == fresh.output.splitlines()[:-1]  # the reports
        names = {"X": "x", "Y": "y"}.get if "X" in edit else (lambda k: k)
        assert sorted(snapshot(tmp_path / "drop")) == sorted(
            [f"{names('X')}.safetensors", f"{names('Y')}.safetensors", "Z.safetensors",
             "vectors.json"])
        recipe.write_text(text)  # (and back: the first run's entries serve again)
        again = _cli("run", str(recipe), "--force")
        assert "from cache: " in again.output


@pytest.mark.parametrize("settings", ["", "settings: {compute_dtype: float64}\n"])
def test_a_renamed_step_keeps_its_report_under_a_cache_hit_below_it(tmp_path, settings):
    """A cached step keeps the reports of the steps it was computed from; they come back
    under this recipe's names of those steps (found by key), not the names they had. (The
    apply over the cached sum runs in numpy at float32, in torch at float64.)"""
    _make(tmp_path)
    text = settings + """\
tvrecipe: 1
models: {base: ./base, a: ./a, b: ./b, c: ./c}
steps:
  tv: {op: extract, base: base, finetuned: [a, b, c]}
  parts: {op: decompose, inputs: tv, rank: 2}
  merged: {op: sum, inputs: [parts.unique.a, parts.shared]}
  model: {op: apply, base: base, delta: merged}
outputs:
  model: {from: model, path: ./out}
"""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    first = _cli("run", str(recipe), "--report", str(tmp_path / "first.json"))
    assert first.exit_code == 0, first.output
    recipe.write_text(text.replace("parts", "pp"))
    res = _cli("run", str(recipe), "--force", "--report", str(tmp_path / "second.json"))
    assert res.exit_code == 0, res.output
    assert "from cache: merged" in res.output
    import json
    first_report = json.loads((tmp_path / "first.json").read_text())
    second_report = json.loads((tmp_path / "second.json").read_text())
    assert "parts" not in second_report and second_report["pp"] == first_report["parts"]
    said = [ln for ln in first.output.splitlines() if ln.startswith("parts (decompose)")]
    assert said and [ln for ln in res.output.splitlines() if ln.startswith("pp (decompose)")] \
        == [ln.replace("parts", "pp", 1) for ln in said]


def test_a_renamed_step_listed_whole_is_a_new_key_where_it_names_members(tmp_path):
    """A step listed whole among a set-making step's inputs names an entry (compress_basis's
    tasks, rebuild's members): renaming it recomputes (it raised KeyError in rebuild)."""
    _make(tmp_path)
    text = """\
tvrecipe: 1
models: {base: ./base, a: ./a, b: ./b}
steps:
  one: {op: extract, base: base, finetuned: a}
  two: {op: extract, base: base, finetuned: b}
  comp: {op: compress_basis, inputs: [one, two], m: 1}
  back: {op: rebuild, basis: comp}
  total: {op: sum, inputs: [one, two]}
outputs:
  back: {from: back, path: ./back}
  total: {from: total, path: ./total}
"""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    recipe.write_text(text.replace("one", "uno"))
    res = _cli("run", str(recipe), "--force")
    assert res.exit_code == 0, res.output
    assert "from cache: total" in res.output  # (a sum names nothing after its inputs)
    assert "comp" not in res.output.split("from cache:")[-1]
    assert sorted(snapshot(tmp_path / "back")) == ["two.safetensors", "uno.safetensors",
                                                   "vectors.json"]


def test_cache_entries_and_the_hash_memo_take_the_umask_mode(tmp_path):
    """A cache (or project) shared by a group, umask 002: every file the cache and the hash
    memo write has the mode open() gives (0664 there, 0644 under 022), not mkstemp's private
    0600, which the other users could not read (the entry was taken for corrupt and replaced,
    the memo rehashed every input)."""
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    mask = os.umask(0)
    os.umask(mask)
    files = sorted((tmp_path / ".tvrecipe" / "cache").glob("*/*"))
    assert [p.suffix for p in files] == [".json", ".safetensors"]
    files.append(tmp_path / ".tvrecipe" / "hashes.json")
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o666 & ~mask) for p in files}


def test_a_cache_that_cannot_be_written_is_one_warning_per_run(tmp_path, monkeypatch):
    """Two steps whose entries cannot be written: one warning naming both, not one each."""
    import errno

    import tvrecipe.store.cache as cache_mod
    _make(tmp_path)
    recipe = tmp_path / "two.yaml"
    recipe.write_text(RECIPE.replace("SCALE", "1.0").replace(
        "  model:", "  m2: {op: ties, inputs: tv, density: 0.3}\n"
        "  both: {op: sum, inputs: [merged, m2]}\n  model:", 1).replace(
        "delta: merged", "delta: both"))

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod, "tempfile", SimpleNamespace(mkstemp=read_only))
    res = _cli("run", str(recipe))
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if "warning" in line]
    keys = re.findall(r"(?:ties|sum)-[0-9a-f]{16}", warnings[0]) if warnings else []
    cache = tmp_path / ".tvrecipe" / "cache"
    assert len(keys) == 3
    want = (f"tvrecipe: warning: could not write the cache entries {', '.join(keys)} in "
            f"{cache} (Read-only file system); the run goes on without caching them (a "
            "writable --cache-dir, or --no-cache, avoids this)")
    assert warnings == [want]


def test_a_run_report_is_written_when_the_run_is_up_to_date_too(tmp_path):
    """`run --report F` wrote nothing when there was nothing to do, leaving F missing (a
    pipeline's declared output) or stale from an earlier run; it says so now. A TIES
    recipe's steps report nothing: its report holds the status only."""
    import json
    recipe = _make(tmp_path)
    report = tmp_path / "run.json"
    assert _cli("run", str(recipe), "-q", "--report", str(report)).exit_code == 0
    assert report.read_text() == '{\n  "run:status": "ran"\n}\n'
    report.write_text('{"stale": true}')
    res = _cli("run", str(recipe), "--report", str(report))
    assert res.exit_code == 0, res.output
    assert res.output == ("outputs are up to date with the lock; nothing to do (--force "
                          "recomputes them)\n")
    assert json.loads(report.read_text()) == {"run:status": "up_to_date"}
    report.unlink()
    assert _cli("run", str(recipe), "-q", "--report", str(report)).exit_code == 0
    assert report.read_text() == '{\n  "run:status": "up_to_date"\n}\n'


def test_cache_ls_and_clear_with_a_recipe_keep_to_its_steps(tmp_path, monkeypatch):
    """A cache shared by two recipes (TVRECIPE_CACHE): `cache ls R` lists R's entries (the
    keys its steps have now) by step name, and `cache clear R` removes those only; without a
    recipe, both act on the whole cache, as before."""
    import time as time_mod
    recipe = _make(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace("density: 0.5", "density: 0.3")
                     .replace("path: ./out", "path: ./out3"))
    cache = tmp_path / "shared"
    monkeypatch.setenv("TVRECIPE_CACHE", str(cache))
    for r in (recipe, other):
        assert _cli("run", str(r), "-q").exit_code == 0
    key = _cli("cache", "ls", str(recipe)).output.split()[1]
    mine = cache / key.rsplit("-", 1)[1][:2] / f"{key}.json"
    theirs = [e for e in cache.glob("*/*.json") if e != mine]
    assert mine.is_file() and len(theirs) == 1
    size = sum(p.stat().st_size for p in mine.parent.glob(f"{mine.stem}*.safetensors"))
    when = time_mod.strftime("%Y-%m-%d %H:%M", time_mod.localtime(mine.stat().st_mtime))
    from tvrecipe.plan.summary import human
    assert _cli("cache", "ls", str(recipe)).output == (
        f"merged  {mine.stem:<34} {human(size):>10}  last used {when}\n")
    assert len(_cli("cache", "ls").output.splitlines()) == 2  # (the whole cache)
    res = _cli("cache", "clear", str(recipe))
    assert res.output == (f"removed the cache entries of {recipe} from {cache}: merged "
                          "(2 files)\n")
    assert not mine.exists() and [e for e in cache.glob("*/*.json")] == theirs
    assert _cli("cache", "ls", str(recipe)).output == (
        f"no step of {recipe} is cached in {cache} (`tvrecipe cache ls` without a recipe lists "
        "every entry)\n")
    assert _cli("cache", "clear", str(recipe)).output == (
        f"no step of {recipe} is cached in {cache}; nothing was removed\n")
    assert _cli("cache", "ls", str(other)).output.startswith("merged  ties-")
    assert _cli("cache", "clear").output.startswith(f"cleared {cache}: removed 2 files")


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: runs are not kept apart there")
def test_a_second_run_of_one_recipe_fails_at_once_naming_the_first(tmp_path):
    """Two runs of one recipe at once both computed, and the one that committed last failed
    with "exists; pass --force" (the wrong fix). Now each run (and verify --recompute) holds
    an exclusive lock on .tvrecipe/r.yaml.run.lock; another fails at once, exit 4, naming
    the holder (what it wrote there), and does nothing. The lock goes with the command."""
    import fcntl
    recipe = _make(tmp_path)
    path = tmp_path / ".tvrecipe" / "r.yaml.run.lock"
    path.parent.mkdir()
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"box 4242 2026-11-28T05:00:00 verify --recompute\n")
        for args in (("run",), ("verify", "--recompute")):
            res = CliRunner().invoke(main, [*args, str(recipe)])
            assert res.exit_code == 4, res.output
            assert res.stderr == (
                "tvrecipe: output error:\n  r.yaml is being run by another tvrecipe (`tvrecipe "
                "verify --recompute`, pid 4242 on box, since 2026-11-28T05:00:00); wait for it "
                f"to finish, then try again (nothing was done here; the lock is {path}, held "
                "while that process lives)\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".tvrecipe", "a", "b", "base",
                                                                "c", "r.yaml"]
        assert sorted(p.name for p in path.parent.iterdir()) == ["r.yaml.run.lock"]
    finally:
        os.close(fd)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    assert path.read_text().split(" ")[1:2] == [str(os.getpid())]
    assert path.read_text().endswith(" run\n")
    assert _cli("run", str(recipe), "--force", "-q").exit_code == 0  # (released at the end)
    assert _cli("verify", str(recipe), "--recompute").exit_code == 0
    other = tmp_path / "r2.yaml"  # another recipe of the folder is not held back
    other.write_text(recipe.read_text().replace("./out", "./out2"))
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _cli("run", str(other), "-q").exit_code == 0
    finally:
        os.close(fd)
