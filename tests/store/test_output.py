"""Tests for atomic output folders, auxiliary file copying and OSError reporting."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch

from tvrecipe.errors import InputError, OutputError
from tvrecipe.store import output
from tvrecipe.store.output import OutputFolder, copy_aux_files, output_oserror, plan_aux_files
from tvrecipe.store.writer import SafetensorsStreamWriter, TensorSpec


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_commit_renames_staging_into_place(tmp_path):
    target = tmp_path / "out"
    folder = OutputFolder(target)
    assert folder.staging.parent == tmp_path and folder.staging.name.startswith(".out.tmp-")
    assert not target.exists()
    (folder.staging / "a.txt").write_text("hello")
    assert folder.commit() == target
    assert (target / "a.txt").read_text() == "hello"
    assert leftovers(tmp_path) == [] and not folder.staging.exists()
    folder.abort()  # after commit: a no-op
    assert (target / "a.txt").exists()
    # Not the 0700 of mkdtemp: the usual permissions for a new folder.
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask


def test_existing_target_refused_without_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("x")
    with pytest.raises(
        OutputError, match=exact(f"output {target} exists; pass --force to replace it")
    ):
        OutputFolder(target)
    assert leftovers(tmp_path) == []
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(OutputError, match="exists; pass --force"):
        OutputFolder(tmp_path / "link")  # (a dangling link is no empty folder)


def test_an_empty_folder_is_replaced_without_force(tmp_path):
    # Nothing to lose: a checkout's `mkdir -p out/model` before its first run.
    target = tmp_path / "out"
    target.mkdir()
    folder = OutputFolder(target)
    (folder.staging / "w.txt").write_text("new")
    assert folder.commit() == target
    assert (target / "w.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_and_removes_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with OutputFolder(target, force=True) as folder:
        (folder.staging / "new.txt").write_text("new")
        folder.commit()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_failed_rename_keeps_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    folder = OutputFolder(target, force=True)
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src) == folder.staging:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_rename(src, dst)

    monkeypatch.setattr(output.os, "rename", failing_rename)
    msg = (
        f"cannot write {target}: {os.strerror(errno.ENOSPC)}; free space on that disk or "
        "write the output elsewhere"
    )
    with pytest.raises(OutputError, match=exact(msg)):
        folder.commit()
    assert (target / "old.txt").read_text() == "old"
    folder.abort()
    assert leftovers(tmp_path) == []


def test_abort_leaves_nothing_and_is_idempotent(tmp_path):
    with OutputFolder(tmp_path / "out") as folder:
        (folder.staging / "part.safetensors").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    folder.abort()
    folder.abort()


def test_exception_in_block_aborts(tmp_path):
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "out") as folder:
        (folder.staging / "f").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("rel", "relation"), [("model/sub", "is inside"), ("model", "is"), (".", "contains")]
)
def test_overlap_with_input_refused(tmp_path, rel, relation):
    model = tmp_path / "model"
    model.mkdir()
    target = tmp_path / rel
    msg = (
        f"output {target} {relation} the input {model}; writing it could destroy the input: "
        "choose an output path outside every input"
    )
    with pytest.raises(OutputError, match=exact(msg)):
        OutputFolder(target, force=True, protected=[model])


def test_overlap_through_symlink_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    target = tmp_path / "link" / "out"
    with pytest.raises(OutputError, match="is inside the input"):
        OutputFolder(target, protected=[model])
    # The input named through a link protects its real folder too.
    with pytest.raises(OutputError, match="is inside the input"):
        OutputFolder(model / "out", protected=[tmp_path / "link"])


def test_unwritable_parent(tmp_path, monkeypatch):
    def denied(parent, name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(output, "_make_staging", denied)
    msg = (
        f"cannot write {tmp_path}: {os.strerror(errno.EACCES)}; check the permissions of "
        f"{tmp_path} or write the output elsewhere"
    )
    with pytest.raises(OutputError, match=exact(msg)):
        OutputFolder(tmp_path / "out")


def test_output_oserror_other():
    err = output_oserror(OSError(errno.ENAMETOOLONG, "File name too long"), Path("/x/y"))
    assert str(err) == "cannot write /x/y: File name too long; check the output path"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("n", [4, 1 << 20])  # flushed at close; written past the buffer
def test_disk_full_while_writing(n):
    msg = (
        f"cannot write /dev/full: {os.strerror(errno.ENOSPC)}; "
        "free space on that disk or write the output elsewhere"
    )
    specs = [TensorSpec("a", "F32", (n,))]
    with (
        pytest.raises(OutputError, match=exact(msg)),
        SafetensorsStreamWriter(Path("/dev/full"), specs) as w,
    ):
        w.write("a", torch.zeros(n))


def make_model_folder(root: Path) -> Path:
    src = root / "model"
    src.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "spm.model",
    ):
        (src / name).write_text(name)
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "x.gguf",
        "model.onnx",
        "model.onnx_data",
        "64.tflite",
        "rust_model.ot",
        "flax_model.msgpack",
    ):
        (src / name).write_text("weights")
    for name in ("README.md", "tvrecipe.yaml", "tvrecipe.lock"):  # (the model's own card)
        (src / name).write_text("---\nlicense: mit\n---\n")
    (src / "modeling_custom.py").write_text("import os")
    (src / ".gitattributes").write_text("lfs")
    (src / "subdir").mkdir()
    (root / "secret.txt").write_text("outside")
    (src / "leak.txt").symlink_to(root / "secret.txt")
    (src / "inner.json").symlink_to(src / "config.json")
    return src


def test_copy_aux_files(tmp_path):
    src = make_model_folder(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    copied = copy_aux_files(src, dest)
    assert copied == [
        "config.json", "inner.json", "spm.model", "tokenizer.json", "tokenizer_config.json",
        "vocab.txt",
    ]  # fmt: skip
    assert sorted(p.name for p in dest.iterdir()) == copied
    assert (dest / "inner.json").read_text() == "config.json"
    assert not (dest / "inner.json").is_symlink()
    plan = plan_aux_files(src)
    other = "weights of model in another format, not the merged ones"
    card = "describes model, not this output"
    assert plan.skipped == {
        "leak.txt": f"symlink to {tmp_path / 'secret.txt'}, outside {src}",
        "modeling_custom.py": "code: copy it yourself if you trust it",
        "subdir/": "a folder: copy it yourself if the model needs it",
        **dict.fromkeys(["pytorch_model.bin", "x.gguf", "model.onnx", "model.onnx_data",
                         "64.tflite", "rust_model.ot", "flax_model.msgpack"], other),
        **dict.fromkeys(["README.md", "tvrecipe.yaml", "tvrecipe.lock"], card),
    }


def test_copy_aux_files_hf_cache_links(tmp_path):
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "deadbeef").write_text("{}")
    (snap / "config.json").symlink_to(Path("../../blobs/deadbeef"))
    assert plan_aux_files(snap).copy == ["config.json"]


def test_copy_aux_files_source_not_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    msg = (
        f"{path}: not a folder; copy_files_from must name a model folder "
        "(the one holding config.json)"
    )
    with pytest.raises(InputError, match=exact(msg)):
        copy_aux_files(path, tmp_path)


def _dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this id (until the system reuses it)


def test_new_run_sweeps_staging_of_dead_runs_only(tmp_path):
    # A SIGKILLed run cannot clean up; the next run for the same output removes its folder.
    dead = tmp_path / f"{output.staging_prefix('out', _dead_pid())}abcd"
    live = tmp_path / f"{output.staging_prefix('out', os.getppid())}abcd"
    other = tmp_path / f"{output.staging_prefix('other', _dead_pid())}abcd"
    for p in (dead, live, other):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    folder = OutputFolder(tmp_path / "out")
    assert not dead.exists()
    assert live.exists() and other.exists()  # a live run's folder, another output's folder
    folder.abort()


def test_new_run_sweeps_previous_outputs_moved_aside_by_dead_runs(tmp_path):
    # A run SIGKILLed while replacing an output leaves the previous one moved aside (a full
    # copy): after the swap, the next run removes it; between the two renames (no output in
    # place), it goes back in place first, as the lock still describes it.
    def aside(name: str, pid: int) -> Path:
        path = tmp_path / f"{output._aside_prefix(name, pid)}abcd"
        (path / name).mkdir(parents=True)
        (path / name / "model.safetensors").write_bytes(b"previous " + name.encode())
        return path

    done, mid, live = aside("done", _dead_pid()), aside("mid", _dead_pid()), aside("done", os.getppid())
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model.safetensors").write_bytes(b"new")
    OutputFolder(tmp_path / "done", force=True).abort()
    assert not done.exists() and live.exists()  # (a live run's is its own business)
    assert (tmp_path / "done" / "model.safetensors").read_bytes() == b"new"
    with pytest.raises(OutputError, match="exists; pass --force"):  # the previous one is back
        OutputFolder(tmp_path / "mid")
    assert not mid.exists()
    assert (tmp_path / "mid" / "model.safetensors").read_bytes() == b"previous mid"


def test_abort_all_removes_uncommitted_staging(tmp_path):
    a, b = OutputFolder(tmp_path / "a"), OutputFolder(tmp_path / "b")
    b.commit()
    OutputFolder.abort_all()
    assert not a.staging.exists() and (tmp_path / "b").is_dir()
    assert leftovers(tmp_path) == []


def test_a_staged_lock_of_a_dead_run_is_removed_by_the_next_lock(tmp_path):
    # A run SIGKILLed between writing its lock beside the lock file and renaming it leaves
    # that file: the next lock written there removes it (a live run's stays).
    from tvrecipe.store.lock import write_lock_temp

    lock = tmp_path / "r.yaml.lock"
    dead = tmp_path / f"{output.staging_prefix(lock.name, _dead_pid())}abcd.tmp"
    live = tmp_path / f"{output.staging_prefix(lock.name, os.getppid())}abcd.tmp"
    for path in (dead, live):
        path.write_text("lock_version: 1\n")
    tmp = write_lock_temp(lock, {"steps": {}})
    assert tmp.name.startswith(output.staging_prefix(lock.name))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, tmp.name])
    assert tmp.read_text() == "lock_version: 1\nsteps: {}\n"


def test_a_copied_config_is_fixed_in_its_sub_configs_too(tmp_path):
    # A composite model (text + vision) loads each part with its sub-config's dtype: each says
    # the output's; a local _name_or_path goes at every level, a Hub id stays.
    import json

    from tvrecipe.store.output import fix_copied_config
    config = {"model_type": "llava", "torch_dtype": "float32", "_name_or_path": "/home/a/x",
              "text_config": {"torch_dtype": "float32", "_name_or_path": "./ckpt/text",
                              "hidden_size": 8},
              "vision_config": {"dtype": "float16", "_name_or_path": "org/vision"},
              "layers": [{"torch_dtype": "float32"}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    fix_copied_config(tmp_path, "bfloat16")
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "llava", "torch_dtype": "bfloat16",
        "text_config": {"torch_dtype": "bfloat16", "hidden_size": 8},
        "vision_config": {"dtype": "bfloat16", "_name_or_path": "org/vision"},
        "layers": [{"torch_dtype": "float32"}]}  # (not a sub-config: as it was)
    before = (tmp_path / "config.json").read_bytes()
    fix_copied_config(tmp_path, "bfloat16")  # (nothing to fix: not rewritten)
    fix_copied_config(tmp_path, None)
    assert (tmp_path / "config.json").read_bytes() == before
