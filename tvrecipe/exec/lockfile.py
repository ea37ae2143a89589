"""Reproducibility: the state a run depends on, the lock it writes, and checks against it."""

from __future__ import annotations

import os
import platform
from functools import cache, partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tvrecipe import __version__
from tvrecipe.errors import InputError, MissingPackage, OutputError, RecipeError, about
from tvrecipe.plan.graph import VECTORS_INDEX, Compiled
from tvrecipe.plan.keys import step_keys
from tvrecipe.plan.tensors import needed_models
from tvrecipe.store.checkpoint import open_checkpoint
from tvrecipe.store.hashing import HashMemo, checkpoint_digest
from tvrecipe.store.lock import diff_hashes, hash_tree, lock_path, read_lock, write_lock_temp
from tvrecipe.store.output import empty_folder
from tvrecipe.store.remote import RemotePath


def _version(package: str) -> str:
    try:
        return version(package).split("+")[0]
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


# The packages whose versions decide an output's bytes, as a lock names them: torch computes
# every kernel; numpy's eigenvalues pick cluster_basis's k (auto) and scikit-learn's spectral
# clustering its clusters, so another version of either may group the tasks otherwise.
PACKAGES = ("tvrecipe", "torch", "numpy", "scikit-learn")


# What a released folder's own lock records: the versions the lock of a rebuild must repeat
# byte for byte (numpy's and scikit-learn's stay in the recipe's lock, beside the machine, so
# that another numpy does not make a rebuild of an unclustered merge differ; Python's too,
# which computes none of the bytes: a patch release must not fail a rebuild).
RELEASE_TOOLS = ("tvrecipe", "torch")


def tool_versions(names: tuple[str, ...] | None = None) -> dict[str, str]:
    """The versions a lock records (read from package metadata: nothing is imported); only
    those of ``names`` (e.g. ``RELEASE_TOOLS``) when given."""
    versions = {"tvrecipe": __version__, **{p: _version(p) for p in PACKAGES[1:]},
                "python": platform.python_version()}
    return versions if names is None else {k: v for k, v in versions.items() if k in names}


def machine(device: str = "cpu") -> dict[str, str]:
    """Where a run computed, as its lock records it: the device (``cpu``, or ``cuda`` and the
    GPU's name) and this machine's CPU (architecture, vendor, widest vector instructions).
    Besides the versions, these decide the last bits of the ops that recipe-format.md lists
    under "CPU and GPU bytes" (MKL and torch pick kernels by vendor and instruction set)."""
    return {"device": device, "cpu": _cpu()}


def machines(each: list[dict[str, str]]) -> dict[str, str]:
    """One record for a run that computed on several machines (a cluster run: its workers
    and the client): each field's distinct values, sorted and joined by "; " (one value
    when they all agree)."""
    return {key: "; ".join(sorted({m[key] for m in each})) for key in ("device", "cpu")}


@cache  # (the same all run long: a cluster's worker reports it with every task)
def _cpu() -> str:
    arch = platform.machine() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux
        return arch
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2", "asimd") if f in flags), "")
    return " ".join(p for p in (arch, fields.get("vendor_id", ""), isa) if p)


_MIXED = ("which worker computes which tensors is not fixed, so a run on several kinds of CPU "
          "may round differently each time;")


