"""Content hashes of files and models, memoised so unchanged files are read once."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tvrecipe.errors import InputError
from tvrecipe.store.remote import RemotePath, as_path

__all__ = ["FILE_MODE", "HashMemo", "checkpoint_digest", "sha256_file"]

CHUNK = 8 << 20
_MEMO_VERSION = 1


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# What open() would give a new file: 0644 under the usual umask, 0664 under a group's 002.
# Files made by mkstemp (private, 0600) are given it, so that a cache, memo or lock shared by
# a group is readable by the group. (Read once: os.umask is process-wide, not thread-safe.)
FILE_MODE = _umask_mode()


def _identity(st: os.stat_result | list) -> list:
    # A rewrite changes mtime or size; a replace-by-rename changes the inode. A remote file's
    # identity comes as a list already (RemotePath.identity: size, ETag, mtime, ...).
    if isinstance(st, list):
        return st
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class HashMemo:
    """Remembers file hashes in a small JSON file, keyed by resolved path (or URL).

    An entry is reused only while the file's size, mtime (ns) and inode are unchanged (for a
    URL: its size and what the storage reports that changes with the bytes, such as an ETag,
    a generation, a modification time or an ``hf://`` blob id). The
    file is read on first use and saved atomically after each new hash; a corrupt memo file
    is ignored (hashes are recomputed), and failing to save is not an error: the memo only
    saves time.

    Args:
        path: The JSON file, such as ``<cache>/hashes.json``; ``None`` keeps it in memory.
        reuse: False: every file is read and hashed again, and what is found is recorded
            (``verify --recompute``: an input edited in place with its size, mtime and inode
            kept is then seen by the commands after it too).
    """

    def __init__(self, path: Path | None, reuse: bool = True):
        self.path = Path(path) if path is not None else None
        self.reuse = reuse
        self._entries: dict[str, dict] | None = None
        self._forgotten: set[str] = set()  # (kept out of what another run saved, too)

    def _load_file(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _MEMO_VERSION:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {
            k: v
            for k, v in entries.items()
            if isinstance(v, dict)
            and isinstance(v.get("sha256"), str)
            and isinstance(v.get("id"), list)
        }

    def _loaded(self) -> dict[str, dict]:
        """The entries, read from the file on first use."""
        if self._entries is None:
            self._entries = self._load_file()
        return self._entries

    def get(self, key: str, st: os.stat_result | list) -> str | None:
        """The memoised digest of ``key`` if the file still has identity ``st``."""
        if not self.reuse:
            return None
        entry = self._loaded().get(key)
        if entry is not None and entry["id"] == _identity(st):
            return entry["sha256"]
        return None

    def put(self, key: str, st: os.stat_result | list, digest: str) -> None:
        """Records a digest and saves the memo file."""
        self.put_many([(key, st, digest)])

    def put_many(self, items: Sequence[tuple[str, os.stat_result | list, str]],
                 written: bool = False) -> None:
        """Records several (key, identity, digest) triples and saves the memo file once.
        ``written``: tvrecipe wrote these files (outputs), which :meth:`wrote` then says for
        as long as they keep that identity."""
        entries = self._loaded()
        for key, st, digest in items:
            entry = {"id": _identity(st), "sha256": digest}
            old = entries.get(key)
            if written or (old is not None and old.get("written") is True
                           and old["id"] == entry["id"] and old["sha256"] == digest):
                entry["written"] = True
            entries[key] = entry
        self._save()

    def forget_written(self, folder: str) -> None:
        """Drops the entries of files tvrecipe wrote under ``folder`` (an output about to be
        recorded anew: its previous files are gone)."""
        gone = self.written_under(folder)
        for key in gone:
            del self._entries[key]
        self._forgotten.update(gone)

    def written_under(self, folder: str) -> list[str]:
        """The files under ``folder`` that tvrecipe last wrote there, by key."""
        inside = folder.rstrip(os.sep) + os.sep
        return sorted(k for k, v in self._loaded().items()
                      if k.startswith(inside) and v.get("written") is True)

    def wrote(self, key: str, st: os.stat_result | list) -> bool:
        """Whether tvrecipe wrote the file ``key`` and it still has identity ``st`` (no one
        has changed it since)."""
        entry = self._loaded().get(key)
        return entry is not None and entry.get("written") is True \
            and entry["id"] == _identity(st)

    def _save(self) -> None:
        if self.path is None:
            return
        # Merge with what another run may have saved meanwhile, so neither loses entries.
        merged = {k: v for k, v in self._load_file().items() if k not in self._forgotten}
        merged.update(self._entries)
        text = json.dumps({"version": _MEMO_VERSION, "entries": merged}, sort_keys=True, indent=1)
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            if hasattr(os, "fchmod"):  # (mkstemp's 0600 would keep the memo from the group)
                os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException as exc:  # a Ctrl-C too must not leave the temp file behind
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            if not isinstance(exc, OSError):  # a memo that cannot be saved is only slower
                raise


def _hash_stream(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _sha256_remote(path: RemotePath, memo: HashMemo | None) -> str:
    """The SHA-256 of a remote file: the one its storage states (a Hugging Face LFS file),
    else streamed by ranged reads in large chunks, memoised by URL and identity (a file whose
    storage reports nothing that changes with its bytes is hashed every time)."""
    try:
        if (stated := path.stated_sha256()) is not None:
            return stated
        before = path.identity()
        if memo is not None and before is not None and (hit := memo.get(path.url, before)):
            return hit
        digest = hashlib.sha256()
        for chunk in path.iter_chunks(0, path.size()):
            digest.update(chunk)
        after = path.identity()
    except OSError as exc:
        raise InputError(f"cannot read {path} to hash it: {exc.strerror or exc}; check that it "
                         "exists and is readable") from exc
    if memo is not None and before is not None and before == after:
        memo.put(path.url, after, digest.hexdigest())
    return digest.hexdigest()


def sha256_file(path: Path | RemotePath, *, memo: HashMemo | None = None) -> str:
    """The hex SHA-256 of a file, streamed in 8 MiB chunks (a URL's in ranged reads of 16 MiB).

    Args:
        path: The file to hash.
        memo: Where to look up and record the digest; ``None`` always reads the file.

    Raises:
        InputError: The file is missing or unreadable, or its storage cannot be reached.
        MissingPackage: ``path`` is a URL whose scheme's fsspec implementation is not installed.
    """
    if isinstance(path, RemotePath):
        return _sha256_remote(path, memo)
    path = Path(path)
    try:
        resolved = path.resolve()
        before = resolved.stat()
        if memo is not None and (hit := memo.get(str(resolved), before)) is not None:
            return hit
        digest = _hash_stream(resolved)
        after = resolved.stat()
    except OSError as exc:
        raise InputError(
            f"cannot read {path} to hash it: {exc.strerror}; check that it exists and is readable"
        ) from exc
    # A file written while it was hashed gives a digest of neither version: do not keep it.
    if memo is not None and _identity(before) == _identity(after):
        memo.put(str(resolved), after, digest)
    return digest


def checkpoint_digest(files: Sequence[Path | RemotePath], *, memo: HashMemo | None = None
                      ) -> str:
    """One content hash of a model: SHA-256 over its sorted (file name, file SHA-256) pairs.

    File names, not paths, go in, so the same files hash the same in any folder, local or
    remote.

    Args:
        files: The model's weight files.
        memo: Passed to ``sha256_file``.

    Raises:
        InputError: A file is missing or unreadable.
    """
    paths = [as_path(f) for f in files]
    pairs = sorted((f.name, sha256_file(f, memo=memo)) for f in paths)
    digest = hashlib.sha256()
    for name, file_digest in pairs:
        digest.update(f"{name}\0{file_digest}\n".encode())
    return digest.hexdigest()
