"""Tests for file and model content hashes and the hash memo."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from tvrecipe.errors import InputError
from tvrecipe.store import hashing
from tvrecipe.store.hashing import HashMemo, checkpoint_digest, sha256_file


@pytest.fixture
def reads(monkeypatch):
    """Counts how many times a file's bytes are actually read."""
    calls: list[str] = []
    real = hashing._hash_stream

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(hashing, "_hash_stream", counting)
    return calls


def test_sha256_matches_hashlib_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "CHUNK", 7)
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_memo_reuses_across_instances(tmp_path, reads):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    memo_file = tmp_path / "cache" / "hashes.json"
    first = sha256_file(path, memo=HashMemo(memo_file))
    assert reads == ["f.bin"]
    assert sha256_file(path, memo=HashMemo(memo_file)) == first
    assert reads == ["f.bin"]
    saved = json.loads(memo_file.read_text())
    assert saved["version"] == 1 and saved["entries"][str(path.resolve())]["sha256"] == first


def test_memo_invalidated_on_change(tmp_path, reads):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    memo = HashMemo(tmp_path / "hashes.json")
    sha256_file(path, memo=memo)
    path.write_bytes(b"abd")  # same size: caught by mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(path, memo=memo) == hashlib.sha256(b"abd").hexdigest()
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"xyz")
    os.replace(replacement, path)  # new inode
    assert (
        sha256_file(path, memo=HashMemo(tmp_path / "hashes.json"))
        == hashlib.sha256(b"xyz").hexdigest()
    )
    assert reads == ["f.bin", "f.bin", "f.bin"]


def test_memo_in_memory(tmp_path, reads):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    memo = HashMemo(None)
    sha256_file(path, memo=memo)
    sha256_file(path, memo=memo)
    assert reads == ["f.bin"]


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"version": 99, "entries": {}}', "[]", '{"version": 1, "entries": {"x": 3}}'],
)
def test_corrupt_memo_ignored_and_rewritten(tmp_path, reads, content):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    memo_file = tmp_path / "hashes.json"
    memo_file.write_text(content)
    assert sha256_file(path, memo=HashMemo(memo_file)) == hashlib.sha256(b"abc").hexdigest()
    assert reads == ["f.bin"]
    assert json.loads(memo_file.read_text())["version"] == 1


def test_memo_merges_concurrent_saves(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    memo_file = tmp_path / "hashes.json"
    m1, m2 = HashMemo(memo_file), HashMemo(memo_file)
    sha256_file(a, memo=m1)
    sha256_file(b, memo=m2)
    entries = json.loads(memo_file.read_text())["entries"]
    assert sorted(entries) == sorted([str(a.resolve()), str(b.resolve())])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_file(tmp_path):
    path = tmp_path / "gone.safetensors"
    msg = (
        f"cannot read {path} to hash it: No such file or directory; "
        "check that it exists and is readable"
    )
    with pytest.raises(InputError, match="^" + re.escape(msg) + "$"):
        sha256_file(path)


def test_checkpoint_digest_order_and_location_independent(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model-1.safetensors").write_bytes(b"one")
        (tmp_path / folder / "model-2.safetensors").write_bytes(b"two")
    x = [tmp_path / "x" / "model-1.safetensors", tmp_path / "x" / "model-2.safetensors"]
    y = [tmp_path / "y" / "model-2.safetensors", tmp_path / "y" / "model-1.safetensors"]
    digest = checkpoint_digest(x)
    assert digest == checkpoint_digest(y)
    h1, h2 = (hashlib.sha256(d).hexdigest() for d in (b"one", b"two"))
    expected = hashlib.sha256(f"model-1.safetensors\0{h1}\nmodel-2.safetensors\0{h2}\n".encode())
    assert digest == expected.hexdigest()
    (tmp_path / "y" / "model-2.safetensors").write_bytes(b"TWO")
    assert checkpoint_digest(y) != digest


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_memo_save_that_fails_or_is_interrupted_leaves_no_temp_file(tmp_path, monkeypatch,
                                                                      error):
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights")

    def replace(*_args):
        raise error

    monkeypatch.setattr(hashing.os, "replace", replace)
    if isinstance(error, OSError):  # not saved: the memo only saves time
        assert sha256_file(path, memo=HashMemo(tmp_path / "memo" / "hashes.json"))
    else:  # a Ctrl-C goes on up
        with pytest.raises(KeyboardInterrupt):
            sha256_file(path, memo=HashMemo(tmp_path / "memo" / "hashes.json"))
    assert list((tmp_path / "memo").iterdir()) == []