def machine_differences(lock: dict[str, Any], here: dict[str, str] | None) -> list[str]:
    """Why a recompute may have given other bytes than the lock: other versions, another
    device or another CPU than the run that wrote it (``here``: where the recompute ran, as
    :func:`machine` or :func:`machines` records it).

    Only a recipe's lock records its machine: an output folder's own ``tvrecipe.lock`` is
    one of its files, which must come out the same wherever it is rebuilt, so for those
    (``here`` None) only the versions are compared."""
    lines = []
    tool = lock.get("tool")
    locked_tools, tools = changed_tools(tool)
    if locked_tools:
        lines.append(f"the lock was written by {locked_tools} and this is {tools}; another "
                     "version may compute an op differently: install the locked versions")
    locked = lock.get("machine") if here else None
    if not (isinstance(locked, dict) and isinstance(locked.get("device"), str)
            and isinstance(locked.get("cpu"), str)):
        return lines
    was, now = locked["device"], here["device"]
    if was != now and was.startswith("cuda") and now.startswith("cuda"):
        lines.append(f"the lock was written on {was} and this run computed on {now}: cuBLAS "
                     "and cuSOLVER may round differently on another GPU; recompute on a GPU "
                     "like the lock's")
    elif was != now:
        lines.append(f"the lock was written on {was} and this run computed on {now}: the ops "
                     "listed in docs/recipe-format.md (\"CPU and GPU bytes\") may differ in "
                     f"the last bits between them; recompute with --device {was.split()[0]}")
    elif now == "cpu" and locked["cpu"] != here["cpu"]:
        mixed = "; " in locked["cpu"]  # (several kinds of CPU: a cluster run's)
        this = "this recompute ran on CPUs" if "; " in here["cpu"] else "this is"
        lines.append(f"the lock was written on CPU{'s' if mixed else ''} {locked['cpu']} and "
                     f"{this} {here['cpu']}: MKL and torch pick their kernels by CPU vendor "
                     "and instruction set, so a product or a sum may round differently; " + (
                         f"{_MIXED} recompute on one of them" if mixed else
                         "recompute on a CPU like the lock's"))
    elif now == "cpu" and "; " in locked["cpu"]:
        lines.append(f"the lock was written on CPUs {locked['cpu']}, as this recompute ran: "
                     f"{_MIXED} a run on one kind of CPU (a local run, or workers alike) "
                     "repeats its bytes")
    if not lines:
        lines.append("the versions, device and CPU are those of the run that wrote the lock; "
                     "if that run took steps from a cache filled on another machine or device, "
                     "their bytes are that machine's (`tvrecipe run --no-cache --force` writes "
                     "outputs and a lock from this machine alone); if not, please report this "
                     "with the recipe")
    return lines


def hash_memo(compiled: Compiled, reuse: bool = True) -> HashMemo:
    """The hash memo beside the recipe (``.tvrecipe/hashes.json``), so inputs hash once
    (``reuse`` False: every input hashed again, and the memo told what was found)."""
    return HashMemo(compiled.loaded.root / ".tvrecipe" / "hashes.json", reuse)


def hashed_files(path: Path | RemotePath, kind: str,
                 members: tuple[str, ...] | None = None) -> list[Path]:
    """The files a model's content hash covers: a LoRA adapter's factors and its config (the
    scales); a vectors set's members and its vectors.json (their order is the set's, which
    ops depend on); a checkpoint's or vector's weight files.

    Raises:
        InputError, MissingPackage: The files cannot be found or read.
    """
    if kind == "lora":
        from tvrecipe.store.lora import adapter_files
        return adapter_files(path)
    if members:
        return [path / f"{m}.safetensors" for m in members] + [path / VECTORS_INDEX]
    with open_checkpoint(path) as ck:
        return list(ck.files)


def _model_files(compiled: Compiled, name: str) -> list[Path]:
    spec = compiled.models[name]
    path = compiled.loaded.resolve(spec.path)
    if spec.kind == "task_vector" and isinstance(path, Path) and not path.exists():
        raise InputError(f"model {name!r} ({spec.path}): {path} does not "
                         "exist yet; a task_vector folder is the vector or vectors output of "
                         "a recipe: run that recipe first (or check the path)")
    try:
        return hashed_files(path, spec.kind, compiled.model_types[name].members)
    except InputError as exc:
        raise InputError(f"model {name!r} ({spec.path}): {exc}") from None
    except MissingPackage as exc:  # a URL whose scheme needs a package
        raise about(exc, f"model {name!r} ({spec.path})") from None


def _copy_sources(compiled: Compiled) -> set[str]:
    """The models whose non-weight files some output copies."""
    from tvrecipe.exec.results import copy_source
    return {m for spec, res in compiled.outputs.values()
            if (m := copy_source(compiled, spec, res)) is not None}


