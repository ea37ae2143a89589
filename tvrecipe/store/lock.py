"""The lock file: a sorted YAML record of a run's inputs, step keys and output hashes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tvrecipe.errors import VerifyError
from tvrecipe.store.hashing import FILE_MODE, HashMemo, sha256_file
from tvrecipe.store.output import staging_prefix, sweep_dead_staging

LOCK_VERSION = 1


def lock_path(recipe: Path) -> Path:
    """``recipe.yaml`` → ``recipe.yaml.lock`` beside it."""
    return recipe.with_name(recipe.name + ".lock")


def hash_tree(folder: Path, memo: HashMemo | None = None,
              known: dict[str, str] | None = None, hidden: bool = True) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path (sorted); ``known`` gives
    the digests of files already hashed (as they were written), which are not read. Without
    ``hidden``, files and folders whose name starts with a dot are left out: no output has
    them, and verifying one must not fail on a `.gitattributes` or `.cache/` that a Hub
    upload or download adds."""
    known = known or {}
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(folder))
            if not hidden and any(part.startswith(".") for part in Path(rel).parts):
                continue
            out[rel] = known.get(rel) or sha256_file(p, memo=memo)
    return out


def write_lock_temp(path: Path, data: dict[str, Any]) -> Path:
    """Write the lock ``path`` will hold to a temporary file beside it (keys sorted, so reruns
    give the same bytes), and return that file: renaming it into place then needs no space
    (a full disk stops the writing, before anything is replaced). Nothing is left behind
    when the writing fails."""
    text = yaml.safe_dump({"lock_version": LOCK_VERSION, **data}, sort_keys=True,
                          default_flow_style=False, allow_unicode=True)
    # (named by host and process, as staging folders are: a dead run's is removed here)
    sweep_dead_staging(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=staging_prefix(path.name), suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a lock is meant to be read and committed.
        if hasattr(os, "fchmod"):
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def check_writable(path: Path) -> None:
    """Refuse a run whose lock could not be written once its outputs are in place: ``path``
    is a folder, or its folder takes no new file (read-only, full). OutputError, naming the
    lock file; nothing is written (the probe file is removed)."""
    from tvrecipe.errors import OutputError
    if path.is_dir():
        raise OutputError(f"the lock file {path} is a folder; remove it or move it away, "
                          "then run again (nothing was run)")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write the lock file {path}: {reason}; check the "
                          f"permissions of {path.parent} and the space on its disk (nothing "
                          "was run)") from exc
    os.close(fd)
    os.unlink(tmp)


def read_lock(path: Path) -> dict[str, Any]:
    """Read a lock file.

    Raises:
        VerifyError: it is missing, unreadable or of another version.
    """
    if path.is_dir():
        raise VerifyError(f"the lock file {path} is a folder; remove it or move it away, then "
                          "`tvrecipe run` writes the lock")
    if not path.is_file():
        raise VerifyError(f"no lock file {path}; run `tvrecipe run` first to create it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VerifyError(f"{path}: unreadable lock file ({first}); `tvrecipe run --force` "
                          "writes the outputs and a new lock") from None
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION:
        raise VerifyError(f"{path}: not a version-{LOCK_VERSION} tvrecipe lock file; "
                          "`tvrecipe run --force` writes the outputs and a new lock")
    wrong = lock_shape_problem(data)
    if wrong:
        raise VerifyError(f"{path}: {wrong} (edited by hand, or damaged); `tvrecipe run "
                          "--force` writes the outputs and a new lock")
    return data


# Where a lock (a recipe's, or the one an output folder carries) holds text: the digests,
# paths, step keys and versions tvrecipe wrote. ``*`` is any name.
_TEXT_FIELDS = (("recipe", "file"), ("recipe", "sha256"), ("built_from", "file"),
                ("built_from", "sha256"), ("inputs", "*", "path"), ("inputs", "*", "sha256"),
                ("inputs", "*", "files_sha256"), ("inputs", "*", "license", "*"),
                ("outputs", "*", "path"),
                ("outputs", "*", "files", "*"), ("files", "*"), ("steps", "*"), ("tool", "*"),
                ("machine", "*"))


_OPTIONAL = ("tool", "machine")


