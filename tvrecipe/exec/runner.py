"""Run a compiled recipe: whole-model passes, then one streaming pass that writes every output."""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from tvrecipe import ops
from tvrecipe.errors import ExecutionError
from tvrecipe.exec import lockfile
from tvrecipe.exec.allocator import trim
from tvrecipe.exec.buffers import BufferPool, fresh, pinned
from tvrecipe.exec.evaluate import StepEvaluator, entry_value, leaves, select
from tvrecipe.exec.results import (
    ST_DTYPES,
    Output,
    RunOptions,
    RunResult,
    abort_outputs,
    cache_hits,
    commit_outputs,
    nonfinite_input,
    output_metadata,
    progress_bar,
    upstream_reports,
    with_state,
)
from tvrecipe.exec.slots import from_slots, slot_names, to_slots
from tvrecipe.ops.parallel import cores
from tvrecipe.plan.graph import (
    CHECKPOINT,
    VECTORS,
    Compiled,
    CompiledStep,
    Entry,
    compile_recipe,
    member_type,
)
from tvrecipe.plan.tensors import (
    CHUNK_ELEMENTS,
    PREFETCH_BYTES,
    TensorPlan,
    build_tensor_plan,
    in_flight,
    rows_per_block,
    rowwise,
)
from tvrecipe.spec.registry import kernel
from tvrecipe.store.cache import CacheCorrupt, EntryCheck, PendingEntry
from tvrecipe.store.checkpoint import TensorInfo, st_dtype, torch_dtype
from tvrecipe.store.lora import LoraAdapter
from tvrecipe.store.output import output_oserror
from tvrecipe.store.writer import TensorSpec

__all__ = ["PassContext", "RunOptions", "RunResult", "Runner", "describe_device",
           "inspect_step", "resolve_device", "run_recipe"]

DTYPES = {name: torch_dtype(st) for name, st in ST_DTYPES.items()}
# A fold stream (Runner._lanes) evaluates consecutive tensors side by side, up to two per
# core: two when each is smaller than PAIR_BYTES in the compute dtype (an embedding is not:
# its tasks' deltas alone fill the memory such a stream is there to save), more while all of
# them together stay under BATCH_BYTES. An Iso-C lane holds about 5× its tensor plus two
# float64 n × n matrices: with 16 lanes on the large benchmark (2 cores made to look like
# 16), peak RSS 768 MB against 667-681 MB two at a time; 1075 MB under 64 MiB, 1374 under
# 128 (benchmarks/README.md, "Iso-C on many cores").
PAIR_BYTES = 32 << 20
BATCH_BYTES = 32 << 20
# From this many cores on, a row-wise stream reads each block's inputs on the math threads
# too (Runner._read's ``parallel``), as a whole-tensor stream always does. On the 16-core
# H200 machine (2026-11-27, large benchmark, `tvrecipe run` engine seconds, 3 alternated
# rounds) task arithmetic ran 1.38-1.62 s that way against 1.78-1.91 s with one reading
# thread, and cluster_basis (a row-wise Gram pass, then the merge) 2.58-2.84 against
# 3.14-3.18 s; on 2 cores task arithmetic was 10% slower with them. Between 2 and 16 it
# was not measured.
PARALLEL_READS_CORES = 8