def run_state(compiled: Compiled, memo: HashMemo | None = None) -> dict[str, Any]:
    """What a run's result depends on: the recipe's hash, input hashes and step keys.

    An input's entry is the ``path`` the recipe gives (a URL for a remote model) and the
    content hash of its files (read in full once, then memoised; see ``HashMemo``).
    """
    memo = memo or hash_memo(compiled)
    inputs = {}
    digests = {}
    for name in needed_models(compiled):
        files = _model_files(compiled, name)
        try:
            digests[name] = checkpoint_digest(files, memo=memo)
        except (InputError, MissingPackage) as exc:
            raise about(exc, f"model {name!r} ({compiled.models[name].path})") from None
        inputs[name] = {"path": compiled.models[name].path, "sha256": digests[name]}
    # The non-weight files (config, tokenizer, ...) outputs copy from a model: not in its
    # hash (they change no tensor, and no step's key), but a change to them is a change to
    # those outputs.
    for name in sorted(_copy_sources(compiled) & set(inputs)):
        folder = compiled.loaded.resolve(compiled.models[name].path)
        if not isinstance(folder, Path) or not folder.is_dir():
            continue  # (a URL's are read as they are; a file has none)
        from tvrecipe.store.output import plan_aux_files
        files = [folder / f for f in plan_aux_files(folder).copy]
        if files:
            inputs[name]["files_sha256"] = checkpoint_digest(files, memo=memo)
    # The license a release's card takes from a model's README: a change to it is a change
    # to those outputs (the README's other text is not).
    from tvrecipe.exec.release import license_conflict, license_source, model_license
    conflicts = [c for c in map(partial(license_conflict, compiled), compiled.outputs) if c]
    if conflicts:
        raise RecipeError(conflicts)
    for name in sorted({license_source(compiled, o) for o in compiled.outputs} - {None}):
        licensing = model_license(compiled, name) if name in inputs else {}
        if licensing:
            inputs[name]["license"] = licensing
    keys = step_keys(compiled, digests)
    return {"recipe": {"file": compiled.loaded.path.name,
                       "sha256": compiled.loaded.text_sha256,
                       "content_sha256": compiled.loaded.content_sha256},
            "inputs": inputs,
            "steps": {n: keys[n] for n in compiled.steps}}


def only_the_text_changed(compiled: Compiled, state: dict[str, Any]) -> bool:
    """Whether the recipe's text changed since the lock but not what it says (a comment,
    layout): the same content hash, inputs, steps and outputs as locked, and each released
    folder's own recipe as this one would write it. Its outputs are then what a run would
    write, byte for byte: only the lock needs the new text's hash
    (:func:`relock_text`). The outputs' own state is checked by the caller."""
    from tvrecipe.exec.release import RECIPE_FILE, pinned_recipe
    from tvrecipe.exec.results import releases
    lock = read_lock(lock_path(compiled.loaded.path))
    recipe = lock.get("recipe") or {}
    if (recipe.get("content_sha256") != state["recipe"]["content_sha256"]
            or recipe.get("file") != state["recipe"]["file"]
            or recipe.get("sha256") == state["recipe"]["sha256"]
            or lock.get("inputs") != state["inputs"] or lock.get("steps") != state["steps"]
            or sorted(lock.get("outputs") or {}) != sorted(compiled.outputs)):
        return False
    digests = {m: e["sha256"] for m, e in state["inputs"].items()}
    for name, (spec, _res) in compiled.outputs.items():
        if lock["outputs"][name].get("path") != spec.path:
            return False
        if releases(compiled, name):
            folder = compiled.loaded.resolve(spec.path)
            try:
                written = (folder / RECIPE_FILE).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                return False
            if written != pinned_recipe(compiled, name, digests):
                return False  # (keys reordered: the folder's recipe and card show the order)
    return True


def relock_text(compiled: Compiled, state: dict[str, Any]) -> None:
    """The lock, with the recipe's new text hash (:func:`only_the_text_changed`)."""
    path = lock_path(compiled.loaded.path)
    data = {k: v for k, v in read_lock(path).items() if k != "lock_version"}
    data["recipe"] = state["recipe"]
    try:
        os.replace(write_lock_temp(path, data), path)
    except OSError as exc:
        raise OutputError(f"cannot write the lock file {path}: {exc.strerror or exc}; check "
                          f"the permissions of {path.resolve().parent}") from exc


