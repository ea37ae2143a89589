"""Atomic output folders (built beside the target, then renamed) and non-weight file copies."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tvrecipe.errors import InputError, OutputError
from tvrecipe.store.remote import RemotePath

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AuxPlan", "OutputFolder", "copy_aux_files", "output_oserror", "plan_aux_files"]

# Weights in every format a model folder ships them in (PyTorch, TensorFlow, Flax, GGUF, ONNX,
# TFLite, Rust, numpy, Core ML, Keras, NeMo): a copy would publish the base's unmerged weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".ggml", ".onnx", ".onnx_data", ".tflite", ".ot", ".npz", ".npy", ".pb",
                   ".mlmodel", ".keras", ".joblib", ".pkl", ".pickle", ".nemo")
# The files that describe one model and not another: the card, and a tvrecipe release's own.
MODEL_CARD_FILES = ("README.md", "tvrecipe.yaml", "tvrecipe.lock")
# Code a model ships for trust_remote_code: copying it would spread code the user never read.
CODE_SUFFIXES = (".py", ".pyc", ".so", ".dylib", ".dll", ".sh", ".exe")


def output_oserror(exc: OSError, path: Path, folder: Path | None = None) -> OutputError:
    """An OutputError for an OSError raised while writing ``path``, saying what to do.

    Args:
        exc: The error raised by the operating system.
        path: The file or folder being written.
        folder: The folder whose permissions to check (default: ``path``'s parent).
    """
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder must be
        blocker = next((p for p in (path, *path.parents)
                        if os.path.lexists(p) and not os.path.isdir(p)), None)
        if blocker is not None:
            return OutputError(f"cannot write {path}: {blocker} is a file, not a folder; "
                               "move that file away or write the output elsewhere")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk or write the output elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"check the permissions of {folder or path.parent} or write the output elsewhere"
    else:
        fix = "check the output path"
    return OutputError(f"cannot write {path}: {reason}; {fix}")


def _fsync_tree(root: Path) -> None:
    # Data then directory entries: a crash after the rename must not expose empty files.
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Staging folders of this process not yet committed or removed (see OutputFolder.abort_all).
_LIVE_STAGING: set[Path] = set()
def _host_id() -> str:
    """This machine and process-id namespace, for the staging folders' names: hostname, boot
    id and pid namespace, so that two containers of one hostname (their process ids are not
    each other's) never take each other's live folder for a dead run's."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


_HOST = _host_id()


def overlap(path: Path, other: Path) -> str | None:
    """Where ``path`` lies against ``other`` once both are resolved (links followed):
    ``"is"``, ``"is inside"``, ``"contains"``, or None when neither holds the other."""
    a, b = Path(path).resolve(), Path(other).resolve()
    return ("is" if a == b else "is inside" if b in a.parents else
            "contains" if a in b.parents else None)


def empty_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (not a link) with nothing in it: an output may replace it
    without --force, as there is nothing to lose (a checkout's ``mkdir -p out/model``)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _host_prefix(name: str) -> str:
    return f".{name}.tmp-{_HOST}-"


def staging_prefix(name: str, pid: int | None = None) -> str:
    # The host and process are in the name so a later run can tell a dead run's leftovers
    # (after SIGKILL or a power cut) from a live run's folder.
    return f"{_host_prefix(name)}{os.getpid() if pid is None else pid}-"


def _make_staging(parent: Path, name: str) -> Path:
    """Creates a fresh staging folder for output ``name`` in ``parent``.

    The path is registered before the folder exists, so no interrupt can leave an
    unregistered folder behind.
    """
    for _ in range(100):
        path = parent / (staging_prefix(name) + secrets.token_hex(4))
        _LIVE_STAGING.add(path)
        try:
            path.mkdir()  # default mode: the usual permissions of a new folder
        except FileExistsError:
            _LIVE_STAGING.discard(path)
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free staging folder name", str(parent))


def _remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        _LIVE_STAGING.discard(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _aside_prefix(name: str, pid: int | None = None) -> str:
    # (host and process, as a staging folder's: see staging_prefix)
    return f".{name}.old-{_HOST}-{os.getpid() if pid is None else pid}-"


def _dead(prefix: str, path: Path) -> bool:
    """Whether ``path`` (named ``prefix`` + PID + ``-``…) is a folder of a run on this host
    that no longer exists."""
    pid_text = path.name[len(prefix):].split("-", 1)[0]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))


_PENDING = ".lock-pending"  # in an aside folder: the staged lock that must go in after it


def _lock_pending(aside: Path) -> bool:
    """Whether the run that made ``aside`` staged a lock that never went into place."""
    try:
        staged = (aside / _PENDING).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(staged) and os.path.lexists(staged)


def sweep_dead_staging(parent: Path, name: str) -> None:
    """Removes the folders for output ``name`` left by runs on this host that no longer exist
    (SIGKILL, a power cut): staging folders (a staged lock file, for a lock), and the folders
    a previous output was moved aside into while a new one took its place. Where such a run
    died between those two renames, its previous output goes back in place first (no output
    there, and the lock, written after the renames, still describes that one); where it died
    after its outputs went in but before its lock did, its new output goes and the previous
    one comes back (the lock describes that one). A lock's own dead staged file must be swept
    after its outputs' (:func:`tvrecipe.exec.lockfile.sweep_dead_runs`)."""
    staging, aside = _host_prefix(name), f".{name}.old-{_HOST}-"
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith((staging, aside))]
    except OSError:
        return
    for path in entries:
        if path.name.startswith(staging):
            if _dead(staging, path):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:  # (a staged file: a lock)
                    path.unlink(missing_ok=True)
        elif _dead(aside, path):
            kept, target = path / name, parent / name
            if _lock_pending(path) and os.path.lexists(target):
                # It died after its output went in, before its lock did (the staged lock is
                # still there): the new output goes, so that outputs and lock agree again.
                try:
                    trash = Path(tempfile.mkdtemp(prefix=staging_prefix(name), dir=parent))
                    os.rename(target, trash / name)
                except OSError:
                    continue  # (both kept, rather than one lost)
                shutil.rmtree(trash, ignore_errors=True)
            if os.path.lexists(kept) and not os.path.lexists(target):
                try:
                    os.rename(kept, target)
                except OSError:
                    continue  # (kept where it is, rather than lost)
            shutil.rmtree(path, ignore_errors=True)


class InterruptAfter(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) that waited for a block that must not be split, and is raised
    once it is done: what the block wrote (outputs and their lock) is in place."""


@contextmanager
def deferred_interrupts(drop: bool = False) -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then raise KeyboardInterrupt (or, with
    ``drop``, are dropped): for steps that must not be split (outputs renamed into place and
    the lock that records them). Only the main thread receives signals; elsewhere the block
    runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got and not drop:
        raise InterruptAfter


class OutputFolder:
    """Builds an output folder beside its target and renames it into place at the end.

    Write everything into ``staging``, then call ``commit()``. Used as a context manager it
    removes the staging folder when the block exits without a commit (an error, an interrupt).

    Args:
        target: The folder to create.
        force: Replace ``target`` if it exists (the old one is deleted only after the new one
            is in place).
        protected: Input paths the output must not be, lie inside, or contain.

    Raises:
        OutputError: ``target`` exists without ``force``, overlaps an input, or its parent
            cannot be written.
    """

    def __init__(self, target: Path, *, force: bool = False, protected: Sequence[Path] = ()):
        self.target = Path(target)
        self.force = force
        self.committed = False
        self._aside: Path | None = None  # the previous output, between swap() and finish()
        for p in protected:
            if isinstance(p, RemotePath):  # only a file:// URL can be where outputs go
                p = p.local
                if p is None:
                    continue
            relation = overlap(self.target, p)
            if relation is not None:
                raise OutputError(
                    f"output {self.target} {relation} the input {p}; writing it could destroy "
                    "the input: choose an output path outside every input"
                )
        parent = self.target.parent
        if os.path.isdir(parent):  # (first: a dead run's previous output may go back)
            sweep_dead_staging(parent, self.target.name)
        if os.path.lexists(self.target) and not force and not empty_folder(self.target):
            raise OutputError(f"output {self.target} exists; pass --force to replace it")
        # The folders made for it (out/, out/sub/): an aborted output removes them again.
        self._made = [p for p in (parent, *parent.parents) if not os.path.lexists(p)]
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = _make_staging(parent, self.target.name)
        except OSError as exc:
            # The hint names the folder that refused the staging folder.
            raise output_oserror(exc, parent, folder=parent) from exc

    def commit(self) -> Path:
        """Flushes the staging folder to disk and renames it to ``target``.

        Returns:
            The target path.

        Raises:
            OutputError: The rename failed (the previous output, if any, is left in place),
                or the target appeared meanwhile and ``force`` is off.
        """
        self.swap()
        self.finish()
        return self.target

    def swap(self, lock: Path | None = None) -> Path:
        """Puts the staged folder in place, keeping the previous output aside until
        :meth:`finish` drops it or :meth:`unswap` puts it back (so that several outputs go in
        all or none). ``lock``: the staged lock file that goes in after the outputs; a run
        killed before it does leaves that in the aside folder, and the next run's
        :func:`sweep_dead_staging` puts the previous output back. Raises as :meth:`commit`."""
        if self.committed:
            return self.target
        parent = self.target.parent
        aside: Path | None = None
        try:
            _fsync_tree(self.staging)
            exists = os.path.lexists(self.target)
            if exists and not self.force and not empty_folder(self.target):
                raise OutputError(f"output {self.target} exists; pass --force to replace it")
            if exists or lock is not None:
                aside = Path(tempfile.mkdtemp(prefix=_aside_prefix(self.target.name),
                                              dir=parent))
            if lock is not None:
                (aside / _PENDING).write_text(str(Path(lock).absolute()), encoding="utf-8")
            if exists:
                os.rename(self.target, aside / self.target.name)
            try:
                os.rename(self.staging, self.target)
            except BaseException as exc:  # an interrupt here too must not lose the old output
                if aside is not None:
                    self._restore(aside, exc)
                raise
        except OSError as exc:
            raise output_oserror(exc, self.target) from exc
        self.committed = True
        self._aside = aside
        _LIVE_STAGING.discard(self.staging)
        _fsync_dir(parent)
        return self.target

    def finish(self) -> None:
        """After :meth:`swap`: the previous output, kept aside, goes."""
        aside, self._aside = self._aside, None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def unswap(self) -> None:
        """Undoes :meth:`swap` (another output could not go in): the new folder goes back
        to staging, to be aborted, and the previous output, if any, back in place.

        Raises:
            OutputError: The previous output could not be put back (where it is is said).
        """
        if not self.committed:
            return
        aside, self._aside = self._aside, None
        try:
            _LIVE_STAGING.add(self.staging)
            os.rename(self.target, self.staging)
        except OSError as exc:
            _LIVE_STAGING.discard(self.staging)
            if aside is None or not os.path.lexists(aside / self.target.name):
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
                raise OutputError(
                    f"cannot take the new {self.target} out again: {exc.strerror or exc}; "
                    "it stays, without a lock that records it") from exc
            # Out of the aside folder, so that no later run's sweep takes it for a dead run's
            # leftover and removes it.
            kept = aside / self.target.name
            moved = self.target.parent / f"{self.target.name}.previous-{secrets.token_hex(4)}"
            with contextlib.suppress(OSError):
                os.rename(kept, moved)
                kept = moved
                aside.rmdir()
            raise OutputError(
                f"cannot put the previous {self.target} back: {exc.strerror or exc}; it was "
                f"kept at {kept}: move it back by hand") from exc
        self.committed = False
        if aside is not None:
            self._restore(aside, OSError("another output could not be written"))
        _fsync_dir(self.target.parent)

    def _restore(self, aside: Path, exc: BaseException) -> None:
        # Put the previous output back before reporting, so a failure never loses it.
        try:
            if os.path.lexists(aside / self.target.name):  # (none: the output was new)
                os.rename(aside / self.target.name, self.target)
            (aside / _PENDING).unlink(missing_ok=True)
            aside.rmdir()
        except OSError:
            raise OutputError(
                f"cannot write {self.target}: {getattr(exc, 'strerror', None) or exc!r}; the "
                f"previous output was kept "
                f"at {aside / self.target.name}: move it back by hand"
            ) from exc

    def abort(self) -> None:
        """Removes the staging folder, and the folders made to hold it that are empty now;
        safe to call more than once, and a no-op after commit."""
        if not self.committed:
            _remove_staging(self.staging)
            for folder in self._made:  # innermost first; a folder another output uses stays
                try:
                    folder.rmdir()
                except OSError:
                    break

    @staticmethod
    def abort_all() -> None:
        """Removes every staging folder this process created and has not committed.

        The command line calls it whatever way a command ends, so an interrupt that lands
        between two statements of the cleanup code still leaves no staging folder behind.
        """
        for path in sorted(_LIVE_STAGING):
            _remove_staging(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


@dataclass
class AuxPlan:
    """Which top-level files of a model folder ``copy_aux_files`` copies.

    Attributes:
        copy: Names of the files to copy, sorted.
        skipped: Names of files left out on purpose, each with the reason.
    """

    copy: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def plan_aux_files(source: Path | RemotePath) -> AuxPlan:
    """Lists the non-weight files of a model folder (config, tokenizer, ...) to copy.

    Weights (in any format), hidden files, folders, code files, the folder's model card (and a
    tvrecipe release's own files) and symlinks pointing outside the folder are left out; all
    but hidden files and safetensors weights are reported in ``skipped``, with the reason. A
    folder at a URL has no links.

    Raises:
        InputError: ``source`` is not a folder.
    """
    remote = isinstance(source, RemotePath)
    if not remote:
        source = Path(source)
    if not source.is_dir():
        raise InputError(
            f"{source}: not a folder; copy_files_from must name a model folder "
            "(the one holding config.json)"
        )
    root = blobs = None
    if not remote:
        root = source.resolve()
        # The Hugging Face cache links snapshots/<rev>/<file> to ../../blobs/<hash>; those
        # are the model's own files, not outside ones.
        blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    plan = AuxPlan()
    for entry in sorted(source.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith("."):
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            if not name.endswith((".safetensors", ".safetensors.index.json")):
                plan.skipped[name] = f"weights of {source.name} in another format, not the merged ones"
            continue
        if name in MODEL_CARD_FILES:
            plan.skipped[name] = f"describes {source.name}, not this output"
            continue
        if not remote and entry.is_symlink():
            real = entry.resolve()
            if not (_inside(real, root) or (blobs is not None and _inside(real, blobs))):
                plan.skipped[name] = f"symlink to {real}, outside {source}"
                continue
        if entry.is_dir():
            plan.skipped[name + "/"] = "a folder: copy it yourself if the model needs it"
            continue
        if not entry.is_file():
            continue
        if name.endswith(CODE_SUFFIXES):
            plan.skipped[name] = "code: copy it yourself if you trust it"
            continue
        plan.copy.append(name)
    return plan


# ``_name_or_path`` values that are a place on some machine, not a Hub id: absolute, home,
# relative with a dot, or a Windows path. (transformers 4 saved where a model was loaded from.)
_LOCAL_NAME = re.compile(r"^([/~.\\]|[A-Za-z]:)|/.*/")


def fix_copied_config(folder: Path, dtype: str | None) -> None:
    """A copied ``config.json`` says the dtype the weights are stored in (``torch_dtype``, and
    ``dtype`` where newer transformers write it), as mergekit's does: transformers loads with
    it (``torch_dtype="auto"``); and its ``_name_or_path``, where it names a folder on the
    machine the model was saved on (``/home/…``), goes: a release names no one's folders. The
    same in every sub-config it nests. Only a JSON object that needs either is rewritten (keys
    in their order, indented by 2, as transformers writes it)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # (none, or not ours to fix)
    if not isinstance(config, dict) or not _fix_config(config, dtype):
        return
    try:
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise output_oserror(exc, path) from exc


def _fix_config(config: dict, dtype: str | None) -> bool:
    """Sets the dtype keys and drops a local ``_name_or_path`` in a config and in the
    sub-configs it nests (``text_config``, ``vision_config``, …: a composite model loads each
    part with its own); True when anything changed."""
    changed = False
    for k in ("torch_dtype", "dtype"):
        if dtype and isinstance(config.get(k), str) and config[k] != dtype:
            config[k] = dtype
            changed = True
    name = config.get("_name_or_path")
    if isinstance(name, str) and _LOCAL_NAME.search(name):
        del config["_name_or_path"]
        changed = True
    for value in config.values():
        if isinstance(value, dict):
            changed = _fix_config(value, dtype) or changed
    return changed


def copy_aux_files(source: Path | RemotePath, dest: Path) -> list[str]:
    """Copies the non-weight files of a model folder into ``dest`` (see ``plan_aux_files``).

    Args:
        source: The model folder to copy from.
        dest: The folder to copy into (usually an ``OutputFolder``'s staging folder).

    Returns:
        The names of the files copied, sorted.

    Raises:
        InputError: ``source`` is not a folder or a file in it cannot be read.
        OutputError: A file cannot be written to ``dest``.
    """
    if isinstance(source, RemotePath):
        return _copy_remote(source, Path(dest))
    source, dest = Path(source), Path(dest)
    plan = plan_aux_files(source)
    for name in plan.copy:
        try:
            with open(source / name, "rb") as src:
                try:
                    with open(dest / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 8 << 20)
                except OSError as exc:
                    raise output_oserror(exc, dest / name) from exc
        except OSError as exc:
            raise InputError(
                f"cannot read {source / name}: {exc.strerror}; check its permissions"
            ) from exc
    return plan.copy


def _copy_remote(source: RemotePath, dest: Path) -> list[str]:
    """``copy_aux_files`` from a folder at a URL: each file fetched, then written."""
    plan = plan_aux_files(source)
    for name in plan.copy:
        try:
            data = (source / name).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {source / name}: {exc.strerror or exc}; check the "
                             "URL") from exc
        try:
            (dest / name).write_bytes(data)
        except OSError as exc:
            raise output_oserror(exc, dest / name) from exc
    return plan.copy
