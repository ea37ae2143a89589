"""Per-tensor evaluation of compiled steps: values for one tensor (or one row range of it)."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from tvrecipe import ops
from tvrecipe.errors import ExecutionError
from tvrecipe.exec.buffers import fresh
from tvrecipe.exec.slots import is_decomposition
from tvrecipe.ops.basis import ROW_ALIGN
from tvrecipe.plan.graph import CompiledStep, Entry, Resolved
from tvrecipe.spec.pertensor import value_at
from tvrecipe.spec.registry import kernel
from tvrecipe.store.checkpoint import is_buffer

Value = Any  # Tensor | None | dict[str, Tensor | None] | dict[str, dict[str, Tensor | None]]


def select(value: Value, selector: Iterable[str]) -> Value:
    """The part of a value a dotted reference names (``tv.math``, ``parts.unique.toxic``)."""
    for part in selector:
        value = value[part]
    return value


def entry_value(values: dict[str, Value], entry: Entry) -> torch.Tensor | None:
    """The tensor of one expanded input entry."""
    v = select(values[entry.ref.node], entry.ref.selector)
    if entry.part is not None:
        return v[entry.part][entry.member]
    if entry.member is not None:
        return v[entry.member]
    return v


def map_vectors(value: Value, fn: Callable[[torch.Tensor, str], torch.Tensor],
                cpu_work: bool = False) -> Value:
    """Apply ``fn(tensor, member)`` to a vector, every member of a set, or every part.
    ``cpu_work``: ``fn`` does CPU work on tensors of any device (a random op's draws), so
    large members run on the math threads on a GPU run too."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return fn(value, "")
    if is_decomposition(value):
        return {p: map_vectors(d, lambda t, m, p=p: fn(t, f"{p}.{m}"), cpu_work)
                for p, d in value.items()}
    # Members are independent (and each deterministic): large ones run on parallel threads.
    names = [m for m, t in value.items() if t is not None]
    if not names:
        return dict(value)
    first = value[names[0]]
    where = torch.device("cpu") if cpu_work else first.device
    done = dict(zip(names, ops.parallel_map(lambda m: fn(value[m], m), names,
                                            numel=first.numel(), device=where)))
    return {m: done.get(m) for m in value}


def leaves(value: Value) -> Iterator[Any]:
    """Every leaf of a value (or of a dict of values), however nested: tensors, and the
    None of a missing member."""
    if isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    else:
        yield value


def _tensors_in(value: Value) -> Iterator[torch.Tensor]:
    """Every tensor in a value (or in a dict of values), however nested."""
    return (t for t in leaves(value) if isinstance(t, torch.Tensor))


class TensorContext:
    """What an op's ``evaluate`` sees: its inputs' values for one tensor, and helpers.

    Attributes:
        step: The compiled step.
        tensor: The tensor's name.
        values: Values of the models and steps computed so far, by node name.
    """

    __slots__ = ("_evaluator", "rows", "step", "tensor", "values")

    def __init__(self, evaluator: StepEvaluator, step: CompiledStep, values: dict[str, Value],
                 tensor: str, rows: slice | None = None):
        self._evaluator = evaluator
        self.step = step
        self.tensor = tensor
        self.values = values
        self.rows = rows  # the row block being computed, or None for the whole tensor

    # ---- inputs ----------------------------------------------------------------------------
    def refs(self, fld: str) -> list[Resolved]:
        """The resolved references of a field."""
        return self.step.refs.get(fld, [])

    def node(self, fld: str) -> str:
        """The node a single-reference field names."""
        return self.step.refs[fld][0].node

    def value(self, ref: Resolved) -> Value:
        """The value one reference names."""
        return select(self.values[ref.node], ref.selector)

    def one(self, fld: str) -> Value:
        """The value of a single-reference field."""
        return self.value(self.step.refs[fld][0])

    def entries(self, fld: str) -> list[Entry]:
        """The expanded entries of a field (one per task vector)."""
        return self.step.entries.get(fld, [])

    def tensors(self, fld: str) -> list:
        """One tensor per expanded entry of a field (None where a set has no such tensor).

        An entry that is None beside real floating tensors is an exact zero (a LoRA adapter
        that does not cover this tensor): it comes as zeros, unless the op takes None as zero
        itself (``zero_inputs``). All None stays all None.
        """
        xs = [entry_value(self.values, e) for e in self.step.entries.get(fld, [])]
        if type(self.step.spec).zero_inputs or all(x is None for x in xs):
            return xs
        present = next(x for x in xs if x is not None)
        # (a Deferred is a task vector read when a folding op asks: floating, like its zeros)
        if not (isinstance(present, ops.Deferred) or (isinstance(present, torch.Tensor)
                                                       and present.is_floating_point())):
            return xs
        return [torch.zeros(present.shape, dtype=present.dtype, device=present.device)
                if x is None else x for x in xs]

    @property
    def weights(self) -> list[float] | None:
        """The step's weights for this tensor, one per entry of its ``weighted`` field."""
        weights = self.step.weights
        if weights is None or all(isinstance(w, float) for w in weights):
            return weights
        return [self._at("weights", w, None) for w in weights]

    def param(self, name: str) -> float:
        """A per-tensor parameter's value for this tensor (a number, a layer gradient or rules,
        see :mod:`tvrecipe.spec.pertensor`)."""
        value = getattr(self.step.spec, name)
        if isinstance(value, (int, float)):
            return float(value)
        return self._at(name, value, type(self.step.spec).per_tensor_default(name))

    def _at(self, label: str, value: Any, default: float | None) -> float:
        try:
            return value_at(value, self.tensor, self._evaluator.layers, default=default)
        except LookupError as exc:
            raise ValueError(f"{label}: {exc}; end the rules with a default {{value: ...}}") \
                from None

    @property
    def members(self) -> tuple[str, ...]:
        """Member names of the step's result (a set or a decomposition)."""
        return self.step.type.members or ()

    def floating(self, value: Value) -> bool:
        """True for a floating-point tensor that is a weight: buffers (integer ones, and the
        floating ones of :data:`tvrecipe.store.checkpoint.BUFFERS`) are never merged."""
        return (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not is_buffer(self.tensor, value.dim()))

    # ---- helpers ---------------------------------------------------------------------------
    def kernel(self, *args: Any, **kwargs: Any) -> Any:
        """Call the op's kernel."""
        return kernel(type(self.step.spec))(*args, **kwargs)

    def map(self, value: Value, fn: Callable[[torch.Tensor, str], torch.Tensor],
            reuse: str | None = None, cpu_work: bool = False) -> Value:
        """Apply ``fn(tensor, member)`` to a vector, every member of a set, or every part.

        With ``reuse`` (the node ``value`` comes from), each result is copied into its input
        tensor where nothing reads that input later, and the fresh result is dropped at once:
        a set's results then never coexist with its inputs (a whole-tensor sparsifier over 8
        members held 8 extra embedding-sized tensors). Same bytes either way.
        """
        if reuse is None:
            return map_vectors(value, fn)

        def into_input(t: torch.Tensor, member: str) -> torch.Tensor:
            result = fn(t, member)
            buffer = self.scratch(reuse, t, [result])
            return result if buffer is None else buffer.copy_(result)

        return map_vectors(value, into_input, cpu_work)

    def each(self, fn: Callable[[Any], Any], items: Sequence[Any], like: torch.Tensor
             ) -> list[Any]:
        """``[fn(x) for x in items]``, for independent work on tensors shaped as ``like``; in
        a stream of whole tensors, large ones on the math threads. (For the members of one
        value, :meth:`map` maps them on the math threads in any stream.)

        A row-wise stream keeps it on this thread: it is bound by reading, and its next
        blocks are read meanwhile (by the math threads on many cores: PARALLEL_READS_CORES in
        exec/runner.py). A whole-tensor stream (TIES) left a core idle while
        this thread subtracted eight bases one after the other (2 cores, large benchmark,
        medians of 4: TIES 14.45 → 13.68 s with the same bytes; task arithmetic was 5%
        slower with it).
        """
        if not self._evaluator.whole:
            return [fn(x) for x in items]
        return list(ops.parallel_map(fn, items, numel=like.numel(), device=like.device))

    def seed(self, member: str = "") -> int:
        """The seed of a random op's generator for one member and this tensor: derived from
        (recipe seed, step name, member, tensor name), so never from order or device."""
        return ops.derive_seed(self._evaluator.seed, self.step.name, member, self.tensor)

    def uniform(self, member: str, shape: torch.Size) -> torch.Tensor:
        """Uniform [0, 1) float32 draws (CPU) for this block of the tensor: the rows of
        ``torch.rand(whole shape, generator=Generator().manual_seed(self.seed(member)))``
        that the block covers, so a random op gives the same bytes whether the tensor comes
        whole or in row blocks of any size.

        The CPU generator draws one number per element in order, so a block continues the
        generator where the previous block of the same tensor left it; a block that starts
        elsewhere (not the next one) replays the stream up to its first element.
        """
        return self._evaluator.uniform((self.step.name, member, self.tensor),
                                       lambda: self.seed(member), shape,
                                       (self.rows.start if self.rows else 0)
                                       * math.prod(shape[1:]))

    def stacked(self, like: Sequence[Any], others: Sequence[Any] = ()
                ) -> list[torch.Tensor | None]:
        """Where the new members of a set may go, one per tensor of ``like`` (each result
        has its tensor's shape and dtype): in a whole-model pass that goes by row blocks on
        the CPU, when this step's value is what the pass takes (its Gram products), rows of
        one new tensor, each on a 64-byte boundary, which ops.gram_update reads in place
        instead of copying (9.5 against 16.8 ms a block of 8 × 1M float32 on one thread,
        the same products). Else None each, and the kernel makes its own: rows sharing one
        tensor could not be written in place by a later step. Also None for fewer than two
        members, or when ``like`` and ``others`` (the kernel's other inputs) are not all
        float32 tensors of one shape on the CPU (gram_update stages float64 rows)."""
        first = like[0] if like else None
        if not (self.step.name in self._evaluator.stack and len(like) > 1 and all(
                isinstance(t, torch.Tensor) and t.shape == first.shape
                and t.dtype == torch.float32 and t.device.type == "cpu"
                for t in [*like, *others])):
            return [None] * len(like)
        numel = first.numel()
        per_row = ROW_ALIGN // first.element_size()
        # (8 × 1M float32 is 32 MiB: from the run's pool, or glibc would map it afresh)
        rows = self._evaluator.empty((len(like), -(-numel // per_row) * per_row), first.dtype)
        return [row[:numel].view(first.shape) for row in rows]

    def scratch(self, node: str, t: Value, others: list) -> torch.Tensor | None:
        """``t`` when the op may write its result into it (nothing reads it later), else None.
        ``others`` are the op's other inputs, which must match it in shape and dtype."""
        return self._evaluator._scratch(self.values, node, t, others)

    def reads(self, *selector: str) -> bool:
        """Whether anything reads this part of the step's value (``ctx.reads("unique", m)``):
        a part no step or output takes need not be computed (leave it out of the value)."""
        taken = self._evaluator.reads.get(self.step.name, ())
        return any(sel == selector[:len(sel)] for sel in taken)

    @property
    def kept(self) -> dict[str, torch.Tensor] | None:
        """The state a ``factored`` op kept for this tensor (:meth:`keep`) in this run or a
        cached one, or None: then the op computes it, and keeps it."""
        return self._evaluator.kept.get(self.step.name, {}).get(self.tensor)

    def keep(self, state: dict[str, torch.Tensor]) -> None:
        """Keep a ``factored`` op's per-tensor state: later passes of this run reuse it, and
        the cache stores it (on the CPU) in place of the result."""
        if self.rows is not None:
            raise RuntimeError(f"step {self.step.name!r}: only whole tensors keep a state")
        self._evaluator.kept.setdefault(self.step.name, {})[self.tensor] = {
            k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    @property
    def result(self) -> Any:
        """The step's whole-model result (ops with ``whole_model``)."""
        return self._evaluator.reduced[self.step.name]

    def report_of(self, node: str) -> dict:
        """Another step's run report: what its whole-model pass recorded, in this run or in
        the cache entry this run found it in."""
        return self._evaluator.reports.get(node, {})

    @property
    def report(self) -> dict:
        """The step's run report, to add facts to."""
        return self._evaluator.reports.setdefault(self.step.name, {})


class StepEvaluator:
    """Computes one step's value for the current tensor from its inputs' values.

    Args:
        seed: The recipe's root seed.
        reduced: Whole-model results by step name (ops with ``whole_model``).
        reports: Per-step report dicts that steps append facts to.
    """

    def __init__(self, seed: int, reduced: dict[str, Any], reports: dict[str, dict]):
        self.seed = seed
        self.reduced = reduced
        self.reports = reports
        self.exclusive: set[str] = set()
        # Whether the stream computes whole tensors (not row blocks); see TensorContext.each.
        self.whole = False
        # The nodes whose sets are made as rows of one tensor (TensorContext.stacked): what a
        # whole-model pass hands to its Gram products, which then read them in place.
        self.stack: frozenset[str] = frozenset()
        # CPU allocations of such tensors (the run's BufferPool.empty reuses large ones).
        self.empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = fresh
        # Node -> selectors its readers take (Compiled.reads), for TensorContext.reads.
        self.reads: dict[str, set[tuple[str, ...]]] = {}
        # Factored step -> tensor -> kept state (TensorContext.keep); the runner's, shared by
        # every pass of a run.
        self.kept: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self._storages: Counter | None = None
        # Layers per stack of the model, for per-tensor values (layer gradients).
        self.layers: dict[str, int] = {}
        # (step, member, tensor) -> (generator, index of the next draw): random streams that
        # continue from one row block of a tensor to the next.
        self._streams: dict[tuple[str, str, str], tuple[torch.Generator, int]] = {}

    def twin(self) -> StepEvaluator:
        """An evaluator for another thread (Runner._stream's tensors side by side): the same
        shared tables (reports, kept state, reads), with per-call state of its own."""
        other = copy.copy(self)
        other._storages = None
        other._streams = {}
        return other

    def uniform(self, key: tuple[str, str, str], seed: Callable[[], int], shape: torch.Size,
                offset: int) -> torch.Tensor:
        """Draws ``offset`` to ``offset + numel`` of the stream seeded with ``seed()`` (asked
        for only when the stream starts: a row block that continues it needs no seed)."""
        gen, at = self._streams.pop(key, (None, 0))
        if gen is None or at != offset:
            gen, at = torch.Generator(device="cpu").manual_seed(seed()), 0
            while at < offset:  # replay up to the block (never in a stream's usual order)
                n = min(offset - at, 1 << 22)
                torch.rand(n, generator=gen, dtype=torch.float32)
                at += n
        draw = torch.rand(shape, generator=gen, dtype=torch.float32)
        self._streams[key] = (gen, offset + draw.numel())
        return draw

    def __call__(self, step: CompiledStep, values: dict[str, Value], tensor: str,
                 rows: slice | None = None) -> Value:
        self._storages = None  # storage use counts of ``values``, taken when first needed
        try:
            return step.spec.evaluate(TensorContext(self, step, values, tensor, rows))
        except (ValueError, RuntimeError) as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError if torch.cuda.is_available()
                          else ()):
                raise ExecutionError(f"step {step.name!r} ({step.op}), tensor {tensor!r}: the "
                                     f"device ran out of memory; use --device cpu") from exc
            raise ExecutionError(f"step {step.name!r} ({step.op}), tensor {tensor!r}: {exc}") \
                from exc

    def _scratch(self, values: dict[str, Value], node: str, t: torch.Tensor,
                 others: list) -> torch.Tensor | None:
        """``t`` when a step may write its result into it, else None.

        That is when nothing reads it after this step: its node is read once, by this step
        alone, and is no output or cache entry (``exclusive``), and no other live value shares
        its memory. ``others`` are the step's other inputs, which must match it in shape and
        dtype. Writing in place runs the same kernel into memory already mapped, rather than
        into a fresh tensor-sized allocation (which can cost more than the arithmetic).
        The values' storages are counted once per step: writing in place changes no storage.
        """
        if node not in self.exclusive or not isinstance(t, torch.Tensor):
            return None
        if not t.is_floating_point() or any(
                not isinstance(o, torch.Tensor) or o.shape != t.shape or o.dtype != t.dtype
                for o in others):
            return None
        if self._storages is None:
            self._storages = Counter((v.device, v.untyped_storage().data_ptr())
                                     for v in _tensors_in(values))
        return t if self._storages[(t.device, t.untyped_storage().data_ptr())] == 1 else None