class StagedLock:
    """A run's lock, written beside the lock file before the outputs are renamed into place:
    :meth:`commit` moves it there once they are, :meth:`discard` drops it when they are not
    (so outputs and lock stay all old or all new, even on a full disk)."""

    def __init__(self, tmp: Path | None, path: Path | None, memo: HashMemo,
                 digests: dict[str, dict[str, str]] | None):
        self.tmp, self.path, self.memo, self.digests = tmp, path, memo, digests

    def commit(self, outputs: dict[str, Path]) -> None:
        """The outputs are in place (``outputs``: their folders): the lock goes too, and the
        memo learns the digests of their files, hashed as they were written (a memo that
        cannot be saved is only slower)."""
        if self.tmp is not None:
            try:
                os.replace(self.tmp, self.path)
            except OSError as exc:
                raise OutputError(
                    f"cannot write the lock file {self.path}: {exc.strerror or exc}; check "
                    f"the permissions of {self.path.resolve().parent} (no output was "
                    "replaced)") from exc
            self.tmp = None
        remember_digests(outputs, self.digests, self.memo)

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def sweep_dead_runs(compiled: Compiled) -> None:
    """Clears what runs of this recipe killed on this host left (SIGKILL, a power cut) before
    the lock is compared with the outputs: every output's staging and aside folders (one
    killed between its outputs and its lock gets its previous outputs back), then the lock's
    staged file, whose presence told the outputs that the lock never went in."""
    from tvrecipe.store.output import sweep_dead_staging
    for spec, _res in compiled.outputs.values():
        target = compiled.loaded.resolve(spec.path)
        if isinstance(target, Path) and target.parent.is_dir():
            sweep_dead_staging(target.parent, target.name)
    path = lock_path(compiled.loaded.path)
    if path.parent.is_dir():
        sweep_dead_staging(path.parent, path.name)


def stage_run_lock(compiled: Compiled, state: dict[str, Any], staged: dict[str, Path],
                   memo: HashMemo | None = None,
                   digests: dict[str, dict[str, str]] | None = None,
                   where: dict[str, str] | None = None,
                   allow_nonfinite: bool = False) -> StagedLock:
    """Write ``<recipe>.lock`` of a successful run to a temporary file beside it, before its
    outputs are moved into place; :meth:`StagedLock.commit` then renames it.

    Args:
        staged: Each output's staging folder (its files as they will be in place).
        digests: Per output, SHA-256 of files by path in its folder, hashed as they were
            written (the other files, small ones such as the model card, are read here).
        where: Where the run computed (:func:`machine`, :func:`machines`); None: here, on
            the CPU.
        allow_nonfinite: The run let NaN or Inf in its inputs through: recorded (only then),
            so that ``verify --recompute`` lets them through too.

    Raises:
        OutputError: The lock cannot be written (a full or read-only disk): nothing is left.
    """
    memo = memo or hash_memo(compiled)
    known = digests or {}
    data = {**state,
            "outputs": {name: {"path": compiled.outputs[name][0].path,
                               "files": hash_tree(folder, known=known.get(name))}
                        for name, folder in sorted(staged.items())},
            "tool": tool_versions(), "machine": where or machine()}
    if allow_nonfinite:
        data["allow_nonfinite"] = True
    path = lock_path(compiled.loaded.path)
    try:
        tmp = write_lock_temp(path, data)
    except OSError as exc:
        raise OutputError(f"cannot write the lock file {path}: "
                          f"{exc.strerror or exc}; check the space on its disk and the "
                          f"permissions of {path.resolve().parent} (no output was replaced)") from exc
    return StagedLock(tmp, path, memo, digests)


def remember_digests(folders: dict[str, Path], digests: dict[str, dict[str, str]] | None,
                     memo: HashMemo) -> None:
    """Record in ``memo`` the SHA-256 of files hashed as they were written (per output, by
    path in its folder ``folders[name]``), so that they are not read again to hash them."""
    known = []
    for name, folder in folders.items():
        if not folder.is_dir():
            continue
        memo.forget_written(str(folder.resolve()))  # (the previous output's files)
        # (every file of the folder: the small ones not hashed as written are read here,
        # so that the memo knows the whole output as tvrecipe wrote it)
        files = hash_tree(folder, known=(digests or {}).get(name))
        for rel, digest in files.items():
            path = (folder / rel).resolve()
            known.append((str(path), path.stat(), digest))
    if known:
        memo.put_many(known, written=True)


