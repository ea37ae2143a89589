"""Content-addressed cache of step results: one safetensors file per step key, checked on use."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tvrecipe.errors import InputError
from tvrecipe.store.checkpoint import Checkpoint, open_checkpoint
from tvrecipe.store.hashing import sha256_file
from tvrecipe.store.output import output_oserror
from tvrecipe.store.writer import SafetensorsStreamWriter, TensorSpec

SUFFIX = ".safetensors"
MANIFEST = ".json"


@dataclass(frozen=True)
class CacheEntry:
    """One stored result."""

    key: str
    path: Path
    size: int
    used: float  # last access (mtime, refreshed on every hit)


class PendingEntry:
    """A cache entry being written: temp files renamed into place by :meth:`commit`.

    An entry holds one file per slot (a vector, or one member or part of a set) and a JSON
    manifest with their checksums. The manifest lands last, so an entry whose manifest is
    missing (a run killed in between) is never trusted.
    """

    def __init__(self, cache: TensorCache, key: str, slots: Mapping[str, Sequence[TensorSpec]],
                 metadata: Mapping[str, str]):
        self.cache, self.key = cache, key
        self.tmp: dict[str, Path] = {}
        self.writers: dict[str, SafetensorsStreamWriter] = {}
        folder = cache.manifest(key).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for slot, specs in slots.items():
                # A unique temp name per writer: two runs writing one key never share a file.
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
                os.close(fd)
                self.tmp[slot] = Path(tmp)
                self.writers[slot] = SafetensorsStreamWriter(Path(tmp), specs, metadata)
        except OSError as exc:
            self.abort()
            raise output_oserror(exc, folder) from exc

    def write(self, slot: str, name: str, tensor) -> None:
        """Write the next tensor (or row block) of one slot."""
        self.writers[slot].write(name, tensor)

    def commit(self, info: Mapping[str, object]) -> None:
        """Close, checksum and move every slot file into place, then write the manifest."""
        digests = {}
        try:
            for slot, writer in self.writers.items():
                writer.close()
                digests[slot] = sha256_file(self.tmp[slot])
                os.replace(self.tmp[slot], self.cache.path(self.key, slot))
            manifest = self.cache.manifest(self.key)
            tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**info, "sha256": digests}, sort_keys=True))
            os.replace(tmp, manifest)
        except OSError as exc:
            self.abort()
            raise output_oserror(exc, self.cache.manifest(self.key)) from exc

    def abort(self) -> None:
        """Drop the partial files."""
        for writer in self.writers.values():
            with contextlib.suppress(OSError):
                writer.__exit__(OSError)  # closes the file without the completeness check
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


class TensorCache:
    """Step results stored by key under ``root/<2 hex>/``.

    Args:
        root: The cache folder (created on first write).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.warnings: list[str] = []

    def manifest(self, key: str) -> Path:
        """The manifest of ``key``: its presence marks a complete entry."""
        return self.root / key.rsplit("-", 1)[-1][:2] / f"{key}{MANIFEST}"

    def path(self, key: str, slot: str) -> Path:
        """The file of one slot of ``key``."""
        name = key if not slot else f"{key}~{slot}"
        return self.manifest(key).with_name(f"{name}{SUFFIX}")

    def lookup(self, key: str) -> tuple[dict, dict[str, Checkpoint]] | None:
        """The stored result of ``key`` (manifest, one checkpoint per slot), verified, or None.

        A corrupt or truncated entry is removed, recorded in :attr:`warnings`, and reported
        as a miss, so the step is recomputed.
        """
        manifest = self.manifest(key)
        if not manifest.is_file():
            return None
        try:
            info = json.loads(manifest.read_text())
            slots = {}
            for slot, digest in info["sha256"].items():
                path = self.path(key, slot)
                if sha256_file(path) != digest:
                    raise InputError(f"{path.name}: checksum mismatch")
                slots[slot] = open_checkpoint(path)
            os.utime(manifest)  # records use, for `cache gc --older-than`
            return info, slots
        except (OSError, ValueError, KeyError, InputError) as exc:
            self.warnings.append(f"cache entry {key} is corrupt ({exc}); recomputing it")
            self.remove(key)
            return None

    def remove(self, key: str) -> None:
        """Delete an entry (manifest first, so it is never half trusted)."""
        manifest = self.manifest(key)
        manifest.unlink(missing_ok=True)
        for p in manifest.parent.glob(f"{key}*{SUFFIX}"):
            p.unlink(missing_ok=True)

    def pending(self, key: str, slots: Mapping[str, Sequence[TensorSpec]],
                metadata: Mapping[str, str]) -> PendingEntry:
        """Start writing the entry of ``key``."""
        return PendingEntry(self, key, slots, metadata)

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, oldest use first."""
        out = []
        if not self.root.is_dir():
            return out
        for manifest in self.root.glob(f"*/*{MANIFEST}"):
            key = manifest.name[: -len(MANIFEST)]
            size = sum(p.stat().st_size for p in manifest.parent.glob(f"{key}*{SUFFIX}"))
            out.append(CacheEntry(key, manifest, size, manifest.stat().st_mtime))
        return sorted(out, key=lambda e: (e.used, e.key))

    def leftovers(self) -> list[Path]:
        """Temp files of runs that were killed, and slot files no manifest vouches for."""
        if not self.root.is_dir():
            return []
        tmp = list(self.root.glob("*/.*.tmp"))
        keys = {e.key for e in self.entries()}
        orphan = [p for p in self.root.glob(f"*/*{SUFFIX}")
                  if p.name[: -len(SUFFIX)].split("~")[0] not in keys]
        return sorted(tmp + orphan)

    def gc(self, older_than_s: float | None = None, *, min_age_s: float = 3600) -> list[Path]:
        """Remove leftovers older than ``min_age_s`` (a live run may own younger ones) and,
        with ``older_than_s``, entries unused for that long. Returns what was removed."""
        now = time.time()
        removed = []
        for p in self.leftovers():
            if now - p.stat().st_mtime >= min_age_s:
                p.unlink(missing_ok=True)
                removed.append(p)
        if older_than_s is not None:
            for e in self.entries():
                if now - e.used >= older_than_s:
                    self.remove(e.key)
                    removed.append(e.path)
        return removed

    def clear(self) -> None:
        """Remove the whole cache folder."""
        shutil.rmtree(self.root, ignore_errors=True)