def lock_shape_problem(data: dict[str, Any]) -> str | None:
    """What in a lock's data is not of the shape tvrecipe writes (a digest that YAML reads
    as a number, a section that is not a mapping), or None."""
    def walk(value: Any, fields: tuple[str, ...], where: str) -> str | None:
        # (only keys that are there are walked: a field an older lock lacks is no problem,
        # but one left empty is, as tvrecipe never writes one empty)
        if not fields:
            if isinstance(value, str):
                return None
            return f"{where} should be text, got {'nothing' if value is None else repr(value)}"
        if value is None:  # (tool and machine only inform: a lock may go without them)
            return None if where in _OPTIONAL else f"{where} is empty"
        if not isinstance(value, dict):
            return f"{where} should be a mapping, got {value!r}"
        keys = list(value) if fields[0] == "*" else [fields[0]] if fields[0] in value else []
        for key in keys:
            wrong = walk(value[key], fields[1:], f"{where}.{key}" if where else str(key))
            if wrong:
                return wrong
        return None

    for fields in _TEXT_FIELDS:
        wrong = walk(data, fields, "")
        if wrong:
            return wrong
    return None


def diff_hashes(expected: dict[str, str], got: dict[str, str], where: str,
                compare: tuple[Path, Path] | None = None) -> list[str]:
    """Human lines for every file that is missing, extra or different.

    Args:
        compare: (the folder of ``got``, a folder whose files may hold the locked bytes):
            where a file of the second has them, a differing file says how it differs (the
            tensors, or only the metadata; a text file's first changed line).
    """
    lines = []
    for name in sorted(set(expected) | set(got)):
        if name not in got:
            lines.append(f"{where}/{name}: missing")
        elif name not in expected:
            lines.append(f"{where}/{name}: not in the lock")
        elif expected[name] != got[name]:
            how = _how_it_differs(compare, name, expected[name])
            lines.append(f"{where}/{name}: content differs from the lock "
                         f"(sha256 {got[name][:12]}…, locked {expected[name][:12]}…)"
                         + (f": {how}" if how else ""))
    return lines


def _how_it_differs(compare: tuple[Path, Path] | None, name: str, locked: str) -> str | None:
    if compare is None:
        return None
    from tvrecipe.store.compare import describe_difference
    here, reference = compare[0] / name, compare[1] / name
    try:
        if not reference.is_file() or sha256_file(reference) != locked:
            return None
    except OSError:
        return None
    return describe_difference(here, reference)


def run_lock_path(recipe: Path) -> Path:
    """``recipe.yaml`` → ``.tvrecipe/recipe.yaml.run.lock`` beside it: the file that
    :func:`take_run_lock` locks (one per recipe: two recipes of one folder run side by side)."""
    real = recipe.resolve()  # (a recipe reached through a link is the same recipe)
    return real.parent / ".tvrecipe" / f"{real.name}.run.lock"


def take_run_lock(recipe: Path, command: str) -> int | None:
    """Make sure no other process runs (or recomputes) ``recipe`` meanwhile: an exclusive,
    non-blocking ``flock`` on :func:`run_lock_path`, into which this process writes its host,
    pid, start time and ``command``. Returns the file descriptor holding the lock (closing it,
    or the process ending however it does, releases it), or None where nothing could be
    locked: Windows (no fcntl), a folder that takes no new file (a read-only checkout, whose
    run writes nothing anyway), a file system without locks.

    Raises:
        OutputError: another process holds the lock (naming it, from what it wrote).
    """
    try:
        import fcntl
    except ImportError:  # Windows: runs of one recipe are not kept apart there
        return None
    import errno
    import socket
    import time

    from tvrecipe.errors import OutputError
    path = run_lock_path(recipe)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)  # (no locks on this file system: nothing to keep apart with)
            return None
        try:
            holder = os.read(fd, 4096).decode("utf-8", "replace").split("\n")[0].split(" ", 3)
        except OSError:
            holder = []
        finally:
            os.close(fd)
        who = (f" (`tvrecipe {holder[3]}`, pid {holder[1]} on {holder[0]}, since {holder[2]})"
               if len(holder) == 4 else "")
        raise OutputError(f"{recipe.name} is being run by another tvrecipe{who}; wait for it to "
                          f"finish, then try again (nothing was done here; the lock is "
                          f"{path}, held while that process lives)") from None
    with contextlib.suppress(OSError):  # (who holds it: only for the message above)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()} "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n".encode())
    return fd
