"""Content-addressed cache of step results: one safetensors file per step key, checked on use."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tvrecipe.errors import InputError, OutputError
from tvrecipe.store.checkpoint import Checkpoint, open_checkpoint
from tvrecipe.store.hashing import FILE_MODE
from tvrecipe.store.output import output_oserror
from tvrecipe.store.writer import SafetensorsStreamWriter, TensorSpec, tensor_digest, tensor_hasher

SUFFIX = ".safetensors"
MANIFEST = ".json"
FORMAT = 4  # manifests of another format are misses (written by another tvrecipe version)
_SHARD = re.compile(r"[0-9a-f]{2}")  # an entry's folder: its key's first two hex digits


def _os_error(exc: OSError | OutputError) -> OSError:
    """The OSError behind a write failure (the stream writer wraps it in an OutputError);
    an OutputError from anything else is not a disk's refusal: raised again."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc.__cause__, OSError):
        return exc.__cause__
    raise exc


def _written_here(name: str) -> bool:
    """Whether a file of this name in a shard folder is one a cache writes."""
    return (name.endswith((SUFFIX, MANIFEST)) and not name.startswith(".")) or (
        name.startswith(".") and name.endswith(".tmp"))


class CacheCorrupt(Exception):
    """A cached tensor did not match its checksum while it was read (caught by the runner)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"cache entry {key} is corrupt ({reason}); recomputing it")
        self.key, self.reason = key, reason


class EntryCheck:
    """Checks the tensors of a cache entry against their checksums as they are read.

    Verifying on read, rather than hashing every file before use, costs no extra pass over
    the entry and runs on the reading thread, beside the compute. A tensor read in row blocks
    is checked when its last block arrives; blocks must come in order. A mismatch raises
    :class:`CacheCorrupt` before any output is committed, so nothing built from a bad entry
    is kept.

    Args:
        key: The entry's key.
        digests: Slot -> tensor name -> hex digest of its data bytes (from the manifest;
            see :func:`tvrecipe.store.writer.tensor_hasher`).
    """

    def __init__(self, key: str, digests: Mapping[str, Mapping[str, str]]):
        self.key, self.digests = key, digests
        self._partial: dict[tuple[str, str], tuple[object, int]] = {}

    def __call__(self, slot: str, name: str, rows: tuple[int, int] | None, total_rows: int,
                 data) -> None:
        """Feed the raw tensor (or rows ``rows`` of it) just read; raise on a mismatch."""
        start, stop = (0, total_rows) if rows is None else rows
        if start == 0:
            hasher = tensor_hasher()
        else:
            hasher, expected = self._partial.pop((slot, name), (None, -1))
            if expected != start:
                raise CacheCorrupt(self.key, f"tensor {name!r} was read out of order")
        if hasattr(data, "numel"):  # a torch tensor; the numpy executor reads arrays
            import torch
            if data.numel():
                hasher.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        elif data.size:
            hasher.update(memoryview(data.reshape(-1).view("u1")))
        if stop < total_rows:
            self._partial[(slot, name)] = (hasher, stop)
        elif tensor_digest(hasher) != self.digests.get(slot, {}).get(name):
            where = f"slot {slot!r} " if slot else ""
            raise CacheCorrupt(self.key, f"{where}tensor {name!r} does not match its checksum")


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
        self.failed = False
        folder = cache.manifest(key).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for slot, specs in slots.items():
                # A unique temp name per writer: two runs writing one key never share a file.
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
                try:
                    if hasattr(os, "fchmod"):  # the umask's mode, not mkstemp's private 0600:
                        os.fchmod(fd, FILE_MODE)  # a cache shared by a group serves it
                finally:
                    os.close(fd)
                self.tmp[slot] = Path(tmp)
                # No fsync: an entry cut short by a crash fails its checksums and is recomputed.
                self.writers[slot] = SafetensorsStreamWriter(Path(tmp), specs, metadata,
                                                             digest="tensors", durable=False)
        except (OSError, OutputError) as exc:
            self._fail(_os_error(exc))
        except BaseException:  # Ctrl-C while opening: no caller holds this entry to abort it
            self.abort()
            raise

    def _fail(self, exc: OSError) -> None:
        """A cache that cannot be written (read-only, full) costs the entry, not the run: the
        partial files go, later writes are skipped, and the run's warnings say so."""
        self.abort()
        self.failed = True
        self.cache.unwritable(self.key, exc.strerror or str(exc))

    def write(self, slot: str, name: str, tensor) -> None:
        """Write the next tensor (or row block) of one slot."""
        if self.failed:
            return
        try:
            self.writers[slot].write(name, tensor)
        except (OSError, OutputError) as exc:
            self._fail(_os_error(exc))

    def commit(self, info: Mapping[str, object]) -> None:
        """Close and move every slot file into place, then write the manifest.

        The manifest holds each tensor's checksum, taken as it was written.
        """
        if self.failed:
            return
        digests = {}
        try:
            for slot, writer in self.writers.items():
                writer.close()
                digests[slot] = writer.tensor_digests
                os.replace(self.tmp[slot], self.cache.path(self.key, slot))
            manifest = self.cache.manifest(self.key)
            tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps({**info, "format": FORMAT, "tensors": digests},
                                          sort_keys=True))
                os.replace(tmp, manifest)
            finally:
                tmp.unlink(missing_ok=True)
        except (OSError, OutputError) as exc:
            # (slot files already moved into place, without a manifest, are leftovers that
            # no run trusts: `cache gc` removes them)
            self._fail(_os_error(exc))

    def abort(self) -> None:
        """Drop the partial files."""
        for writer in self.writers.values():
            with contextlib.suppress(OSError):
                writer.__exit__(OSError)  # closes the file without the completeness check
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


