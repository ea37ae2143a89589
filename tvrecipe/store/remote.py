"""Model inputs in remote storage: fsspec URLs read by byte range behind a path-like object.

A model ``path`` such as ``s3://bucket/models/base``, ``hf://org/model@<commit>``,
``gs://…``, ``https://…/model.safetensors``, ``file:///data/base`` or ``memory://…`` (tests)
becomes a :class:`RemotePath`. It offers the part of :class:`pathlib.Path` that finding a
model's weight files needs (``/``, ``name``, ``suffix``, ``parent``, ``exists``,
``is_file``, ``is_dir``, ``iterdir``, ``read_text``), so that local folders and URLs follow
one set of rules, plus ranged reads (``read_range``, ``read_into``, ``iter_chunks``) for
safetensors headers, tensors and row blocks, and an identity (size plus ETag, mtime,
checksum or revision) for the hash memo.

fsspec is imported on first use only: a recipe of local paths never pays for it. A scheme
whose fsspec implementation is not installed is a :class:`MissingPackage` error naming the
package; an unreachable server or a refused request is an :class:`InputError` naming the
URL. A missing file is ``FileNotFoundError``, as for a local path, so callers handle both
alike.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tvrecipe.errors import InputError, MissingPackage, TvrecipeError

__all__ = ["RemotePath", "as_path", "is_url", "known_schemes", "remote_identity",
           "url_scheme"]

# ``scheme://``; two characters at least, so that a Windows drive (``C:/``) is no URL.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
# Ranged reads of whole files (hashing) and of large tensors go in chunks of this size,
# several at a time where the filesystem reads ranges concurrently (s3, gs, http, ...).
CHUNK = 16 << 20
BATCH = 4
# The first read of a safetensors file: the 8-byte length and, usually, the whole header.
HEAD_BYTES = 64 << 10
# Packages that add a scheme, where the name to pip install is not the top-level module of
# fsspec's class for it.
_PACKAGES = {"http": "fsspec[http]", "https": "fsspec[http]", "sftp": "paramiko",
             "ssh": "paramiko", "smb": "smbprotocol", "hdfs": "pyarrow",
             "arrow_hdfs": "pyarrow", "webhdfs": "requests", "github": "requests",
             "libarchive": "libarchive-c", "hf": "huggingface_hub"}
# Fields of fsspec's ``info`` that change when an object's bytes change, by filesystem:
# s3 (ETag, VersionId), gcs (generation, md5Hash, crc32c), azure (etag, last_modified),
# http (ETag, Content-MD5, Digest, Last-Modified), hf (blob_id, lfs.sha256), local (mtime,
# ino), memory (created).
_IDENTITY_KEYS = ("ETag", "etag", "e_tag", "VersionId", "version_id", "generation",
                  "md5Hash", "crc32c", "checksum", "Content-MD5", "Digest", "blob_id",
                  "LastModified", "Last-Modified", "last_modified", "mtime", "updated",
                  "modified", "created", "ino")
# An ``hf://`` URL at a commit: ``hf://org/name@<40 hex>/...`` names bytes that never change.
_HF_COMMIT = re.compile(r"^hf://(?:(?:datasets|spaces)/)?[^/@]+/[^/@]+@[0-9a-f]{40}(/|$)")


def url_scheme(path: object) -> str | None:
    """The scheme of a URL (``"s3"`` of ``s3://bucket/x``), or None for a local path."""
    if isinstance(path, RemotePath):
        return path.scheme
    m = _URL.match(path) if isinstance(path, str) else None
    return m[1].lower() if m else None


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (a string with a scheme, or a :class:`RemotePath`)."""
    return url_scheme(path) is not None


def known_schemes() -> frozenset[str] | None:
    """The schemes fsspec knows (installed or not), or None when fsspec is not installed."""
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return None
    return frozenset(known_implementations) | frozenset(registry)


def as_path(path: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """A :class:`RemotePath` for a URL (or one already), a :class:`pathlib.Path` otherwise."""
    if isinstance(path, (RemotePath, Path)):
        return path
    if isinstance(path, str) and _URL.match(path):
        return RemotePath(path)
    return Path(path)


def _package(scheme: str) -> str:
    """What to pip install for a scheme fsspec knows but cannot load."""
    if scheme in _PACKAGES:
        return _PACKAGES[scheme]
    try:
        from fsspec.registry import known_implementations
        return known_implementations[scheme]["class"].split(".")[0].replace("_", "-")
    except (ImportError, KeyError, AttributeError):  # pragma: no cover - defensive
        return f"the fsspec implementation of {scheme}://"


def _filesystem(url: str, scheme: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path within it."""
    try:
        import fsspec
    except ImportError:
        raise MissingPackage(f"{url}: model paths that are URLs need fsspec, which is not "
                             "installed: pip install 'tvrecipe[remote]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = _package(scheme)
        raise MissingPackage(f"{url}: reading {scheme}:// URLs needs {package}, which is not "
                             f"installed: pip install '{package}'") from None
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise InputError(f"{url}: unknown URL scheme {scheme}://; use a local path or a "
                             "URL that fsspec reads (s3://, gs://, hf://, https://, file://)"
                             ) from None
        raise _failure(url, "open", exc) from None
    except Exception as exc:  # noqa: BLE001 - a filesystem's own setup error (credentials)
        raise _failure(url, "open", exc) from None


def _failure(url: str, what: str, exc: BaseException) -> InputError:
    """A remote read that failed for another reason than a missing file."""
    if isinstance(exc, PermissionError):
        return InputError(f"cannot {what} {url}: permission denied ({exc}); check your "
                          "credentials for this storage and that they may read it")
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return InputError(f"cannot {what} {url}: {detail}; check the URL, your credentials and "
                      "the network connection, then retry")


def _missing(url: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _lfs_sha256(info: dict) -> object:
    """The ``lfs.sha256`` a Hugging Face listing gives a file kept in LFS, or None."""
    lfs = info.get("lfs")
    return lfs.get("sha256") if isinstance(lfs, dict) else None


def remote_identity(url: str, info: dict) -> list | None:
    """What the hash memo compares to trust a remembered hash of a remote file: its size and
    every field of ``info`` that changes with its bytes, or None when there is none (the file
    is then hashed on every run)."""
    fields = [f"{k}={info[k]}" for k in _IDENTITY_KEYS if info.get(k) not in (None, "")]
    if lfs := _lfs_sha256(info):
        fields.append(f"lfs.sha256={lfs}")
    if _HF_COMMIT.match(url):
        fields.append("revision=commit")
    return [int(info.get("size") or 0), *sorted(fields)] if fields else None


class RemotePath:
    """A file or folder named by a URL, with the path operations model resolution uses.

    Args:
        url: The URL, such as ``s3://bucket/models/base``; a trailing ``/`` is dropped.
        info: fsspec's ``info`` of it when already known (from a listing).
    """

    __slots__ = ("_children", "_fs", "_info", "scheme", "url")

    def __init__(self, url: str, info: dict | None = None):
        scheme = url_scheme(url)
        if scheme is None:
            raise ValueError(f"not a URL: {url!r}")
        rest = url.split("://", 1)[1]
        self.url = f"{url.split('://', 1)[0]}://{rest.rstrip('/') or rest}"
        self.scheme = scheme
        self._info = info
        self._fs: tuple[Any, str] | None = None
        self._children: dict[str, RemotePath] | None = None

    # ---- pure path arithmetic -------------------------------------------------------------
    @property
    def _rest(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def name(self) -> str:
        """The last part of the URL (``model.safetensors``)."""
        return self._rest.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        """The extension of :attr:`name`, with its dot (``.safetensors``), or ``""``."""
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> RemotePath:
        """The folder holding it (itself at the top of the URL)."""
        rest = self._rest
        if "/" not in rest:
            return self
        return RemotePath(f"{self.url.split('://', 1)[0]}://{rest.rsplit('/', 1)[0]}")

    def __truediv__(self, name: str) -> RemotePath:
        if self._children is not None and name in self._children:
            return self._children[name]
        return RemotePath(f"{self.url}/{name}")

    def resolve(self) -> RemotePath:
        """Itself: a URL is absolute."""
        return self

    expanduser = absolute = resolve

    def is_absolute(self) -> bool:
        """Always true."""
        return True

    def is_symlink(self) -> bool:
        """Always false: object stores have no links."""
        return False

    @property
    def local(self) -> Path | None:
        """The local path of a ``file://`` URL, else None."""
        if self.scheme not in ("file", "local"):
            return None
        return Path(self._fs_path())

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(("RemotePath", self.url))

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    # ---- filesystem access ----------------------------------------------------------------
    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None:
            self._fs = _filesystem(self.url, self.scheme)
        return self._fs

    def _fs_path(self) -> str:
        return self._filesystem()[1]

    def info(self, refresh: bool = False) -> dict | None:
        """fsspec's ``info`` (size, type, ETag, ...), or None when nothing is at the URL.

        Raises:
            InputError: the storage could not be reached or refused the request.
            MissingPackage: the scheme's fsspec implementation is not installed.
        """
        if self._info is None or refresh:
            fs, path = self._filesystem()
            try:
                if refresh:
                    fs.invalidate_cache(path)
                self._info = fs.info(path)
            except FileNotFoundError:
                return None
            except TvrecipeError:
                raise
            except Exception as exc:  # noqa: BLE001 - each filesystem raises its own errors
                raise _failure(self.url, "read", exc) from None
        return self._info

    def exists(self) -> bool:
        """Whether a file or folder is at the URL."""
        return self.info() is not None

    def is_file(self) -> bool:
        """Whether a file is at the URL."""
        info = self.info()
        return info is not None and info.get("type") == "file"

    def is_dir(self) -> bool:
        """Whether a folder (a prefix with objects under it) is at the URL."""
        info = self.info()
        return info is not None and info.get("type") == "directory"

    def size(self) -> int:
        """The file's size in bytes.

        Raises:
            FileNotFoundError: nothing is at the URL.
        """
        info = self.info()
        if info is None:
            raise _missing(self.url)
        return int(info.get("size") or 0)

    def _call(self, verb: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` of the filesystem, its failures as tvrecipe errors naming
        the URL: nothing there (``_missing``), anything else (``_failure``, saying ``verb``)."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise _missing(self.url) from None
        except TvrecipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - each filesystem raises its own errors
            raise _failure(self.url, verb, exc) from None

    def iterdir(self) -> Iterator[RemotePath]:
        """The entries of the folder, each with its ``info`` already known."""
        fs, path = self._filesystem()
        listing = self._call("list", fs.ls, path, detail=True)
        children = {}
        for entry in listing:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name and name not in children and entry["name"].rstrip("/") != path.rstrip("/"):
                children[name] = RemotePath(f"{self.url}/{name}", info=entry)
        self._children = children
        return iter(list(children.values()))

    def read_bytes(self) -> bytes:
        """The whole file (small files only: indexes, configs).

        Raises:
            FileNotFoundError: nothing is at the URL.
        """
        fs, path = self._filesystem()
        return self._call("read", fs.cat_file, path)

    def read_text(self, encoding: str = "utf-8") -> str:
        """The whole file, decoded."""
        return self.read_bytes().decode(encoding)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the file (fewer only where the file ends first)."""
        fs, path = self._filesystem()
        return self._call("read", fs.cat_file, path, start=start, end=end)

    def iter_chunks(self, start: int, end: int, chunk: int = CHUNK) -> Iterator[bytes]:
        """Bytes ``start:end`` in order, in chunks of ``chunk`` bytes, a few ranges fetched
        at a time (concurrently where the filesystem can).

        Raises:
            OSError: the file ended early (it changed while read), or is gone.
            InputError: the storage could not be reached.
        """
        fs, path = self._filesystem()
        pos = start
        while pos < end:
            starts = list(range(pos, min(end, pos + chunk * BATCH), chunk))
            ends = [min(s + chunk, end) for s in starts]
            try:
                if len(starts) == 1:
                    parts = [fs.cat_file(path, start=starts[0], end=ends[0])]
                else:  # failed ranges come back as exceptions (older fsspec: raised)
                    parts = fs.cat_ranges([path] * len(starts), starts, ends)
                    for part in parts:
                        if isinstance(part, BaseException):
                            raise part
            except FileNotFoundError:
                raise _missing(self.url) from None
            except TvrecipeError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _failure(self.url, "read", exc) from None
            for s, e, data in zip(starts, ends, parts):
                if len(data) != e - s:
                    raise OSError(f"file ended {e - s - len(data)} bytes early")
                yield data
            pos = ends[-1]

    def read_into(self, view: memoryview, start: int) -> None:
        """Fills ``view`` (bytes) with the file's bytes from ``start`` on."""
        done = 0
        for data in self.iter_chunks(start, start + len(view)):
            view[done:done + len(data)] = data
            done += len(data)

    def stated_sha256(self) -> str | None:
        """The SHA-256 of the file's bytes when its storage states it, else None. A Hugging
        Face file kept in LFS names its object by exactly that hash (``lfs.sha256``), so
        hashing it needs no download, as DVC trusts a remote's own checksums."""
        digest = _lfs_sha256(self.info() or {})
        return digest if isinstance(digest, str) and _SHA256.fullmatch(digest) else None

    def identity(self) -> list | None:
        """The file's current identity for the hash memo (see :func:`remote_identity`)."""
        info = self.info(refresh=True)
        if info is None:
            raise _missing(self.url)
        return remote_identity(self.url, info)