def resolve_device(setting: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(setting)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ExecutionError(f"device {setting!r} asked for, but torch sees no CUDA device; "
                             "use --device cpu or device: auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ExecutionError(f"device {setting!r} asked for, but torch sees {count} CUDA "
                             f"device(s) (cuda:0 to cuda:{count - 1}); use one of those")
    # With its index: tensors made there (an adapter's B·A) say cuda:0, and compare equal.
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def describe_device(device: torch.device) -> str:
    """``cpu``, or ``cuda`` and the GPU's name: where a run computed, for its lock."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _staged(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """What a GPU run reads a tensor into: pinned memory for a floating tensor (copied to the
    GPU), the CPU's for an integer buffer (it stays there)."""
    return (pinned if dtype.is_floating_point else fresh)(shape, dtype)


class Runner:
    """Executes a compiled recipe tensor by tensor.

    Args:
        compiled: The compiled recipe.
        options: Run options (force, device, progress).
    """

    def __init__(self, compiled: Compiled, options: RunOptions | None = None):
        self.compiled = compiled
        self.options = options or RunOptions()
        settings = compiled.loaded.recipe.settings
        self.device = resolve_device(self.options.device or settings.device)
        self.compute = DTYPES[settings.compute_dtype]
        self.seed = settings.seed
        self.reduced: dict[str, Any] = {}
        self.reports: dict[str, dict] = {}
        self.bytes_read = 0
        self._counting = threading.Lock()  # (the reading thread and the compute thread add)
        # (model, member, tensor, rows) already checked for NaN/Inf by an earlier pass of
        # this run (a whole-model pass, then the merge pass, read the same blocks again).
        self._checked: set[tuple[str, str, str, tuple[int, int] | None]] = set()
        self.plan: TensorPlan | None = None
        # step -> (manifest, slot checkpoints, the check of what is read from them)
        self.cached: dict[str, tuple[dict, dict, EntryCheck]] = {}
        self.cache_hits: list[str] = []
        # Factored step -> tensor -> its kept state (StepSpec.factored): from the cache, or
        # kept by the step as it ran; every pass of the run shares it.
        self.kept: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        # Extra node -> selectors read, beyond the recipe's own readers (inspect's target).
        self.extra_reads: dict[str, set[tuple[str, ...]]] = {}
        # Steps whose member names are known only once they ran (or were found cached).
        self._open_members = {n for n, s in compiled.steps.items()
                              if s.type.kind == VECTORS and s.type.members is None}
        # The tensors streams walk: None for all of them; a cluster worker walks its own
        # group (tvrecipe.exec.cluster). Row blocks of row-wise streams: about this many
        # elements (a worker is given its client's).
        self.only: set[str] | None = None
        self.chunk = CHUNK_ELEMENTS
        # Large tensors read or converted whole (embeddings) reuse their memory.
        self.buffers = BufferPool()
        # Blocks a whole-model pass computed that the merge pass would compute again
        # ((node, tensor, rows) -> (value, bytes it holds)), kept within ``carry_budget``
        # bytes (options.reuse_memory); the merge pass takes them instead of reading and
        # computing them again (see _carry_nodes).
        self.carry: dict[tuple[str, str, tuple[int, int] | None], tuple[Any, int]] = {}
        self.carry_budget = self.options.reuse_memory
        self.carry_bytes = 0
        self._carry_lock = threading.Lock()
        self._later: list[CompiledStep] | None = None  # the merge pass's steps, as planned

    # ---- reading ---------------------------------------------------------------------------
    def _load(self, t: torch.Tensor, where: str, tensor: str, check: bool = True,
              empty: Callable | None = None, convert: bool = True) -> torch.Tensor:
        """Move a floating tensor read from disk to the device, in the compute dtype (as it
        is without ``convert``), checking that it is finite (unless ``check`` is off or the
        run allows non-finite inputs)."""
        if not convert:
            pass  # (a 16-bit float tensor a kernel widens itself: see _stored)
        elif t.device != self.device:  # read on the CPU (into pinned memory) for a GPU run
            t = (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
            t = t.to(self.compute)
        elif t.device.type == "cpu" and t.dtype != self.compute:
            # Converted into memory the run reuses (an embedding would be faulted in afresh).
            t = (empty or self.buffers.empty)(t.shape, self.compute).copy_(t)
        else:
            # On the device already (an adapter's B·A on a GPU, or read on the CPU for a CPU
            # run). Checkpoint.get reads into a fresh tensor that nothing else holds, so
            # in-place kernels may use it as is when it already has the compute dtype.
            t = t.to(self.compute)
        # One reduction, no mask: the sum of finite weights stays finite (fp32 reaches 3e38),
        # so only a suspicious sum pays for the exact check.
        if check and not self.options.allow_nonfinite and not ops.all_finite(t):
            raise nonfinite_input(where, tensor)
        return t

    def _read(self, nodes: list[str], tensor: str, rows: slice | None,
              parallel: bool = False, deferred: frozenset[str] | set[str] = frozenset(),
              stored: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
        """Read one tensor (or rows of it) of each model or cached step, on the device; the
        floating tensors of the ``deferred`` models are read only when a folding op calls
        their :class:`~tvrecipe.ops.deferred.Deferred` value.

        With ``parallel``, models are read and converted on the math threads (file reads and
        torch casts both release the GIL), for streams whose compute is heavy enough to
        leave cores idle while one thread reads: TIES ran 12.6 s with one reading thread and
        11 s with parallel reads; task arithmetic, bound by reading, was 10% slower with them
        (2 cores, benchmarks/run.py --size large), and faster on 16 (PARALLEL_READS_CORES).
        """
        span = None if rows is None else (rows.start, rows.stop)
        info = self.plan.tensors[tensor]
        shape = info.shape
        numel = (math.prod(shape) if span is None
                 else (span[1] - span[0]) * math.prod(shape[1:]))
        later = [n for n in nodes if n in deferred and info.is_floating]
        now = [n for n in nodes if n not in later]
        got = list(ops.parallel_map(lambda name: self._read_node(name, tensor, span,
                                                                 stored=name in stored), now,
                                    numel=numel if parallel else 0,
                                    device=torch.device("cpu")))
        self._count(sum(n for _value, n in got))
        values = {name: value for name, (value, _n) in zip(now, got)}
        block = shape if span is None else (span[1] - span[0], *shape[1:])
        for name in later:
            values[name] = ops.Deferred(
                lambda name=name: self._read_later(name, tensor, span), block,
                self.compute, self.device)
        return values

    def _read_later(self, name: str, tensor: str, span: tuple[int, int] | None
                    ) -> torch.Tensor:
        """A deferred model's tensor, read when a folding op asks for it, into memory of its
        own, not the pool's: it is freed as soon as the op drops it (a pooled buffer would
        stay mapped, unused, while the op computes: 131 MB more at the peak of an Iso-C run
        of the large benchmark)."""
        info = self.plan.tensors[tensor]
        if math.prod(info.shape) * self.compute.itemsize >= self.buffers.min_bytes:
            trim()  # (what the last task's work left free: 15 MB a task in Iso-CTS)
        value, n = self._read_node(name, tensor, span, fresh)
        self._count(n)
        return value

    def _count(self, nbytes: int) -> None:
        with self._counting:
            self.bytes_read += nbytes

    def _deferred(self, steps: list[CompiledStep], uses: Counter, want: list[str]
                  ) -> set[str]:
        """The models a stream reads only when a folding op asks for them (``StepSpec.folds``,
        ``defers``): the checkpoints of a deferring step's field (``extract``'s
        ``finetuned``) that nothing else reads, where that step's result is neither wanted
        (an output, a cache entry, a whole-model pass's values) nor read but by folding ops."""
        readers: dict[str, list[CompiledStep]] = {}
        for s in steps:
            for refs in s.refs.values():
                for r in refs:
                    readers.setdefault(r.node, []).append(s)
        out = set()
        for s in steps:
            fld = type(s.spec).defers
            if (fld is None or s.name in want or not readers.get(s.name)
                    or not all(type(r.spec).folds for r in readers[s.name])):
                continue
            for r in s.refs.get(fld, []):
                handle = self.plan.models.get(r.node)
                if (handle is not None and handle.kind == CHECKPOINT and uses[r.node] == 1
                        and r.node not in want):
                    out.add(r.node)
        return out

    def _stored(self, steps: list[CompiledStep], want: list[str], deferred: set[str]
                ) -> set[str]:
        """The checkpoints a fold stream reads as stored, not widened to float32: those that
        only fields of ``StepSpec.stored`` read (``extract``'s and ``apply``'s ``base``), in a
        CPU run in float32. Their kernels widen pieces as they go, with the same bytes; an
        embedding's base holds 65 MB instead of 131 MB while a spectral op works at the
        large benchmark.

        Not beside a LoRA adapter: its uncovered tensors are None, and ``apply`` of None
        hands on its base as it is, which would carry the stored dtype to later steps."""
        if not deferred or self.device.type != "cpu" or self.compute != torch.float32:
            return set()
        fields: dict[str, set[bool]] = {}
        for s in steps:
            for fld, refs in s.refs.items():
                for r in refs:
                    fields.setdefault(r.node, set()).add(fld in type(s.spec).stored)
        if any(isinstance(ck, LoraAdapter) for n in fields if n in self.plan.models
               for ck in self.plan.models[n].parts.values()):
            return set()
        return {n for n, ok in fields.items()
                if ok == {True} and n not in want
                and (h := self.plan.models.get(n)) is not None and h.kind == CHECKPOINT}

    def _read_node(self, name: str, tensor: str, span: tuple[int, int] | None,
                   empty: Callable | None = None, stored: bool = False) -> tuple[Any, int]:
        """One model's or cached step's value for ``tensor``, and the bytes read from models;
        large tensors in memory from ``empty`` (the run's pool when None); a checkpoint's
        16-bit floats left as stored with ``stored`` (see :meth:`_stored`)."""
        if name in self.cached:
            manifest, slots, check = self.cached[name]
            got = {}
            for slot, ck in slots.items():
                info = ck.tensors.get(tensor)
                if info is None or not info.is_floating:  # (a buffer: 0.2.1 cached some)
                    got[slot] = None
                    continue
                t = ck.get(tensor, span, empty=self._into(None))
                check(slot, tensor, span, info.shape[0] if info.shape else 1, t)
                # Its inputs were checked when it was computed (lookup skips entries of runs
                # that allowed non-finite inputs unless this run does too).
                got[slot] = self._load(t, f"cache of {name!r}", tensor, check=False)
            return from_slots(got, manifest["kind"]), 0
        handle = self.plan.models[name]
        got = {}
        nbytes = 0
        for member, ck in handle.parts.items():
            info = ck.tensors.get(tensor)
            if (info is None or (handle.kind != CHECKPOINT and not info.is_floating)
                    or not getattr(ck, "covers", lambda _t: True)(tensor)):
                got[member] = None  # no tensor, or an adapter's exact zero (see zero_fill)
                continue
            wide = None
            if isinstance(ck, LoraAdapter):  # ΔW = s·B·A is formed on the run's device
                t = ck.get(tensor, span, device=self.device)
                nbytes += ck.factor_bytes(tensor) if span is None or span[0] == 0 else 0
            else:
                t, wide = self._read_wide(ck, tensor, span, self._into(empty),
                                          widen=not stored)
                nbytes += t.numel() * t.element_size()
            if info.is_floating:
                where = f"model {name!r}" + (f" member {member!r}" if member else "")
                key = (name, member, tensor, span)
                if wide is not None:  # the stored bits lie in the upper half of ``wide``
                    _widen_in_place(t, wide)
                    t = wide
                t = self._load(t, where, tensor, check=key not in self._checked, empty=empty,
                               convert=not (stored and t.dtype.itemsize == 2))
                self._checked.add(key)
            got[member] = t
        return (got[""] if handle.kind != VECTORS else got), nbytes

    def _into(self, empty: Callable | None) -> Callable:
        """What a tensor read from disk is read into: page-locked memory in a GPU run (read
        straight where the copy to the GPU starts: a pageable buffer then ``pin_memory`` was
        one more copy of every input), else ``empty``, or the run's pool."""
        return _staged if self.device.type == "cuda" else (empty or self.buffers.empty)

    def _read_wide(self, ck: Any, tensor: str, span: tuple[int, int] | None,
                   alloc: Callable, widen: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ck.get`` of a model's tensor, and the float32 tensor it is to be widened into.

        A 16-bit float tensor that a CPU run converts to float32, large enough for the
        run's pool (an embedding read whole), is read into the upper half of its float32
        buffer (see :func:`_widen_in_place`), so no buffer holds the stored bits alone: 65 MB
        less per input of such an embedding, and no such buffer to map. Anything else is read
        as it is (the second item is None): row blocks read widened held about 100 MB more
        in a DARE run of the large benchmark.
        """
        widened: list[torch.Tensor] = []

        def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            n = math.prod(shape)
            if not (widen and dtype.is_floating_point and dtype.itemsize == 2
                    and self.compute == torch.float32 and self.device.type == "cpu"
                    and n * 4 >= self.buffers.min_bytes):
                return alloc(shape, dtype)
            wide = alloc(shape, torch.float32)
            widened.append(wide)
            return wide.view(-1).view(torch.uint8)[2 * n:].view(dtype).view(shape)

        t = ck.get(tensor, span, empty=empty)
        return t, (widened[0] if widened else None)

    def _where(self) -> dict[str, str]:
        """Where this run computed, for its lock (:func:`lockfile.machine`)."""
        return lockfile.machine(describe_device(self.device))

    def _to_compute(self, targets: list[str]) -> list[CompiledStep]:
        """Steps that must run to produce ``targets``: upstream search stops at cached steps."""
        needed: set[str] = set()
        stack = list(targets)
        while stack:
            node = stack.pop()
            if node in needed or node not in self.compiled.steps:
                continue
            needed.add(node)
            if node in self.cached:
                continue
            stack.extend(r.node for refs in self.compiled.steps[node].refs.values() for r in refs)
        return [s for n, s in self.compiled.steps.items() if n in needed and n not in self.cached]

    def _work(self, steps: list[CompiledStep]) -> Iterator[tuple[str, TensorInfo, slice | None]]:
        by_rows = rowwise(steps)
        for tensor, info in self.plan.tensors.items():
            if self.only is not None and tensor not in self.only:
                continue
            step = rows_per_block(info.shape, self.chunk) if by_rows else None
            if step is not None:
                for start in range(0, info.shape[0], step):
                    yield tensor, info, slice(start, min(start + step, info.shape[0]))
            else:
                yield tensor, info, None

    def _stream(self, steps: list[CompiledStep], want: list[str], label: str,
                stack: bool = False, carry: frozenset[str] = frozenset()
                ) -> Iterator[tuple[str, TensorInfo, dict[str, Any]]]:
        """Evaluate ``steps`` for every tensor, yielding the values of ``want``.

        The next tensor's inputs are read on a background thread while this one computes.
        ``stack``: a whole-model pass's stream: the sets it yields are made as rows of one
        tensor where it goes by row blocks (TensorContext.stacked). ``carry``: nodes of
        ``want`` whose blocks are kept for the merge pass, within the budget (``self.carry``);
        a block found kept is taken instead of being computed, and the steps and models only
        it needed are neither run nor read for that block.
        """
        uses: Counter[str] = Counter()
        for s in steps:
            for refs in s.refs.values():
                uses.update(r.node for r in refs)
        uses.update(want)
        models = [m for m in self.plan.models if m in uses]
        models += [n for n in self.cached if n in uses]
        evaluator = StepEvaluator(self.seed, self.reduced, self.reports)
        evaluator.layers = self.plan.layers
        evaluator.kept = self.kept
        evaluator.reads = self.compiled.reads()
        for node, selectors in self.extra_reads.items():
            evaluator.reads.setdefault(node, set()).update(selectors)
        # Values read once, by one step, and neither output nor cached: that step may write
        # into them (see StepEvaluator._scratch).
        evaluator.exclusive = {n for n in [*models, *(s.name for s in steps)] if uses[n] == 1}
        items = list(self._work(steps))
        bar = progress_bar(len(items), label, self.options.progress)
        heavy = not rowwise(steps)
        evaluator.whole = heavy
        # (Row blocks only: a whole tensor's rows would stand beside its members' buffers.)
        evaluator.stack = frozenset(want) if stack and not heavy else frozenset()
        evaluator.empty = self.buffers.empty
        # (Row blocks are small: only whole tensors are worth reading one member at a time.)
        deferred = self._deferred(steps, uses, want) if heavy else set()
        stored = self._stored(steps, want, deferred)
        # Row-wise streams read blocks of bounded size, so the reader may run a few blocks
        # ahead and never waits on a slow write; whole tensors are read one ahead, except one
        # whose copies from every input pass PREFETCH_BYTES (an embedding): reading it ahead
        # would hold two of them at once, and it is read when its turn comes instead (the
        # compute of a whole-tensor stream dwarfs a read from the page cache).
        ahead = in_flight(not heavy)
        parallel_reads = heavy or cores() >= PARALLEL_READS_CORES  # (one input a thread)
        inputs = (sum(len(self.plan.models[m].parts) for m in models
                      if m in self.plan.models and m not in deferred)
                  + sum(len(self.cached[n][1]) for n in models if n in self.cached))
        width = self.compute.itemsize

        def size(info: TensorInfo) -> int:  # (bytes of a whole tensor in the compute dtype)
            return math.prod(info.shape) * width

        by_name = {s.name: s for s in steps}
        subsets: dict[frozenset[str], tuple[list[CompiledStep], list[str]]] = {}

        def needed(j: int) -> tuple[list[CompiledStep], list[str], frozenset[str]]:
            """The steps to run and the models to read for item ``j``, and its kept nodes
            (those found in ``self.carry``)."""
            if not self.carry:
                return steps, models, frozenset()
            t, _info, rows = items[j]
            span = None if rows is None else (rows.start, rows.stop)
            kept = frozenset(n for n in by_name if (n, t, span) in self.carry)
            if kept not in subsets:
                need: set[str] = set()
                todo = list(want)
                while todo:
                    n = todo.pop()
                    if n in need:
                        continue
                    need.add(n)
                    if n in by_name and n not in kept:
                        todo.extend(r.node for refs in by_name[n].refs.values() for r in refs)
                subsets[kept] = ([s for s in steps if s.name in need and s.name not in kept],
                                 [m for m in models if m in need])
            return (*subsets[kept], kept)

        def read_ahead(j: int):
            t, info, rows = items[j]
            if heavy and size(info) * inputs > PREFETCH_BYTES:
                return None
            return pool.submit(self._read, needed(j)[1], t, rows, parallel_reads, deferred,
                               stored)

        futures: deque = deque()
        # A fold stream of small tensors takes several at a time, the ones after the first
        # each on a thread of its own: its ops run their factorisations on one thread each
        # (so that their bytes do not depend on the core count), which would leave the other
        # cores idle.
        lanes = self._lanes(steps, deferred)
        twins = [evaluator.twin() for _ in range(lanes - 1)]
        threads = torch.get_num_threads()

        def one_thread() -> None:
            # Each tensor beside the first runs its torch ops on one thread: up to two lanes
            # per core already (the factorisations are on one thread each in any case).
            torch.set_num_threads(1)

        def small(info: TensorInfo) -> bool:
            return size(info) < PAIR_BYTES

        def evaluate(ev: StepEvaluator, values: dict[str, Any], tensor: str,
                     info: TensorInfo, rows: slice | None, run: list[CompiledStep] = steps
                     ) -> dict[str, Any]:
            remaining = Counter(uses)
            for s in run:
                values[s.name] = ev(s, values, tensor, rows)
                for refs in s.refs.values():
                    for r in refs:
                        remaining[r.node] -= 1
                        if remaining[r.node] <= 0:
                            values.pop(r.node, None)
            block = (info.shape if rows is None
                     else (rows.stop - rows.start, *info.shape[1:]))
            if carry and info.is_floating:
                self._keep(carry, values, tensor, rows)
            return {w: self._zero_fill(values[w], info, block) for w in want}

        def take(j: int) -> dict[str, Any]:
            """Tensor ``j``'s values as read (taken in order), and the next read started."""
            t, _info, rows = items[j]
            future = futures.popleft()
            values = future.result() if future is not None else self._read(
                needed(j)[1], t, rows, parallel_reads, deferred, stored)
            if j + ahead < len(items):
                futures.append(read_ahead(j + ahead))
            return values

        def start(j: int) -> tuple[dict[str, Any], list[CompiledStep]]:
            """Tensor ``j``'s values (read, and its kept blocks taken) and the steps to run."""
            run, _models, kept = needed(j)
            values = take(j)
            if kept:
                t, _info, rows = items[j]
                values.update(self._take_kept(kept, t, rows))
            return values, run

        side = (ThreadPoolExecutor(max_workers=len(twins), thread_name_prefix="tvrecipe-side",
                                   initializer=one_thread) if twins else None)
        # The next tensors' outputs, being evaluated beside this one (in order).
        beside: deque = deque()
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvrecipe-read") as pool:
                try:
                    futures.extend(read_ahead(j) for j in range(min(ahead, len(items))))
                    for i, (tensor, info, rows) in enumerate(items):
                        if beside:
                            out = beside.popleft().result()
                        else:
                            values, run = start(i)
                            if deferred:
                                # A stream that folds its tasks in one at a time is there to
                                # hold little: what earlier tensors left free (pool maps,
                                # malloc arenas) goes back to the kernel before each tensor.
                                self.buffers.release()
                                trim()
                            if side is not None and small(info):
                                batch = size(info)
                                for twin, j in zip(twins, range(i + 1, len(items))):
                                    batch += size(items[j][1])
                                    if not small(items[j][1]) or (j > i + 1
                                                                  and batch >= BATCH_BYTES):
                                        break
                                    got, run_j = start(j)
                                    beside.append(side.submit(evaluate, twin, got, *items[j],
                                                              run_j))
                            out = evaluate(evaluator, values, tensor, info, rows, run)
                            values = None
                        yield tensor, info, out
                        out = None  # (the consumer's now)
                        bar.update(1)
                finally:
                    # Stopped early (an error, or the consumer closed us): reads not yet
                    # started never run; leaving the pool waits for the one running.
                    for f in futures:
                        if f is not None:
                            f.cancel()
        finally:
            if side is not None:
                side.shutdown(wait=True)  # (evaluations running beside a failed one end)
                # A new thread takes the count set last, by whichever thread: the run's again.
                torch.set_num_threads(threads)
        self.buffers.release()
        bar.close()

    def _lanes(self, steps: list[CompiledStep], deferred: set[str] | frozenset[str]) -> int:
        """How many small tensors a stream evaluates at a time: two per core for a fold
        stream on a CPU, with a step that asks for it (``StepSpec.side_by_side``: Iso-C),
        whose steps keep nothing from one tensor to the next (``independent``: no report,
        kept state or random stream that another tensor's evaluation could interleave
        with); else 1. (Two per core, as a lane waits while it reads its tasks: Iso-C on the
        large benchmark, 2 cores, medians of 3: 24.05 s with 4 lanes, 25.28 s with 2; 8 were
        no faster than 4.)"""
        if (deferred and self.device.type == "cpu" and all(s.spec.independent for s in steps)
                and any(s.spec.side_by_side() for s in steps)):
            return 2 * cores()
        return 1

    def _zero_fill(self, value: Any, info: TensorInfo, block: tuple[int, ...]) -> Any:
        """A value leaving the stream (for an output, a cache entry or a whole-model pass),
        with each None of a floating tensor made real zeros. Inside the stream an adapter's
        uncovered tensor stays None: ``sum`` and ``mean`` skip it, ``apply`` keeps the base,
        and other ops get zeros only where it meets a real tensor (TensorContext.tensors)."""
        if not info.is_floating:
            return value
        if value is None:
            return torch.zeros(block, dtype=self.compute, device=self.device)
        if isinstance(value, dict):
            return {k: self._zero_fill(v, info, block) for k, v in value.items()}
        return value

    # ---- blocks kept from a whole-model pass for the merge pass --------------------------
    def _carry_nodes(self, upstream: list[CompiledStep], want: list[str]) -> frozenset[str]:
        """The nodes of a whole-model pass's stream (``upstream`` computing ``want``) whose
        blocks to keep for the merge pass: those the merge pass computes again, when both
        passes walk the same blocks (both row-wise or both whole tensors) and every step of the
        stream keeps nothing from one block to the next (``independent``), so a kept block's
        steps may be skipped there."""
        later = self._later
        if self.carry_budget <= 0 or later is None:
            return frozenset()
        if rowwise(upstream) != rowwise(later) or not all(s.spec.independent
                                                         for s in upstream):
            return frozenset()
        names = {s.name for s in upstream} & {s.name for s in later}
        return frozenset(n for n in want if n in names)

    def _keep(self, nodes: frozenset[str], values: dict[str, Any], tensor: str,
              rows: slice | None) -> None:
        """Keep the blocks of ``nodes`` in ``values`` while the budget allows (one with a
        missing member, which leaves the stream as zeros, is not kept: inside a stream it
        stays None)."""
        span = None if rows is None else (rows.start, rows.stop)
        for node in sorted(nodes):
            value = values.get(node)
            tensors = list(leaves(value))
            if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
                continue
            nbytes = _storage_bytes(tensors)
            with self._carry_lock:
                if self.carry_bytes + nbytes <= self.carry_budget:
                    self.carry[(node, tensor, span)] = value, nbytes
                    self.carry_bytes += nbytes

    def _take_kept(self, nodes: frozenset[str], tensor: str, rows: slice | None
                   ) -> dict[str, Any]:
        """The kept blocks of ``nodes`` for one block, no longer kept."""
        span = None if rows is None else (rows.start, rows.stop)
        got = {}
        with self._carry_lock:
            for node in nodes:
                got[node], nbytes = self.carry.pop((node, tensor, span))
                self.carry_bytes -= nbytes
        return got

    # ---- whole-model passes ----------------------------------------------------------------
    def _upstream(self, node: str) -> list[CompiledStep]:
        step = self.compiled.steps.get(node)
        if step is None:
            return []
        return self._to_compute([r.node for refs in step.refs.values() for r in refs])

    def _whole_model_passes(self, wanted: Callable[[], set[str]]) -> list[str]:
        """Run, in graph order, the whole-model passes not yet run of the steps ``wanted()``
        names (asked again before each step: a pass that names a set's members recompiles
        the recipe); returns the steps whose pass ran."""
        ran = []
        for name in list(self.compiled.steps):
            step = self.compiled.steps.get(name)
            if (step is None or not step.spec.whole_model or name in self.reduced
                    or name not in wanted()):
                continue
            self._whole_model_pass(step)
            ran.append(name)
            if name in self._open_members:
                self._recompile()
        return ran

    def _whole_model_pass(self, step: CompiledStep) -> None:
        """Run a ``whole_model`` op's pass and keep its result for the per-tensor work."""
        with whole_model_errors(step):
            self.reduced[step.name] = step.spec.whole_model_pass(PassContext(self, step))

    # ---- inspection ------------------------------------------------------------------------
    def inspect(self, node: str) -> dict[str, Any]:
        """Facts about one value without writing anything.

        A ``vectors`` value gives its members' cosine similarity matrix (one streaming pass);
        a ``decompose`` step gives its per-tensor ranks, shared dimension and energy shares;
        a spectral step (and ``decompose``) the singular spectra of its inputs and their
        subspace overlaps per group of tensors (:mod:`tvrecipe.exec.spectra`).

        Raises:
            RecipeError: ``node`` names no model or step, or a value of another kind.
        """
        from tvrecipe.errors import RecipeError
        text = node
        node, *selector = text.split(".")
        if node not in self.compiled.steps and node not in self.compiled.models:
            from tvrecipe.spec.load import did_you_mean
            recipe = self.compiled.loaded.recipe  # (every step: those no output needs too)
            names = [*recipe.models, *recipe.steps]
            raise RecipeError(f"no step or model named {node!r}; "
                              + (did_you_mean(node, names) or "known: " + ", ".join(names)))
        vt = self.compiled.type_of(node)
        for part in selector:  # a dotted reference: tv.math, parts.unique, parts.unique.a
            vt = member_type(vt, part)
            if isinstance(vt, str):
                raise RecipeError(f"{text!r}: {vt}")
        kind = vt.kind
        step = self.compiled.steps.get(node)
        options = None if step is None or selector else step.spec.spectra_options()
        if options is not None:  # a spectral step: its inputs' spectra, then what it shows
            from tvrecipe.exec.spectra import spectra
            with self._inputs_open(node):
                shown = spectra(PassContext(self, step), **options)
            if kind == "decomposition":
                shown.update(self._inspect_decomposition(node))
            return shown
        if (step is not None and not selector and step.spec.whole_model
                and kind in (VECTORS, "decomposition")):
            with self._inputs_open(node):
                self._whole_model_pass(step)
            shown = step.spec.inspection(self.reports.get(node, {}))
            if shown is not None:
                return shown
        if kind not in (VECTORS, "decomposition"):
            raise RecipeError(f"{text!r} is a {kind}: inspect shows a vectors set (cosine "
                              "similarities), a cluster_basis or compress_basis step, a "
                              "decompose step (ranks and shared dimensions) or a tsv_merge or "
                              "iso step (spectra of its inputs)")
        if kind == "decomposition":
            return self._inspect_decomposition(node)
        with self._inputs_open(node):
            steps = [*self._upstream(node)] + ([self.compiled.steps[node]]
                                                if node in self.compiled.steps else [])
            if vt.members is None:  # named by an upstream pass (cluster_basis, k: auto)
                vt = self.compiled.type_of(node)
                for part in selector:
                    vt = member_type(vt, part)
            members = list(vt.members or ())
            self.extra_reads = {node: {tuple(selector)}}
            gram = torch.zeros(len(members), len(members), dtype=torch.float64)
            with closing(self._stream(steps, [node], f"inspect {text}")) as stream:
                for _t, info, values in stream:
                    if info.is_floating:
                        value = select(values[node], selector)
                        ops.gram_update(gram, [value[m] for m in members])
        cos = ops.cosine_from_gram(gram)
        return {"kind": kind, "members": members, "cosine": cos.tolist(),
                "norms": gram.diagonal().sqrt().tolist()}

    def _inspect_decomposition(self, node: str) -> dict[str, Any]:
        """A decompose step's per-tensor ranks, shared dimension and energy shares (one pass
        that forms no part: nothing reads them)."""
        with self._inputs_open(node):
            steps = [*self._upstream(node), self.compiled.steps[node]]
            with closing(self._stream(steps, [node], f"inspect {node}")) as stream:
                for _ in stream:
                    pass
        return {"kind": "decomposition",
                "tensors": self.reports.get(node, {}).get("tensors", {})}

    @contextmanager
    def _inputs_open(self, node: str | None = None) -> Iterator[None]:
        """The run's inputs opened (``self.plan``) for a pass outside :meth:`run`; with
        ``node``, the whole-model passes of the steps upstream of it run first, as in
        :meth:`run` (a ``rebuild`` of a ``compress_basis``, say, needs its encoder)."""
        self.plan = build_tensor_plan(self.compiled)
        try:
            if node is not None:
                self._whole_model_passes(lambda: {s.name for s in self._upstream(node)})
            yield
        finally:
            self.plan.close()

    # ---- cache -----------------------------------------------------------------------------
    def _recompile(self) -> None:
        """Compile again once whole-model passes (or cache entries) have named the members
        of sets the compiler could not know (``cluster_basis`` with ``k: auto``)."""
        known = {}
        for n, result in self.reduced.items():
            members = self.compiled.steps[n].spec.members_from(result)
            if members is not None:
                known[n] = members
        known.update({n: tuple(m["members"]) for n, (m, *_) in self.cached.items()
                      if m.get("members") is not None and n in self._open_members})
        self.compiled = compile_recipe(self.compiled.loaded, known_members=known,
                                       targets=self.compiled.targets)

    def _lookup_cache(self) -> None:
        cache, keys = self.options.cache, self.options.keys
        if cache is None or keys is None:
            return
        allow = self.options.allow_nonfinite
        found = cache_hits(self.compiled, lambda name, step: (
            cache.lookup(keys[name], allow) if step.spec.cached and name in keys else None))
        for name, hit in found.items():
            self.cache_hits.append(name)
            if self.compiled.steps[name].spec.factored:
                self.kept[name] = _read_kept(hit)  # the step runs, from its kept state
                continue
            self.cached[name] = hit
            if hit[0].get("report"):
                self.reports[name] = hit[0]["report"]
            # The reports of the steps it was computed from (a cluster_basis's clusters under
            # a cached sum): that run had them, and so does this one.
            for upstream, report in upstream_reports(hit[0], keys).items():
                self.reports.setdefault(upstream, report)
        if any(n in self._open_members for n in self.cached):
            self._recompile()

    def _start_cache_entries(self, steps: list[CompiledStep], metadata: dict[str, str],
                             entries: dict[str, PendingEntry]) -> None:
        """Open the cache entries this run writes, into ``entries`` (the caller's, so that an
        interrupt while opening them leaves every opened one there to abort)."""
        cache, keys = self.options.cache, self.options.keys
        if cache is None or keys is None:
            return
        specs = [TensorSpec(t, st_dtype(self.compute), self.plan.tensors[t].shape)
                 for t in self.plan.floating]
        for step in steps:
            if step.spec.factored:
                continue  # its kept states are written once the run has them (_commit_kept)
            if step.spec.cached and step.name in keys:
                slots = slot_names(step.type.kind, step.type.members)
                entries[step.name] = cache.pending(
                    keys[step.name], dict.fromkeys(slots, specs),
                    {**metadata, "tvrecipe.step": step.name, "tvrecipe.key": keys[step.name]})

    def _merge_pass(self, steps: list[CompiledStep], want: list[str],
                    outputs: dict[str, Output], pending: dict[str, PendingEntry]) -> int:
        """Stream every tensor through ``steps`` into the outputs and new cache entries.

        Writing (the cast to the stored dtype, hashing, the file write) runs on a thread of its
        own, one tensor behind the compute, so reading, computing and writing overlap.
        Returns the bytes written to outputs.
        """
        def write(tensor: str, info: TensorInfo, values: dict[str, Any]) -> int:
            n = sum(o.write(tensor, info, select(values[o.res.node], o.res.selector))
                    for o in outputs.values())
            if info.is_floating:
                for name, entry in pending.items():
                    for slot, t in to_slots(values[name]).items():
                        entry.write(slot, tensor, t.cpu())
            return n

        written = 0
        with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvrecipe-write") as pool,
              closing(self._stream(steps, want, "merge")) as stream):
            # A few values wait: bounded memory.
            jobs = _InOrder(pool, in_flight(rowwise(steps)))
            try:
                for tensor, info, values in stream:
                    written += sum(jobs.add(write, tensor, info, values))
                written += sum(jobs.finish())
            finally:
                jobs.cancel()  # after a failure, writes not yet started never run
        return written

    def _commit_kept(self, steps: list[CompiledStep], metadata: dict[str, str]) -> None:
        """Cache the kept states of the factored steps this run computed (not found cached):
        one file of every tensor's state, written whole once the run has them all."""
        cache, keys = self.options.cache, self.options.keys
        if cache is None or keys is None:
            return
        for step in steps:
            name = step.name
            if not (step.spec.factored and step.spec.cached and name in keys
                    and name not in self.cache_hits):
                continue
            states = self.kept.get(name, {})
            items = [(f"{tensor}{KEPT_SEP}{k}", t) for tensor in self.plan.floating
                     for k, t in sorted(states.get(tensor, {}).items())]
            specs = [TensorSpec(n, st_dtype(t.dtype), tuple(t.shape)) for n, t in items]
            entry = cache.pending(keys[name], {KEPT_SLOT: specs},
                                  {**metadata, "tvrecipe.step": name,
                                   "tvrecipe.key": keys[name]})
            try:
                for n, t in items:
                    entry.write(KEPT_SLOT, n, t)
                entry.commit({**self._manifest(name), "factored": True})
            except BaseException:
                entry.abort()
                raise

    def _manifest(self, name: str) -> dict[str, Any]:
        vt = self.compiled.steps[name].type
        upstream = {n: self.reports[n] for n in nx.ancestors(self.compiled.graph, name)
                    if self.reports.get(n)}
        keys = self.options.keys or {}
        return {"kind": vt.kind, "members": list(vt.members) if vt.members else None,
                "step": name, "report": self.reports.get(name),
                "upstream_reports": dict(sorted(upstream.items())) or None,
                "upstream_keys": {n: keys[n] for n in sorted(upstream) if n in keys} or None,
                "allow_nonfinite": self.options.allow_nonfinite}

    # ---- main ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run every pass and write every output atomically.

        Raises:
            TvrecipeError: any user-facing failure; no output is left half-written.
        """
        start = time.perf_counter()
        self.plan = build_tensor_plan(self.compiled)
        outputs: dict[str, Output] = {}
        passes = []
        pending: dict[str, PendingEntry] = {}
        try:
            self._lookup_cache()
            if self.carry_budget:
                self._later = self._to_compute(
                    [res.node for _spec, res in self.compiled.outputs.values()])
            # Not the cached steps, nor those that only feed cached steps.
            passes += [f"similarity:{name}" for name in self._whole_model_passes(
                lambda: {s.name for s in self._to_compute(
                    [res.node for _spec, res in self.compiled.outputs.values()])})]
            metadata = output_metadata(self.compiled, self.options)
            for name in self.compiled.outputs:
                outputs[name] = Output(name, self.compiled, self.plan, self.options,
                                       st_dtype(self.compute), metadata)
            steps = self._to_compute([o.res.node for o in outputs.values()])
            self._start_cache_entries(steps, metadata, pending)
            want = sorted({o.res.node for o in outputs.values()} | set(pending))
            written = self._merge_pass(steps, want, outputs, pending)
            passes.append("merge")
            for o in outputs.values():
                o.finish(self.compiled, self.reports.get(o.res.node))
                written += o.written_at_close
            for name, entry in pending.items():
                entry.commit(self._manifest(name))
            pending = {}
            self._commit_kept(steps, metadata)
            where = self._where()
            result_paths = commit_outputs(outputs, self.options, where)
        except BaseException as exc:
            abort_outputs(outputs)
            for entry in pending.values():
                entry.abort()
            if isinstance(exc, OSError):
                raise output_oserror(exc, Path(exc.filename or ".")) from exc
            raise
        finally:
            self.carry.clear()
            self.carry_bytes = 0
            self.plan.close()
            for _m, slots, _c in self.cached.values():
                for ck in slots.values():
                    ck.close()
        return RunResult(result_paths, self.reports, str(self.device),
                         time.perf_counter() - start, self.bytes_read, written, passes,
                         self.cache_hits, {n: o.digests for n, o in outputs.items()},
                         {n: o.report for n, o in outputs.items() if o.report}, machine=where)


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the memory the tensors hold (views of one storage, such as a stack's rows,
    count it once)."""
    return sum({(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in tensors}.values())


_WIDEN_CHUNK = 1 << 19  # entries (chunks of the conversion stay in cache)


def _widen_in_place(half: torch.Tensor, wide: torch.Tensor) -> None:
    """Convert the 16-bit floats stored in the upper half of float32 ``wide``'s bytes into
    ``wide``, front to back, in chunks that never write over their own source.

    Entry i is read from byte 2n + 2i and written to bytes 4i to 4i + 4, so a chunk [a, a +
    L) writes only bytes below what the entries after it are read from, and overlaps its own
    source unless L <= (n - a) / 2: the last chunk (at most _WIDEN_CHUNK entries) goes
    through a copy.
    """
    src, dst = half.reshape(-1), wide.view(-1)
    n, a = src.numel(), 0
    while n - a > _WIDEN_CHUNK:
        step = min(_WIDEN_CHUNK, (n - a) // 2)
        dst[a : a + step].copy_(src[a : a + step])
        a += step
    if a < n:
        dst[a:].copy_(src[a:].clone())


# Blocks whose Gram products may wait for PassContext.gram's thread.
GRAM_AHEAD = 2


class _InOrder:
    """Jobs on a one-thread pool, run in the order given while the caller goes on, at most
    ``limit`` of them waiting. ``add`` and ``finish`` return the results of the jobs they
    waited for, in order (a job's exception is raised there); ``cancel`` drops the jobs not
    started yet."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int):
        self._pool, self._limit = pool, limit
        self._jobs: deque = deque()

    def add(self, fn: Callable, *args: Any) -> list:
        done = []
        while len(self._jobs) >= self._limit:
            done.append(self._jobs.popleft().result())
        self._jobs.append(self._pool.submit(fn, *args))
        return done

    def finish(self) -> list:
        return [self._jobs.popleft().result() for _ in range(len(self._jobs))]

    def cancel(self) -> None:
        for job in self._jobs:
            job.cancel()


# A factored step's cache entry: one slot of tensors named ``<tensor>@<state key>``.
KEPT_SLOT, KEPT_SEP = "kept", "@"


def _read_kept(hit: tuple[dict, dict, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The kept states of a factored step's cache entry, read whole and checked."""
    _manifest, slots, check = hit
    states: dict[str, dict[str, torch.Tensor]] = {}
    try:
        ck = slots[KEPT_SLOT]
        for name, info in ck.tensors.items():
            t = ck.get(name)
            check(KEPT_SLOT, name, None, info.shape[0] if info.shape else 1, t)
            tensor, _, key = name.rpartition(KEPT_SEP)
            states.setdefault(tensor, {})[key] = t
    finally:
        for ck in slots.values():
            ck.close()
    return states


class PassContext:
    """What an op's ``whole_model_pass`` sees: streaming helpers over the whole model.

    Attributes:
        step: The compiled step.
        root_seed: The recipe's seed.
        report: The step's run report, to add facts to.
    """

    def __init__(self, runner: Runner, step: CompiledStep):
        self._runner = runner
        self.step = step
        self.root_seed = runner.seed
        self.report = runner.reports.setdefault(step.name, {})

    def entries(self, fld: str) -> list[Entry]:
        """The expanded entries of a field (one per task vector)."""
        return self.step.entries.get(fld, [])

    def shape(self, tensor: str) -> tuple[int, ...]:
        """The shape of a tensor of the model."""
        return tuple(self._runner.plan.tensors[tensor].shape)

    def kernel(self, *args: Any, **kwargs: Any) -> Any:
        """Call the op's kernel."""
        return kernel(type(self.step.spec))(*args, **kwargs)

    def accumulate(self, entries: list[Entry], fn: Any, label: str = "similarity") -> None:
        """One streaming pass over every floating tensor: ``fn(name, tensors)`` with the
        tensors of ``entries`` for each tensor name, or each row block of it when the upstream
        steps are row-wise (computing whatever upstream steps they need)."""
        runner = self._runner
        want = sorted({e.ref.node for e in entries})
        upstream = runner._upstream(self.step.name)
        with closing(runner._stream(upstream, want, f"{label} ({self.step.name})", stack=True,
                                    carry=runner._carry_nodes(upstream, want))) as stream:
            for tensor, info, values in stream:
                if info.is_floating:
                    fn(tensor, [entry_value(values, e) for e in entries])

    def gram(self, entries: list[Entry]) -> torch.Tensor:
        """The Gram matrix (float64) of ``entries`` over the whole model, in one pass.

        The products run on a thread of their own, in the order the blocks come (so the
        sums, and the bytes, are those of one thread), while this one computes the next
        block's deltas: the products took half of the pass on the calling thread while the
        reading thread waited. At most ``GRAM_AHEAD`` blocks wait for it."""
        gram = torch.zeros(len(entries), len(entries), dtype=torch.float64)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvrecipe-gram") as pool:
            jobs = _InOrder(pool, GRAM_AHEAD)
            try:
                self.accumulate(entries, lambda _name, xs: jobs.add(ops.gram_update, gram, xs))
                jobs.finish()
            finally:
                jobs.cancel()  # after a failure, products not yet started never run
        # (The stream gave its pool's free maps back as it ended, while the last products
        # still held their blocks: these go now.)
        self._runner.buffers.release()
        return gram

    def grams(self, entries: list[Entry], label: str) -> dict[str, torch.Tensor]:
        """The Gram matrix (float64) of ``entries`` for each floating tensor, in one pass over
        row blocks where the upstream steps are row-wise."""
        grams: dict[str, torch.Tensor] = {}

        def add(tensor: str, xs: list) -> None:
            if tensor not in grams:
                grams[tensor] = torch.zeros(len(entries), len(entries), dtype=torch.float64)
            ops.gram_update(grams[tensor], xs)

        self.accumulate(entries, add, label)
        return grams


@contextmanager
def whole_model_errors(step: CompiledStep) -> Iterator[None]:
    """A kernel's ValueError in a whole-model pass (such as the non-finite similarities of
    task vectors let in by ``--allow-nonfinite``) as a runtime error that names the step, as
    the per-tensor work reports its own (exec/evaluate.py)."""
    try:
        yield
    except ValueError as exc:
        raise ExecutionError(f"step {step.name!r} ({step.op}), whole-model pass: {exc}") \
            from exc


def run_recipe(compiled: Compiled, options: RunOptions | None = None) -> RunResult:
    """Run a compiled recipe (see :class:`Runner`).

    A cache entry found corrupt while it is read is removed and the run starts again without
    it (the interrupted attempt committed nothing); the warning lands in ``cache.warnings``.
    """
    options = with_state(compiled, options or RunOptions())
    with _command():
        while True:
            try:
                if options.cluster:  # Dask: imported only then
                    from tvrecipe.exec.cluster import ClusterRunner
                    return ClusterRunner(compiled, options).run()
                return Runner(compiled, options).run()
            except CacheCorrupt as exc:
                options.cache.discard(exc.key, str(exc))


def inspect_step(compiled: Compiled, options: RunOptions, step: str) -> dict:
    """What `tvrecipe inspect` shows of ``step`` (see :meth:`Runner.inspect`), under a run's
    settings and errors."""
    with _command():
        return Runner(compiled, options).inspect(step)


@contextmanager
def _command() -> Iterator[None]:
    """A command's torch settings, given back after it: the math threads' count and IEEE
    float32 products on every device (a caller's TF32 is about 1e-3 off); and running out of
    GPU memory outside a step (reading, a whole-model pass, an inspection's spectra) as a
    located error."""
    previous = torch.get_num_threads()
    threads = compute_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise ExecutionError("the device ran out of memory while reading the inputs, in a "
                             "whole-model pass or in an inspection; use --device cpu") from exc
    finally:
        torch.set_num_threads(previous)
        torch.set_float32_matmul_precision(precision)


def compute_threads() -> int | None:
    """Threads for torch's math: one less than the usable cores, or None to leave as is.

    The reading and writing threads need a core of their own: on a 2-core machine a TIES
    merge ran 18 s with 2 math threads and 14 s with 1 (benchmarks/run.py). Setting
    ``OMP_NUM_THREADS`` overrides this choice.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores() - 1)