def _serves(manifest: Mapping, allow_nonfinite: bool) -> bool:
    """Whether an entry may serve a run: one computed while NaN/Inf inputs were allowed
    serves only runs that allow them too."""
    return allow_nonfinite or not manifest.get("allow_nonfinite", True)


class TensorCache:
    """Step results stored by key under ``root/<2 hex>/``.

    Args:
        root: The cache folder (created on first write).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.warnings: list[str] = []
        self._unwritable: dict[str, tuple[int, list[str]]] = {}  # reason -> (warning, keys)

    def unwritable(self, key: str, reason: str) -> None:
        """Record in :attr:`warnings` that the entry ``key`` could not be written: one
        warning per reason, naming every entry it cost (not one per entry, or per try)."""
        index, keys = self._unwritable.setdefault(reason, (len(self.warnings), []))
        if index == len(self.warnings):
            self.warnings.append("")
        if key not in keys:
            keys.append(key)
        what = (f"the cache entry {keys[0]}" if len(keys) == 1
                else f"the cache entries {', '.join(keys)}")
        self.warnings[index] = (
            f"could not write {what} in {self.root} ({reason}); the run goes on without "
            f"caching {'it' if len(keys) == 1 else 'them'} (a writable --cache-dir, or "
            "--no-cache, avoids this)")

    def manifest(self, key: str) -> Path:
        """The manifest of ``key``: its presence marks a complete entry."""
        return self.root / key.rsplit("-", 1)[-1][:2] / f"{key}{MANIFEST}"

    def path(self, key: str, slot: str) -> Path:
        """The file of one slot of ``key``."""
        name = key if not slot else f"{key}~{slot}"
        return self.manifest(key).with_name(f"{name}{SUFFIX}")

    def usable(self, key: str, allow_nonfinite: bool = False) -> bool:
        """Whether :meth:`lookup` would find ``key`` (from its manifest alone: tensors are
        checked when read)."""
        try:
            info = json.loads(self.manifest(key).read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(info, dict) and info.get("format") == FORMAT
                and _serves(info, allow_nonfinite))

    def lookup(self, key: str, allow_nonfinite: bool = False
               ) -> tuple[dict, dict[str, Checkpoint], EntryCheck] | None:
        """The stored result of ``key``: (manifest, one checkpoint per slot, the check to run
        on every tensor read from them), or None.

        An entry computed by a run that allowed NaN or Inf in its inputs is a miss for a run
        that does not (which then checks those inputs itself); entries are not checked for
        non-finite values on read.

        Headers and sizes are checked here; a corrupt or truncated entry is removed, recorded
        in :attr:`warnings`, and reported as a miss, so the step is recomputed. Tensor bytes
        are checked as they are read (see :class:`EntryCheck`).
        """
        manifest = self.manifest(key)
        if not manifest.is_file():
            return None
        slots: dict[str, Checkpoint] = {}
        try:
            info = json.loads(manifest.read_text())
            if info.get("format") != FORMAT:
                self.remove(key)  # another version's entry: recompute and replace it quietly
                return None
            if not _serves(info, allow_nonfinite):
                return None
            for slot, digests in info["tensors"].items():
                path = self.path(key, slot)
                slots[slot] = ck = open_checkpoint(path)
                if set(ck.tensors) != set(digests):
                    raise InputError(f"{path.name}: its tensors differ from the manifest's")
            with contextlib.suppress(OSError):  # (a read-only cache: its entries still serve)
                os.utime(manifest)  # records use, for `cache gc --older-than`
            return info, slots, EntryCheck(key, info["tensors"])
        except (OSError, ValueError, KeyError, AttributeError, InputError) as exc:
            for ck in slots.values():
                ck.close()
            self.discard(key, f"cache entry {key} is corrupt ({exc}); recomputing it")
            return None

    def discard(self, key: str, warning: str) -> None:
        """Remove a bad entry and record why in :attr:`warnings` (a read-only cache keeps it:
        it is recomputed all the same)."""
        self.warnings.append(warning)
        with contextlib.suppress(OSError):
            self.remove(key)

    def remove(self, key: str) -> None:
        """Delete an entry (manifest first, so it is never half trusted)."""
        manifest = self.manifest(key)
        manifest.unlink(missing_ok=True)
        for p in manifest.parent.glob(f"{key}*{SUFFIX}"):
            p.unlink(missing_ok=True)

    def remove_entry(self, key: str) -> int:
        """Delete one entry (as :meth:`remove`), then its shard folder if that is left empty;
        the number of files removed. OutputError when one cannot be."""
        manifest = self.manifest(key)
        files = [manifest, *manifest.parent.glob(f"{key}*{SUFFIX}")]
        try:
            removed = sum(p.is_file() for p in files)
            self.remove(key)
        except OSError as exc:
            raise output_oserror(exc, Path(exc.filename or self.root), folder=self.root
                                 ) from exc
        with contextlib.suppress(OSError):  # (not empty: kept)
            manifest.parent.rmdir()
        return removed

    def pending(self, key: str, slots: Mapping[str, Sequence[TensorSpec]],
                metadata: Mapping[str, str]) -> PendingEntry:
        """Start writing the entry of ``key``."""
        return PendingEntry(self, key, slots, metadata)

    def _shards(self) -> list[Path]:
        """The entries' folders (two hex digits each)."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir()
                if _SHARD.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, oldest use first."""
        out = []
        for manifest in (m for shard in self._shards() for m in shard.glob(f"*{MANIFEST}")):
            if manifest.name.startswith("."):
                continue
            key = manifest.name[: -len(MANIFEST)]
            size = sum(p.stat().st_size for p in manifest.parent.glob(f"{key}*{SUFFIX}"))
            out.append(CacheEntry(key, manifest, size, manifest.stat().st_mtime))
        return sorted(out, key=lambda e: (e.used, e.key))

    def leftovers(self) -> list[Path]:
        """Temp files of runs that were killed, and slot files no manifest vouches for."""
        shards = self._shards()
        tmp = [p for shard in shards for p in shard.glob(".*.tmp")]
        keys = {e.key for e in self.entries()}
        orphan = [p for shard in shards for p in shard.glob(f"*{SUFFIX}")
                  if p.name[: -len(SUFFIX)].split("~")[0] not in keys]
        return sorted(tmp + orphan)

    def gc(self, older_than_s: float | None = None, *, min_age_s: float = 3600,
           kept: list[Path] | None = None) -> list[Path]:
        """Remove leftovers older than ``min_age_s`` (a live run may own younger ones; those
        are appended to ``kept``) and, with ``older_than_s``, entries unused for that long.
        Returns what was removed. A folder holding anything a cache does not write is
        refused, as by :meth:`clear`."""
        self._refuse_foreign()
        now = time.time()
        removed = []
        try:
            for p in self.leftovers():
                with contextlib.suppress(FileNotFoundError):  # (gone meanwhile: a live run's)
                    if now - p.stat().st_mtime >= min_age_s:
                        p.unlink(missing_ok=True)
                        removed.append(p)
                    elif kept is not None:
                        kept.append(p)
            if older_than_s is not None:
                for e in self.entries():
                    if now - e.used >= older_than_s:
                        self.remove(e.key)
                        removed.append(e.path)
        except OSError as exc:
            raise output_oserror(exc, Path(exc.filename or self.root), folder=self.root
                                 ) from exc
        for shard in self._shards():  # the folders emptied
            with contextlib.suppress(OSError):  # (not empty: kept)
                shard.rmdir()
        return removed

    def foreign(self) -> list[Path]:
        """What the cache folder holds that no cache writes (a folder given by mistake: a
        project's, a home): anything but shard folders of two hex digits holding entry files
        (``.safetensors``, ``.json``) and temp files (``.*.tmp``)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and not p.is_symlink() and _SHARD.fullmatch(p.name):
                # (a file a live run renames or removes meanwhile is still the cache's; an
                # NFS client's .nfs* placeholder of a removed open file is nobody's to judge)
                out += [q for q in p.iterdir() if not q.name.startswith(".nfs") and (
                    not _written_here(q.name) or q.is_symlink()
                    or (q.exists() and not q.is_file()))]
            else:
                out.append(p)
        return sorted(out)

    def _refuse_foreign(self) -> None:
        foreign = self.foreign()
        if foreign:
            shown = ", ".join(str(p) for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise OutputError(
                f"{self.root} is not only a tvrecipe cache: it holds {shown}{more}, which no "
                "cache writes; nothing was removed. Point --cache-dir (or TVRECIPE_CACHE) at "
                "the cache folder itself, by default .tvrecipe/cache beside the recipe")

    def clear(self) -> int:
        """Remove every entry and temp file, then the emptied shard folders and the cache
        folder; the number of files removed. A folder holding anything else is not a cache:
        :class:`OutputError` (naming what it holds), and nothing is removed."""
        self._refuse_foreign()
        removed = 0
        if not self.root.is_dir():
            return removed
        try:
            for shard in self._shards():
                for q in shard.iterdir():
                    if q.name.startswith(".nfs"):
                        continue
                    q.unlink(missing_ok=True)
                    removed += 1
                with contextlib.suppress(OSError):  # (a live run's new file, an .nfs one)
                    shard.rmdir()
            if not self.root.is_symlink():  # (a linked cache folder stays, emptied)
                with contextlib.suppress(OSError):
                    self.root.rmdir()
        except OSError as exc:
            raise output_oserror(exc, Path(exc.filename or self.root), folder=self.root
                                 ) from exc
        return removed
