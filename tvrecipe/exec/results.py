"""What a run is given and gives back, and the outputs it writes: shared by both executors.

Nothing here imports torch: the numpy executor (:mod:`tvrecipe.exec.light`) runs without it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvrecipe import __version__
from tvrecipe.errors import ExecutionError, InputError, OutputError
from tvrecipe.exec.release import Source, write_release
from tvrecipe.plan.graph import CHECKPOINT, VECTOR, VECTORS, Compiled, CompiledStep, Resolved
from tvrecipe.plan.tensors import TensorPlan
from tvrecipe.spec.models import OutputSpec
from tvrecipe.store.cache import TensorCache
from tvrecipe.store.checkpoint import TensorInfo, dtype_size
from tvrecipe.store.lora import AdapterError
from tvrecipe.store.output import (
    MODEL_CARD_FILES,
    OutputFolder,
    copy_aux_files,
    deferred_interrupts,
    fix_copied_config,
    plan_aux_files,
)
from tvrecipe.store.writer import CheckpointWriter, SafetensorsStreamWriter, TensorSpec, parse_size

# Recipe dtype names -> safetensors dtype strings.
ST_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}


@dataclass
class RunOptions:
    """How to run: everything that is not in the recipe itself."""

    force: bool = False
    device: str | None = None
    progress: bool = False
    allow_nonfinite: bool = False
    cache: TensorCache | None = None
    keys: dict[str, str] | None = None  # step keys (plan.keys.step_keys); needed by the cache
    # Output name -> folder to write it to instead of its recipe path (verify --recompute).
    targets: dict[str, Path] | None = None
    # Outputs whose existing folder may be replaced without ``force``: the lock says this
    # recipe wrote them and they are unchanged since (lockfile.written_outputs).
    replaceable: frozenset[str] = frozenset()
    # lockfile.run_state of this run (input hashes, step keys), for the lock entry a checkpoint
    # output carries; computed when a checkpoint output needs it and it is None.
    state: dict[str, Any] | None = None
    # The recipe the outputs' headers and lock entries name; None: the recipe being run. A
    # rebuild from an output folder's own tvrecipe.yaml passes the original's.
    source: Source | None = None
    # Where to run: a Dask scheduler address (``tcp://host:8786``) or ``local:N``; None runs
    # in this process. Never part of the recipe: it changes no key and no byte of output.
    cluster: str | None = None
    # Bytes a whole-model pass may keep of the blocks it computed (task vectors) for the merge
    # pass, which then neither reads nor computes them again (0: none; see Runner.carry).
    # Changes no byte of output.
    reuse_memory: int = 0
    # Called with the outputs' staging folders and their files' digests just before the
    # outputs are renamed into place, in the same step that Ctrl-C cannot split; returns
    # what to commit once they are in place, or to discard if they are not (the CLI stages
    # the lock: lockfile.StagedLock). Also given where the run computed (lockfile.machine's
    # record: the device, ``cpu`` or ``cuda (GPU name)``, and the CPU; a cluster run's names
    # its workers'), for the lock.
    committed: Callable[[dict[str, Path], dict[str, dict[str, str]], dict[str, str]],
                        Any] | None = None
    # Called before anything is moved into place, with each output's staging folder and the
    # digests of its files hashed as written, and where the run computed; raising refuses
    # the outputs (run --locked: they must come out as the lock says).
    check_staged: Callable[[dict[str, tuple[Path, dict[str, str]]], dict[str, str]],
                           None] | None = None


def releases(compiled: Compiled, output: str) -> bool:
    """Whether an output carries its model card, recipe and lock entry (a checkpoint, or a
    peft adapter, unless ``model_card: false``)."""
    spec, res = compiled.outputs[output]
    kind = res.type.kind
    return ((kind == CHECKPOINT or (kind == VECTOR and spec.format == "peft"))
            and spec.model_card is not False)


def with_state(compiled: Compiled, options: RunOptions) -> RunOptions:
    """``options`` with the run state (input hashes, step keys) that a released output's
    lock entry records, taken now, before the run: once a step such as ``cluster_basis``
    with ``k: auto`` has run, its members are known and the keys after it would differ from
    the recipe's lock."""
    if options.state is not None or not any(releases(compiled, n) for n in compiled.outputs):
        return options
    from dataclasses import replace

    from tvrecipe.exec import lockfile
    return replace(options, state=lockfile.run_state(compiled))