def staged_differences(compiled: Compiled,
                       staged: dict[str, tuple[Path, dict[str, str]]]) -> list[str]:
    """How outputs a run has written but not yet moved into place differ from the lock
    (``run --locked`` making outputs that are not there, as in a fresh checkout): per
    output, its staging folder and the digests of the files hashed as written. Empty when
    every output is, file for file, as locked."""
    memo = HashMemo(None)
    folders = {name: folder for name, (folder, _d) in staged.items()}
    remember_digests(folders, {name: digests for name, (_f, digests) in staged.items()}, memo)
    return output_differences(compiled, memo, folders, prefix="")


def absent_outputs(compiled: Compiled) -> set[str]:
    """Outputs not made yet here (as in a fresh checkout): their path does not exist, or is
    an empty folder."""
    return {name for name, (spec, _res) in compiled.outputs.items()
            if _absent(compiled.loaded.resolve(spec.path))}


def _absent(target: Path) -> bool:
    return not os.path.lexists(target) or empty_folder(target)


def state_differences(compiled: Compiled, state: dict[str, Any]) -> list[str]:
    """How the current recipe and inputs differ from the lock (empty when they match)."""
    lock = read_lock(lock_path(compiled.loaded.path))
    lines = []
    if lock.get("recipe", {}).get("sha256") != state["recipe"]["sha256"]:
        lines.append(f"the recipe {compiled.loaded.path.name} changed since the lock was written")
    elif lock.get("recipe", {}).get("file") != state["recipe"]["file"]:
        lines.append(f"the recipe was renamed from {lock.get('recipe', {}).get('file')} to "
                     f"{state['recipe']['file']} (the outputs record its file name)")
    old_inputs = lock.get("inputs", {})
    for name in sorted(set(old_inputs) | set(state["inputs"])):
        old, new = old_inputs.get(name), state["inputs"].get(name)
        if old is None:
            lines.append(f"input {name!r} is new")
        elif new is None:
            lines.append(f"input {name!r} is no longer used")
        elif old.get("sha256") != new["sha256"]:
            lines.append(f"input {name!r} ({new['path']}) changed: sha256 {new['sha256'][:12]}…, "
                         f"locked {str(old.get('sha256'))[:12]}…")
        elif old.get("files_sha256") != new.get("files_sha256"):
            lines.append(f"input {name!r} ({new['path']}): its non-weight files (config, "
                         "tokenizer, …), which outputs copy, changed")
        elif old.get("license") != new.get("license"):
            lines.append(f"input {name!r} ({new['path']}): the license in its README.md, "
                         "which a release's model card takes, changed")
    same_sources = not lines
    old_steps = lock.get("steps", {})
    for name, key in state["steps"].items():
        if old_steps.get(name) != key:
            lines.append(f"step {name!r} changed (key {key}, locked {old_steps.get(name)})")
    # (Step keys move with an op's version, which comes with tvrecipe, or a plugin's torch.)
    locked_tools, tools = changed_tools(lock.get("tool"), ("tvrecipe", "torch"))
    if same_sources and lines and locked_tools:
        # Same recipe and inputs, other step keys: an op's version moved with the tools.
        lines.append(
            f"the recipe and inputs are as locked; the lock was written by {locked_tools} and "
            f"this is {tools}, whose ops may compute these steps differently (each op's version:"
            " `tvrecipe ops OP`); `tvrecipe run` without --locked writes a new lock, or install "
            "the locked versions to reproduce it")
    return lines


def changed_tools(locked: object, packages: tuple[str, ...] = PACKAGES) -> tuple[str, str]:
    """Those of ``packages`` whose versions in a lock's ``tool`` entry differ from this
    installation's, as the lock records them and as installed (``tvrecipe X and torch Y``,
    ``torch X, numpy Y and scikit-learn Z``); two empty strings when none differs. Only the
    packages the lock records count (a lock of an earlier tvrecipe records no numpy)."""
    if not isinstance(locked, dict):
        return "", ""
    here = tool_versions()
    differ = [p for p in packages if p in locked and str(locked[p]) != here[p]]
    return (_listed([f"{p} {locked[p]}" for p in differ]),
            _listed([f"{p} {here[p]}" for p in differ]))


