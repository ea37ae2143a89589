"""Checkpoint reader: finds a model's safetensors files, parses headers, reads tensors on demand."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tvrecipe.errors import InputError, TvrecipeError, about
from tvrecipe.store.remote import HEAD_BYTES, RemotePath, as_path

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from typing_extensions import Self

__all__ = [
    "PICKLE_SUFFIXES",
    "Checkpoint",
    "RemoteCheckpoint",
    "TensorInfo",
    "dtype_size",
    "open_checkpoint",
    "read_header",
    "st_dtype",
    "torch_dtype",
]

# safetensors' own limit; a larger "header" means the file is not a safetensors file.
MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Float8 types exist only in recent torch builds, so each is looked up by name.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}  # fmt: skip
# Sizes without torch, so headers, plans, hashes and locks never pay for importing it.
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1,
          "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8}  # fmt: skip


@cache
def _tables() -> tuple[dict, dict]:
    import torch

    to_torch = {st: getattr(torch, n) for st, n in _DTYPE_NAMES.items() if hasattr(torch, n)}
    return to_torch, {dt: st for st, dt in to_torch.items()}


_REDOWNLOAD = "re-download or re-export it"


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string, such as ``"BF16"`` -> ``torch.bfloat16``.

    Raises:
        ValueError: ``st_dtype`` is not a dtype tvrecipe can read.
    """
    to_torch = _tables()[0]
    try:
        return to_torch[st_dtype]
    except KeyError:
        raise ValueError(
            f"unknown safetensors dtype {st_dtype!r}; known: {', '.join(sorted(to_torch))}"
        ) from None


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype, such as ``torch.float32`` -> ``"F32"``.

    Raises:
        ValueError: safetensors cannot store ``dtype``.
    """
    try:
        return _tables()[1][dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store tensors of dtype {dtype}") from None


def dtype_size(st_dtype: str) -> int:
    """Bytes per element of a safetensors dtype string.

    Raises:
        ValueError: ``st_dtype`` is not a dtype tvrecipe can read.
    """
    if st_dtype not in _SIZES:
        torch_dtype(st_dtype)  # raises the "unknown dtype" error with the known list
    return _SIZES[st_dtype]


def _span(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[tuple[int, ...], int, int]:
    """Shape, file position and size of a tensor, or of rows ``start:stop`` of it."""
    if rows is None:
        return info.shape, info.start, info.nbytes
    per_row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
    return ((rows[1] - rows[0], *info.shape[1:]), info.start + rows[0] * per_row,
            (rows[1] - rows[0]) * per_row)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a checkpoint, from its file's header (no data read).

    Attributes:
        name: The tensor's name.
        dtype: The safetensors dtype string, such as ``"BF16"``.
        shape: The tensor's shape; ``()`` for a scalar.
        file: The ``.safetensors`` file that holds it (a :class:`RemotePath` for a URL).
        offset: Start of its data within the file's byte buffer (for read order).
        nbytes: Size of its data in bytes.
        start: Absolute position of its data in the file (8 + header length + offset).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | RemotePath
    offset: int
    nbytes: int
    start: int = 0

    @property
    def is_floating(self) -> bool:
        """Whether this is a weight to merge: a real floating-point type (``F*`` or ``BF16``)
        and not a buffer that a model computes from its config (:data:`BUFFERS`), which
        is kept from the reference model as an integer buffer is."""
        return ((self.dtype.startswith("F") or self.dtype == "BF16")
                and not is_buffer(self.name, len(self.shape)))


# Floating buffers that older transformers saved beside the weights and that a model rebuilds
# from its config, by the end of their names: rotary embeddings' inverse frequencies
# (``rotary_emb.inv_freq``, ChatGLM's ``rotary_pos_emb.inv_freq``), the attention masks'
# fill values (``masked_bias``: GPT-2, GPT-Neo, GPT-NeoX) and GPT-2's causal masks
# (``attn.bias``, ``crossattention.bias``, of shape 1 × 1 × n × n: a 1-D ``attn.bias`` is
# a real bias, of a module named ``attn``). They are no weights: merged as weights, a
# weighted sum that does not add up to 1 would scale them. mergekit leaves them out of its
# output; tvrecipe keeps the reference model's, unchanged.
_BUFFER_ENDS = ("inv_freq", "masked_bias", "attn.bias", "crossattention.bias")
# The version of that rule, in every step's key (a change of it changes what every op
# computes for such a tensor, and no result made under another may be reused): 2, a 1-D
# `attn.bias` is a weight.
BUFFER_RULE = 2
_MASK_ENDS = ("attn.bias", "crossattention.bias")
BUFFERS = re.compile(r"(^|\.)(" + "|".join(map(re.escape, _BUFFER_ENDS)) + r")$")


def is_buffer(name: str, ndim: int) -> bool:
    """Whether tensor ``name`` (of ``ndim`` dimensions) is one of :data:`BUFFERS` (the engine
    asks for every tensor and block: the suffix test first, a tenth of the pattern's time)."""
    return (name.endswith(_BUFFER_ENDS) and bool(BUFFERS.search(name))
            and (ndim == 4 or not name.endswith(_MASK_ENDS)))


def folder_config(folder: Path | RemotePath) -> dict:
    """The config.json of a model folder as a mapping; {} when there is none that can be read
    (or it is not a JSON object)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TvrecipeError):  # unreadable, or unreachable
        return {}
    return data if isinstance(data, dict) else {}


def _corrupt(file: Path | RemotePath, what: str) -> InputError:
    return InputError(f"{file}: corrupt safetensors file: {what}; {_REDOWNLOAD}")


def read_header(file: Path | RemotePath) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and validates one safetensors file's header without reading tensor data.

    Args:
        file: A ``.safetensors`` file, or a :class:`RemotePath` (read by byte range).

    Returns:
        The tensors in data-offset order, and the header metadata (``{}`` when absent).

    Raises:
        InputError: The file is unreadable, truncated or not a valid safetensors file.
    """
    if isinstance(file, RemotePath):
        size, n, raw = _remote_head(file)
        return _parse_header(file, size, n, raw)
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = _header_length(file, size, head)
            raw = f.read(n)
    except OSError as exc:
        raise InputError(
            f"cannot read {file}: {exc.strerror}; check the path and its permissions"
        ) from exc
    return _parse_header(file, size, n, raw)


def _header_length(file: Path | RemotePath, size: int, head: bytes) -> int:
    """The header length the first 8 bytes give, checked against the file's size."""
    if len(head) < 8:
        raise _corrupt(file, f"it is {size} bytes long, shorter than the 8-byte header length")
    n = int.from_bytes(head[:8], "little")
    if n > size - 8:
        raise _corrupt(file, f"header length {n} exceeds the {size - 8} bytes after it (truncated?)")
    if n > MAX_HEADER_BYTES:
        raise _corrupt(file, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    return n


def _remote_head(file: RemotePath) -> tuple[int, int, bytes]:
    """Size, header length and header of a remote file, by ranged reads: the first
    ``HEAD_BYTES`` (the length and, usually, the whole header), then the rest of a longer
    header."""
    try:
        size = file.size()
        head = file.read_range(0, min(size, HEAD_BYTES))
        n = _header_length(file, size, head)
        raw = head[8:8 + n]
        if len(raw) < n:
            raw += file.read_range(8 + len(raw), 8 + n)
        if len(raw) < n:
            raise OSError(f"file ended {n - len(raw)} bytes early")
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror or exc}; check the URL") from exc
    return size, n, raw


def _parse_header(file: Path | RemotePath, size: int, n: int, raw: bytes
                  ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(file, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(file, "__metadata__ is not a mapping of strings to strings")
    data_size = size - 8 - n
    tensors = [dataclasses.replace(info, start=8 + n + info.offset)
               for info in (_tensor_info(file, name, entry) for name, entry in header.items())]
    tensors.sort(key=lambda t: (t.offset, t.nbytes, t.name))
    end = 0
    for t in tensors:
        if t.offset != end:
            raise _corrupt(
                file, f"tensor {t.name!r} starts at byte {t.offset} of the data, expected {end}"
            )
        end += t.nbytes
        if end > data_size:
            raise _corrupt(
                file,
                f"tensor {t.name!r} ends at byte {end} of the data but the file holds only "
                f"{data_size} bytes of data (truncated file)",
            )
    if end != data_size:
        raise _corrupt(file, f"{data_size - end} unexpected bytes after the last tensor")
    return {t.name: t for t in tensors}, dict(metadata)


def _tensor_info(file: Path | RemotePath, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(file, f"header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _SIZES:
        raise InputError(
            f"{file}: tensor {name!r} has unknown dtype {dtype!r}; tvrecipe reads "
            f"{', '.join(sorted(_SIZES))}: convert the tensor to one of them"
        )
    ints = (shape, offsets)
    if not all(isinstance(v, list) and all(type(x) is int and x >= 0 for x in v) for v in ints):
        raise _corrupt(file, f"tensor {name!r} has an invalid shape or data_offsets")
    if len(offsets) != 2 or offsets[1] < offsets[0]:
        raise _corrupt(file, f"tensor {name!r} has invalid data_offsets {offsets}")
    nbytes = math.prod(shape) * _SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(
            file,
            f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]}",
        )
    return TensorInfo(name, dtype, tuple(shape), file, offsets[0], nbytes)


class Checkpoint:
    """An opened model: its tensors' headers, with data read on demand.

    Attributes:
        path: The path the user named.
        files: The weight files, in shard order.
        tensors: Every tensor, in read order (shard order, then data offset within a shard).
        metadata: The first file's header metadata (data only, never evaluated).
    """

    def __init__(
        self,
        path: Path,
        files: list[Path],
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
    ):
        self.path = path
        self.files = files
        self.tensors = tensors
        self.metadata = metadata
        self._handles: dict[Path, object] = {}
        # One lock: safe_open handles are not documented as thread-safe, and the executor
        # reads from a prefetch thread while the main thread may read too.
        self._lock = threading.Lock()

    def get(self, name: str, rows: tuple[int, int] | None = None, *,
            empty: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Reads one tensor on the CPU, or only rows ``start:stop`` of its first dimension.

        Reading a row range bounds the memory of row-wise work on large tensors. ``empty``
        (``torch.empty``'s signature: shape, dtype) makes the tensor read into, e.g. a
        run's :class:`~tvrecipe.exec.buffers.BufferPool`.

        Raises:
            InputError: The checkpoint has no tensor ``name``, or its file cannot be read.
        """
        import torch

        info = self._info(name)
        shape, start, nbytes = _span(info, rows)
        out = (empty or torch.empty)(shape, dtype=torch_dtype(info.dtype))
        if nbytes:
            self._read_into(info, start, nbytes, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out  # safetensors data is little-endian, as is every host torch runs on

    def get_bits(self, name: str, rows: tuple[int, int] | None = None):
        """Like :meth:`get`, without torch: a numpy array of unsigned integers of the dtype's
        width holding the stored bits (a BF16 tensor comes as ``uint16``), little-endian."""
        import numpy as np

        info = self._info(name)
        shape, start, nbytes = _span(info, rows)
        out = np.empty(shape, dtype=f"<u{dtype_size(info.dtype)}")
        if nbytes:
            self._read_into(info, start, nbytes, memoryview(out.reshape(-1).view(np.uint8)))
        return out

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            close = difflib.get_close_matches(name, list(self.tensors), n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else "check the tensor names of your inputs"
            )
            raise InputError(f"{self.path}: no tensor named {name!r}; {hint}")
        return info

    def _read_into(self, info: TensorInfo, start: int, nbytes: int, view: memoryview) -> None:
        # Plain reads into a fresh buffer rather than safetensors' memory map: a mapping keeps
        # every page it touched resident for as long as the file is open, so streaming a model
        # would grow the process by the size of its inputs. The header was validated at open.
        with self._lock:
            try:
                handle = self._handles.get(info.file)
                if handle is None:
                    # Reads arrive in shard order: keep one file open, not every shard.
                    for other in self._handles.values():
                        other.close()
                    self._handles.clear()
                    handle = self._handles[info.file] = open(info.file, "rb", buffering=0)  # noqa: SIM115
                handle.seek(start)
                done = 0
                while done < nbytes:
                    got = handle.readinto(view[done:])
                    if not got:
                        raise OSError(f"file ended {nbytes - done} bytes early")
                    done += got
            except OSError as exc:
                raise InputError(
                    f"{info.file}: cannot read tensor {info.name!r}: {exc}; "
                    "was the file changed or removed while tvrecipe ran?"
                ) from exc

    def close(self) -> None:
        """Releases the open file handles (a later ``get`` opens them again)."""
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, {len(self.files)} files, "
            f"{len(self.tensors)} tensors)"
        )


class RemoteCheckpoint(Checkpoint):
    """A checkpoint at a URL (:class:`RemotePath` files): each tensor, or row block of one,
    is fetched by byte range, in chunks, with nothing kept open between reads.

    Attributes:
        label: What a failed read is about (``model 'ft' (s3://b/ft)``), put before the
            storage's error; None leaves it as it is.
    """

    label: str | None = None

    def _read_into(self, info: TensorInfo, start: int, nbytes: int, view: memoryview) -> None:
        try:
            info.file.read_into(view[:nbytes], start)
        except OSError as exc:
            raise InputError(
                f"{info.file}: cannot read tensor {info.name!r}: {exc}; "
                "was the file changed or removed while tvrecipe ran?"
            ) from exc
        except InputError as exc:  # the storage could not be reached
            if self.label is None:
                raise
            raise about(exc, self.label) from None


def _pickle_error(where: Path | RemotePath, found: list[Path]) -> InputError:
    src = found[0]
    if isinstance(where, RemotePath):
        return InputError(
            f"{where}: holds only pickled weights ({', '.join(p.name for p in found)}); "
            "tvrecipe never unpickles files, since unpickling can run arbitrary code. Download "
            "the model, convert its weights to safetensors and name the local copy, or name "
            "a revision of the model that has safetensors weights"
        )
    dst = (src.parent if src.is_file() else src) / "model.safetensors"
    return InputError(
        f"{where}: holds only pickled weights ({', '.join(p.name for p in found)}); tvrecipe never "
        "unpickles files, since unpickling can run arbitrary code. Convert them to safetensors, "
        "for example:\n"
        "    import torch, safetensors.torch\n"
        f"    sd = torch.load({str(src)!r}, map_location='cpu', weights_only=True)\n"
        f"    safetensors.torch.save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, "
        f"{str(dst)!r})"
    )


def _find_weights(path: Path | RemotePath) -> tuple[list[Path], Path | None]:
    """The weight files of ``path`` and the index that names them (if any)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path to the checkpoint")
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return [], path
        if path.suffix == ".safetensors":
            return [path], None
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path, [path])
        raise InputError(
            f"{path}: not a safetensors file or index; name a .safetensors file, a "
            ".safetensors.index.json file, or a model folder"
        )
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (path / name).is_file():
            return ([path / name], None) if name.endswith(".safetensors") else ([], path / name)
    indexes = [p for p in entries if p.name.endswith(".safetensors.index.json") and p.is_file()]
    singles = [p for p in entries if p.suffix == ".safetensors" and p.is_file()]
    for kind, found in (("index files", indexes), (".safetensors files", singles)):
        if len(found) == 1:
            return (found, None) if kind != "index files" else ([], found[0])
        if len(found) > 1:
            raise InputError(
                f"{path}: several {kind} ({', '.join(p.name for p in found)}) and no "
                "model.safetensors or model.safetensors.index.json; name the one to use"
            )
    pickles = [p for p in entries if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    if pickles:
        raise _pickle_error(path, pickles)
    listing = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries) or "nothing"
    raise InputError(
        f"{path}: no weights found (it holds {listing}); expected model.safetensors, "
        "model.safetensors.index.json or one *.safetensors file"
    )


def _read_index(index: Path | RemotePath) -> tuple[list[Path], dict[str, str]]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {index}: {exc.strerror}; check its permissions") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{index}: invalid JSON ({exc}); {_REDOWNLOAD}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(f'{index}: no "weight_map" of tensor names to shard files; {_REDOWNLOAD}')
    shards = []
    for shard in sorted(set(weight_map.values())):
        # A shard is a file beside its index (as Hugging Face writes them): never a path
        # that leaves the folder (an absolute one, or one with a '..' or a subfolder).
        parts = PurePosixPath(shard).parts  # ("./x" is x)
        if len(parts) != 1 or parts[0] in (".", "..", "/") or "\\" in shard:
            raise InputError(
                f"{index}: names shard {shard!r}, which is not a file name beside the index; "
                "a sharded checkpoint's shards lie in its folder: regenerate the index")
        file = index.parent / shard
        if not file.is_file():
            raise InputError(
                f"{index}: names shard {shard!r}, but {file} does not exist; "
                "download the missing shard or regenerate the index"
            )
        shards.append(file)
    return shards, weight_map


def open_checkpoint(path: str | Path | RemotePath) -> Checkpoint:
    """Opens a checkpoint, reading and validating headers only.

    Args:
        path: A ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a folder holding
            ``model.safetensors``, ``model.safetensors.index.json``, one other index, or one
            other ``.safetensors`` file; or the URL of one (``s3://``, ``hf://``, ...: see
            :mod:`tvrecipe.store.remote`), whose headers and tensors are read by byte range.

    Returns:
        The opened checkpoint; close it (or use it as a context manager) when done.

    Raises:
        InputError: The path is missing, holds no or only pickled weights, or a file is corrupt
            or disagrees with the index; or the storage of a URL cannot be reached.
        MissingPackage: ``path`` is a URL whose scheme's fsspec implementation is not
            installed.
    """
    path = as_path(path)
    files, index = _find_weights(path)
    weight_map: dict[str, str] = {}
    if index is not None:
        files, weight_map = _read_index(index)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] | None = None
    for file in files:
        infos, meta = read_header(file)
        metadata = meta if metadata is None else metadata
        for name, info in infos.items():
            if name in tensors:
                raise InputError(
                    f"{path}: tensor {name!r} is in both {tensors[name].file} and {file}; "
                    "a checkpoint holds each tensor once: remove the duplicate shard"
                )
            tensors[name] = info
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file != index.parent / shard:
            raise InputError(
                f"{index}: maps tensor {name!r} to {shard!r}, but that file does not hold it; "
                "the index does not match the shards: re-download them or regenerate the index"
            )
    cls = RemoteCheckpoint if isinstance(path, RemotePath) else Checkpoint
    return cls(path, files, tensors, metadata or {})