def commit_outputs(outputs: dict[str, Output], options: RunOptions,
                   where: dict[str, str]) -> dict[str, Path]:
    """Check the outputs (``options.check_staged``), then rename every output into place and
    call ``options.committed`` (with ``where``, where the run computed), as one step: an
    interrupt that lands meanwhile takes effect after it, so the outputs and the lock agree
    (all old or all new) and no moved-aside previous output is left behind."""
    if options.check_staged is not None:
        options.check_staged({n: (o.folder.staging, o.digests) for n, o in outputs.items()},
                             where)
    with deferred_interrupts():
        # (the lock is written first, beside its place: a disk that takes no lock stops the
        # run here, with every previous output still in place)
        lock = None if options.committed is None else options.committed(
            {n: o.folder.staging for n, o in outputs.items()},
            {n: o.digests for n, o in outputs.items()}, where)
        # Every output in place with its previous one kept aside, then the lock, then the
        # previous ones go: one that cannot go in puts the others' previous outputs back.
        swapped: list[Output] = []
        paths = {name: o.folder.target for name, o in outputs.items()}
        try:
            for o in outputs.values():
                o.folder.swap(None if lock is None else lock.tmp)
                swapped.append(o)
            if lock is not None:
                lock.commit(paths)
        except BaseException as exc:
            if lock is not None:
                lock.discard()
            _take_back(swapped, exc)
            raise
        for o in swapped:
            o.folder.finish()
    return paths


def _take_back(swapped: list[Output], cause: BaseException) -> None:
    """Undo the swaps of a commit that failed (``cause``), the last first: every one is
    tried, and those that could not be undone are named together (with where each previous
    output was kept), so that none is lost unsaid."""
    kept = []
    for o in reversed(swapped):
        try:
            o.folder.unswap()
        except OutputError as exc:
            kept.append(str(exc))
    if kept:
        raise OutputError(f"{cause}; then putting the previous outputs back failed: "
                          + "; ".join(kept)) from cause


def abort_outputs(outputs: dict[str, Output]) -> None:
    """A failed run: abort every output, the last made first (so the folders made for them
    go too)."""
    for o in reversed(outputs.values()):
        o.abort()


@dataclass
class RunResult:
    """What a run did."""

    outputs: dict[str, Path]
    reports: dict[str, dict]
    device: str
    seconds: float
    bytes_read: int = 0
    bytes_written: int = 0
    passes: list[str] = field(default_factory=list)
    cache_hits: list[str] = field(default_factory=list)
    # output -> file path in its folder -> SHA-256, for the files hashed while written
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    # output -> what writing it found (a peft adapter's rank and error per tensor)
    output_reports: dict[str, dict] = field(default_factory=dict)
    # A cluster run: worker address -> tasks, seconds, bytes read and staged on it.
    workers: dict[str, dict] = field(default_factory=dict)
    # Where it computed (lockfile.machine's record; a cluster run's names its workers').
    machine: dict[str, str] = field(default_factory=dict)


# Largest value and machine epsilon of each stored floating dtype (bfloat16 has no numpy type).
_FLOAT_RANGE = {"F16": (65504.0, 2.0 ** -10), "BF16": (3.3895313892515355e38, 2.0 ** -7),
                "F32": (3.4028234663852886e38, 2.0 ** -23),
                "F64": (1.7976931348623157e308, 2.0 ** -52)}