def _listed(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(filter(None, [", ".join(items[:-1]), *items[-1:]]))


def written_outputs(compiled: Compiled, memo: HashMemo | None = None,
                    stale: set[str] | frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Outputs whose folder exists at a path this recipe's lock says it wrote (under the
    output's name, or another name: an output renamed in the recipe), each with how it
    differs from the lock (empty when every file's hash is as locked, no file more or less).

    An unchanged one may be replaced by a rerun without ``--force``; a changed one, or a
    folder the lock does not list, still needs ``--force``. ``stale``: outputs a run here
    wrote under an earlier lock (:func:`stale_outputs`), unchanged as well.
    """
    path = lock_path(compiled.loaded.path)
    if not path.is_file():
        return {}
    memo = memo or hash_memo(compiled)
    locked = read_lock(path).get("outputs", {})
    written = {}
    for name, (spec, _res) in compiled.outputs.items():
        target = compiled.loaded.resolve(spec.path)
        # (the lock's entry of that name, else one for the same path: an output renamed in
        # the recipe still owns the folder it wrote)
        entries = [locked.get(name)] + [e for n, e in sorted(locked.items()) if n != name]
        entry = next((e for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)
                      and compiled.loaded.resolve(e["path"]) == target), None)
        if entry is None or _absent(target):
            continue
        got = hash_tree(target, memo) if target.is_dir() else {}
        written[name] = diff_hashes(entry.get("files") or {}, got, spec.path)
    for name in stale & set(written):
        written[name] = []  # (as a run here wrote it, under an earlier lock)
    return written


def stale_outputs(compiled: Compiled, memo: HashMemo) -> set[str]:
    """Outputs that differ from the lock but are, file for file, as a run of tvrecipe here
    wrote them (the memo says so; no file changed since): written under an earlier lock (a
    `git pull` or checkout brought a new one). Such a folder holds nothing made by hand, so a
    run replaces it as it does an absent one, without ``--force``."""
    path = lock_path(compiled.loaded.path)
    if not path.is_file():
        return set()
    locked = read_lock(path).get("outputs", {})
    stale = set()
    for name, (spec, _res) in compiled.outputs.items():
        target = compiled.loaded.resolve(spec.path)
        if not isinstance(target, Path) or not target.is_dir() or _absent(target):
            continue
        got = hash_tree(target, memo)
        entry = locked.get(name)
        if isinstance(entry, dict) and got == (entry.get("files") or {}):
            continue  # (as locked: not stale)
        files = [target / rel for rel in got]
        try:
            # (every file as written, and none of those written since removed)
            if (files and all(memo.wrote(str(f.resolve()), f.resolve().stat()) for f in files)
                    and all(os.path.exists(k) for k in memo.written_under(str(target.resolve())))):
                stale.add(name)
        except OSError:
            continue
    return stale


def output_differences(compiled: Compiled, memo: HashMemo | None = None,
                       folders: dict[str, Path] | None = None,
                       skip: set[str] | frozenset[str] = frozenset(),
                       prefix: str = "recomputed ") -> list[str]:
    """How the outputs on disk differ from the lock (empty when they match byte for byte).

    Args:
        memo: Hash memo to use; ``None`` uses the one beside the recipe. Pass
            ``HashMemo(None)`` to read every byte again.
        folders: Output name -> folder to check instead of the recipe's path (a recomputed
            copy); differences are then reported under ``<prefix><path>``.
        skip: Outputs not to check.
        prefix: What ``folders`` hold: ``recomputed`` copies, or ``""`` for the outputs of
            this run not yet moved into place (``run --locked``).
    """
    memo = memo or hash_memo(compiled)
    lock = read_lock(lock_path(compiled.loaded.path))
    lines = []
    locked = lock.get("outputs", {})
    for name, (spec, _res) in compiled.outputs.items():
        if name in skip:
            continue
        target = (folders or {}).get(name) or compiled.loaded.resolve(spec.path)
        label = f"{prefix}{spec.path}" if folders else spec.path
        if name not in locked:
            lines.append(f"output {name!r} is not in the lock")
            continue
        got = hash_tree(target, memo, hidden=False) if target.is_dir() else {}
        if not got:
            lines.append(f"output {name!r}: {label} is missing")
            continue
        # (a recomputed copy is compared with the output in place, where that has the
        # locked bytes: to say what differs)
        compare = (target, compiled.loaded.resolve(spec.path)) if folders else None
        lines += diff_hashes(locked[name]["files"], got, label, compare)
    return lines