def check_written_range(output: str, tensor: str, dtype: str | None, lo: float, hi: float,
                        compute_max: float) -> None:
    """Refuse an output value whose smallest and largest entries (``lo``, ``hi``; NaN if
    any entry is NaN) are not finite, or overflow the stored ``dtype`` (safetensors name),
    though every input was finite: an overflowing weight or scale, or a float16 output of
    large values. Both executors (torch, and numpy for cached reruns) call it, so a rerun
    refuses what the first run refused.

    Raises:
        ExecutionError: Which output and tensor, and what to do.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ExecutionError(
            f"output {output!r}: tensor {tensor!r} holds Inf or NaN though every input "
            "was finite: check the weights and scales of the steps before it, or pass "
            "--allow-nonfinite to write it anyway")
    top, eps = _FLOAT_RANGE.get(dtype or "", (math.inf, 0.0))
    if top >= compute_max:
        return
    # max = (2 - eps)·2^e; round to nearest makes max + half an ulp (eps·2^e / 2) Inf.
    limit = top + eps * top / (2 - eps) / 2
    if -limit < lo and hi < limit:
        return
    name = {v: k for k, v in ST_DTYPES.items()}.get(dtype, dtype)
    raise ExecutionError(
        f"output {output!r}: tensor {tensor!r} has values up to {max(abs(lo), abs(hi)):.3g}, "
        f"which {name} cannot hold (from {limit:.5g} on they round to Inf): write it as "
        "float32 or bfloat16, or pass --allow-nonfinite to write Inf")


def check_tensor_range(output: str, tensor: str, dtype: str | None, t: Any) -> None:
    """:func:`check_written_range` of a floating torch tensor, before it is cast to ``dtype``
    (the torch executor's writers, and a cluster worker that stages cast bits)."""
    import torch

    lo, hi = (float(v) for v in torch.aminmax(t.reshape(-1)))
    check_written_range(output, tensor, dtype, lo, hi, torch.finfo(t.dtype).max)


class Output:
    """One output being written: its staging folder and writers.

    Args:
        compute: The safetensors dtype of the compute dtype (what vectors are stored in when
            the output names no dtype).
    """

    def __init__(self, name: str, compiled: Compiled, plan: TensorPlan, options: RunOptions,
                 compute: str, metadata: dict[str, str]):
        spec, res = compiled.outputs[name]
        self.name, self.spec, self.res = name, spec, res
        self.compiled = compiled
        self.options = options
        self.report: dict | None = None  # what writing it found (a peft adapter's ranks)
        self.written_at_close = 0  # bytes of files written whole at the end (an adapter)
        force = options.force or name in options.replaceable
        target = (options.targets or {}).get(name)
        self.kind = res.type.kind
        self.target = target or compiled.loaded.resolve(spec.path)
        protected = [m.path for m in plan.models.values()] + [compiled.loaded.path]
        self.folder = OutputFolder(self.target, force=force, protected=protected)
        out_dtype = ST_DTYPES[spec.dtype] if spec.dtype else None
        meta = {**metadata, "tvrecipe.output": name, "tvrecipe.from": spec.from_,
                "tvrecipe.kind": self.kind}
        self.writers: dict[str, Any] = {}
        # SHA-256 of the weight files and index by path in the folder, hashed as written.
        self.digests: dict[str, str] = {}
        try:
            self._open_writers(plan, compute, out_dtype, meta)
        except BaseException:
            self.abort()
            raise

    def _open_writers(self, plan: TensorPlan, compute: str, out_dtype: str | None,
                      meta: dict[str, str]) -> None:
        spec, res = self.spec, self.res
        if self.kind == CHECKPOINT:
            specs = [TensorSpec(t, out_dtype or info.dtype if info.is_floating else info.dtype,
                                info.shape) for t, info in plan.tensors.items()]
            self.dtypes = {sp.name: sp.dtype for sp in specs}  # stored dtype of each tensor
            self.sizes = {sp.name: dtype_size(sp.dtype) for sp in specs}
            self.writers[""] = CheckpointWriter(self.folder.staging, specs,
                                                shard_size=parse_size(spec.shard_size),
                                                metadata={**meta, "format": "pt"})
        elif self.kind == VECTOR and spec.format == "peft":
            from tvrecipe.exec.release import (
                card_options,
                model_config,
                vector_base,
                vector_base_id,
            )
            from tvrecipe.spec.models import RankEnergy
            from tvrecipe.spec.pertensor import value_at
            from tvrecipe.store.lora import (
                AdapterWriter,
                bare_prefix,
                conv1d_layers,
                peft_task_type,
            )
            rank: Any = None
            energy = spec.rank.energy if isinstance(spec.rank, RankEnergy) else None
            if isinstance(spec.rank, int):
                rank = spec.rank
            elif energy is None:  # a rank per tensor: a gradient or rules

                def rank(tensor: str, value: Any = spec.rank, output: str = self.name) -> int:
                    try:
                        return max(1, round(value_at(value, tensor, plan.layers, default=None)))
                    except LookupError as exc:  # rules without a default: as a step's
                        raise ExecutionError(f"output {output!r}, tensor {tensor!r}: rank: "
                                             f"{exc}; end the rules with a default "
                                             "{value: ...}") from None
            card = card_options(spec).get("base_model")
            base = (spec.base_model or (card[0] if isinstance(card, list) and card else card)
                    or vector_base_id(self.compiled, res.node))
            full = None
            if spec.full_tensors == "save":
                from tvrecipe.store.checkpoint import open_checkpoint
                full = open_checkpoint(self.compiled.loaded.resolve(
                    self.compiled.models[spec.base].path))
            stored = out_dtype or "F32"  # (the factors, computed in float32, stored so)
            self.dtypes = dict.fromkeys(plan.floating, stored)
            self.sizes = dict.fromkeys(plan.floating, 0)  # the factors' bytes come at close
            # (GPT-2's Conv1D layers, known by the base's architecture, get peft's
            # fan_in_fan_out factors)
            arch = model_config(self.compiled,
                                spec.base or vector_base(self.compiled, res.node))
            self.writers[""] = AdapterWriter(
                self.folder.staging, {t: plan.tensors[t].shape for t in plan.floating},
                rank, energy, base, meta, full_base=full, dtype=stored,
                conv1d=conv1d_layers(arch.get("model_type")), task_type=peft_task_type(arch),
                prefix=bare_prefix(arch, plan.tensors))
        else:
            dt = out_dtype or compute
            specs = [TensorSpec(t, dt, plan.tensors[t].shape) for t in plan.floating]
            self.dtypes = dict.fromkeys(plan.floating, dt)
            self.sizes = dict.fromkeys(plan.floating, dtype_size(dt))
            members = [""] if self.kind == VECTOR else list(res.type.members or ())
            for m in members:
                if m:
                    self.writers[m] = SafetensorsStreamWriter(
                        self.folder.staging / f"{m}.safetensors", specs,
                        {**meta, "format": "pt", "tvrecipe.member": m})
                else:
                    self.writers[m] = CheckpointWriter(self.folder.staging, specs,
                                                       shard_size=parse_size(spec.shard_size),
                                                       metadata={**meta, "format": "pt"})

    def write(self, tensor: str, info: TensorInfo, value: Any) -> int:
        written = 0
        for m, t in written_members(self.kind, info, value):
            if hasattr(t, "detach"):  # a torch tensor (the numpy executor gives arrays)
                t = t.detach()
                if not self.options.allow_nonfinite and t.is_floating_point() and t.numel():
                    check_tensor_range(self.name, tensor, self.dtypes.get(tensor), t)
                if t.device.type != "cpu":
                    t = t.cpu()
                numel = t.numel()
            else:
                numel = t.size
            with self._adapter_errors():
                self.writers[m].write(tensor, t)
            written += numel * self.sizes[tensor]  # bytes on disk, after the cast
        return written

    @contextmanager
    def _adapter_errors(self) -> Iterator[None]:
        """A vector a peft adapter cannot hold (AdapterError) as a runtime error naming the
        output: raised by the adapter writer as tensors come in, or at its close."""
        try:
            yield
        except AdapterError as exc:
            raise ExecutionError(f"output {self.name!r} (peft adapter): {exc}") from exc

    def abort(self) -> None:
        """A failed run: close the files being written, unchecked, and remove the staging
        folder (an earlier output at the target stays as it was)."""
        for w in self.writers.values():
            abort = getattr(w, "abort", None)
            if abort is not None:
                abort()
        self.folder.abort()

    def finish(self, compiled: Compiled, report: dict | None) -> None:
        for w in self.writers.values():
            with self._adapter_errors():
                w.close()
            files = w.sha256 if isinstance(w.sha256, dict) else {w.path: w.sha256}
            self.report = getattr(w, "summary", None)
            if self.report is not None:
                self.written_at_close += sum(Path(f).stat().st_size for f in files)
            self.digests.update({str(f.relative_to(self.folder.staging)): d
                                 for f, d in files.items()})
        if self.kind == VECTORS:
            index = {"format": "tvrecipe.vectors", "version": 1,
                     "members": list(self.writers),
                     "files": {m: f"{m}.safetensors" for m in self.writers},
                     "from": self.spec.from_, "tool": f"tvrecipe {__version__}"}
            if report:
                index["report"] = report
            from tvrecipe.report import json_text
            text = (json_text(index) + "\n").encode("utf-8")
            (self.folder.staging / "vectors.json").write_bytes(text)
            self.digests["vectors.json"] = hashlib.sha256(text).hexdigest()
        source = copy_source(compiled, self.spec, self.res)
        if source is not None:
            src = compiled.loaded.resolve(compiled.models[source].path)
            if src.is_dir():
                copy_aux_files(src, self.folder.staging)
                fix_copied_config(self.folder.staging,
                                  self.spec.dtype if self.kind == CHECKPOINT else None)
        if releases(compiled, self.name):
            self._release(compiled)

    def _release(self, compiled: Compiled) -> None:
        from tvrecipe.exec import lockfile
        state = self.options.state  # (with_state: taken before the run)
        self.digests = write_release(compiled, self.name, self.folder.staging, self.digests,
                                     state, source_of(compiled, self.options),
                                     lockfile.tool_versions(lockfile.RELEASE_TOOLS),
                                     self.options.allow_nonfinite)


def written_members(kind: str, info: TensorInfo, value: Any) -> list[tuple[str, Any]]:
    """(member, tensor) of an output's value for one tensor that its files hold: ``""`` for
    a checkpoint or vector, each member of a set; never a None, and never a non-floating
    tensor outside a checkpoint (integer buffers are no task vectors)."""
    items = {"": value} if kind in (CHECKPOINT, VECTOR) else value
    return [(m, t) for m, t in items.items()
            if t is not None and (kind == CHECKPOINT or info.is_floating)]


def left_out_files(compiled: Compiled, output: str) -> dict[str, str]:
    """The files of the model an output copies files from that it leaves out, each with the
    reason (weights in other formats, code, its model card, folders): what a run says, so
    that a release does not lose them unseen. {} when it copies from no local folder."""
    from tvrecipe.store.checkpoint import folder_config

    spec, res = compiled.outputs[output]
    source = copy_source(compiled, spec, res)
    if source is None:
        return {}
    folder = compiled.loaded.resolve(compiled.models[source].path)
    if not isinstance(folder, Path) or not folder.is_dir():
        return {}
    skipped = plan_aux_files(folder).skipped
    if "auto_map" in folder_config(folder):  # (transformers loads the model through it)
        skipped = {n: (f"{why}; config.json's auto_map needs it to load the model"
                       if n.endswith(".py") else why) for n, why in skipped.items()}
    if releases(compiled, output):  # (written anew)
        for name in MODEL_CARD_FILES:
            skipped.pop(name, None)
    return skipped


def copy_source(compiled: Compiled, spec: OutputSpec, res: Resolved) -> str | None:
    """The model whose non-weight files (config, tokenizer) an output copies:
    ``copy_files_from``, by default a checkpoint output's base."""
    if spec.copy_files_from is None and res.type.kind == CHECKPOINT:
        return base_model_of(compiled, res.node, files=True)
    return spec.copy_files_from


def base_model_of(compiled: Compiled, node: str, files: bool = False) -> str | None:
    """The checkpoint model an output checkpoint derives from (follows each op's ``base_field``,
    such as ``apply``'s ``base``); with ``files``, where its non-weight files come from (also
    through a ``files_field``: ``linear``'s first input)."""
    while node in compiled.steps:
        spec = compiled.steps[node].spec
        field_ = spec.base_field or (spec.files_field if files else None)
        if field_ is None:
            return None
        node = compiled.steps[node].refs[field_][0].node
    return node if node in compiled.models else None


def cache_hits(compiled: Compiled, lookup: Callable[[str, CompiledStep], Any]) -> dict[str, Any]:
    """Walk up from the outputs (the last output first) and stop at the first hit on each
    path: entries that only feed a hit are neither read nor verified. A ``factored`` step's
    hit holds states, not results: the walk goes on to its inputs.

    Args:
        lookup: ``(step name, step) -> hit or None``.

    Returns:
        Step name -> hit, in the order found (both executors read and report in this order).
    """
    stack = [res.node for _spec, res in compiled.outputs.values()]
    seen: set[str] = set()
    hits: dict[str, Any] = {}
    while stack:
        name = stack.pop()
        step = compiled.steps.get(name)
        if step is None or name in seen:
            continue
        seen.add(name)
        hit = lookup(name, step)
        if hit is not None:
            hits[name] = hit
        if hit is None or step.spec.factored:  # a factored step still reads its inputs
            stack.extend(r.node for refs in step.refs.values() for r in refs)
    return hits


def upstream_reports(manifest: dict, keys: dict[str, str]) -> dict[str, Any]:
    """The reports a cache entry kept of the steps it was computed from, under this recipe's
    names of those steps: found by their keys, as a step renamed since has a new name and
    the same key. (An entry written before the keys were kept: by name, where this recipe
    has a step of that name and key unknown, else left out.)"""
    reports = manifest.get("upstream_reports") or {}
    kept = manifest.get("upstream_keys")
    if not isinstance(kept, dict):
        return {n: r for n, r in reports.items() if n in keys}
    names: dict[str, list[str]] = {}
    for name, key in keys.items():
        names.setdefault(key, []).append(name)
    return {now: report for old, report in reports.items()
            for now in names.get(kept.get(old), [])}


def source_of(compiled: Compiled, options: RunOptions) -> Source:
    """The recipe a run's outputs name: the one run, unless the options name another."""
    return options.source or Source(compiled.loaded.path.name, compiled.loaded.content_sha256)


def output_metadata(compiled: Compiled, options: RunOptions) -> dict[str, str]:
    """Provenance every output file's header carries."""
    source = source_of(compiled, options)
    return {"tvrecipe.version": __version__, "tvrecipe.recipe": source.file,
            "tvrecipe.recipe_content_sha256": source.sha256}


def nonfinite_input(where: str, tensor: str) -> InputError:
    """The error for a NaN or Inf in an input tensor."""
    return InputError(f"{where}: tensor {tensor!r} contains NaN or Inf; fix the checkpoint, or "
                      "pass --allow-nonfinite to merge it anyway")


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, label: str, enabled: bool):
    """A tqdm bar over ``total`` tensors (or row blocks), or one that shows nothing."""
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="tensor", leave=False, dynamic_ncols=True)
