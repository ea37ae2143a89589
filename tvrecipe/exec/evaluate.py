"""Per-tensor evaluation of compiled steps: values for one tensor (or one row range of it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from tvrecipe import ops
from tvrecipe.errors import ExecutionError
from tvrecipe.exec.slots import is_decomposition
from tvrecipe.plan.graph import CompiledStep, Entry, Resolved

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


def map_vectors(value: Value, fn: Callable[[torch.Tensor, str], torch.Tensor]) -> Value:
    """Apply ``fn(tensor, member)`` to a vector, every member of a set, or every part."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return fn(value, "")
    if is_decomposition(value):
        return {p: map_vectors(d, lambda t, m, p=p: fn(t, f"{p}.{m}")) for p, d in value.items()}
    # Members are independent (and each deterministic): large ones run on parallel threads.
    names = [m for m, t in value.items() if t is not None]
    if not names:
        return dict(value)
    first = value[names[0]]
    done = dict(zip(names, ops.parallel_map(lambda m: fn(value[m], m), names,
                                            numel=first.numel(), device=first.device)))
    return {m: done.get(m) for m in value}


def _tensors_in(value: Value) -> Iterator[torch.Tensor]:
    """Every tensor in a value (or in a dict of values), however nested."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


class StepEvaluator:
    """Computes one step's value for the current tensor from its inputs' values.

    Args:
        seed: The recipe's root seed.
        reduced: Whole-model results by step name (cluster_basis clusterings).
        reports: Per-step report dicts that steps append facts to.
    """

    def __init__(self, seed: int, reduced: dict[str, Any], reports: dict[str, dict]):
        self.seed = seed
        self.reduced = reduced
        self.reports = reports
        self.exclusive: set[str] = set()
        self._storages: Counter | None = None

    def __call__(self, step: CompiledStep, values: dict[str, Value], tensor: str) -> Value:
        self._storages = None  # storage use counts of ``values``, taken when first needed
        try:
            return getattr(self, "_" + step.op)(step, values, tensor)
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

    @staticmethod
    def _one(step: CompiledStep, values: dict[str, Value], fld: str) -> Value:
        res: Resolved = step.refs[fld][0]
        return select(values[res.node], res.selector)

    @staticmethod
    def _tensors(step: CompiledStep, values: dict[str, Value], fld: str) -> list:
        return [entry_value(values, e) for e in step.entries.get(fld, [])]

    def _extract(self, step, values, tensor):
        base = self._one(step, values, "base")
        fin = step.spec.finetuned
        if not isinstance(base, torch.Tensor) or not base.is_floating_point():
            return None if isinstance(fin, str) else {m: None for m in step.type.members}
        deltas = []
        for ref in step.refs["finetuned"]:
            ft = select(values[ref.node], ref.selector)
            out = self._scratch(values, ref.node, ft, [base])
            deltas.append(ops.extract(base, ft, out=out))
        if isinstance(fin, str):
            return deltas[0]
        return dict(zip(step.type.members, deltas))

    def _apply(self, step, values, tensor):
        base = self._one(step, values, "base")
        delta = self._one(step, values, "delta")
        if delta is None or not base.is_floating_point():
            return base
        out = self._scratch(values, step.refs["delta"][0].node, delta, [base])
        if out is None:
            out = self._scratch(values, step.refs["base"][0].node, base, [delta])
        return ops.apply(base, delta, scale=step.spec.scale, out=out)

    def _scale(self, step, values, tensor):
        return map_vectors(self._one(step, values, "input"),
                           lambda t, _m: ops.scale(t, factor=step.spec.factor))

    def _negate(self, step, values, tensor):
        return map_vectors(self._one(step, values, "input"), lambda t, _m: ops.negate(t))

    def _dare(self, step, values, tensor):
        s = step.spec
        return map_vectors(self._one(step, values, "input"), lambda t, m: ops.dare(
            t, density=s.density, rescale=s.rescale,
            seed=ops.derive_seed(self.seed, step.name, m, tensor)))

    def _prune(self, step, values, tensor):
        s = step.spec
        return map_vectors(self._one(step, values, "input"),
                           lambda t, _m: ops.prune(t, density=s.density, by=s.by))

    def _sum(self, step, values, tensor):
        xs = self._tensors(step, values, "inputs")
        if xs[0] is None:
            return None
        first = step.entries["inputs"][0].ref.node
        return ops.sum(xs, weights=step.weights, out=self._scratch(values, first, xs[0], xs[1:]))

    def _mean(self, step, values, tensor):
        xs = self._tensors(step, values, "inputs")
        return None if xs[0] is None else ops.mean(xs)

    def _ties(self, step, values, tensor):
        s = step.spec
        xs = self._tensors(step, values, "inputs")
        if xs[0] is None:
            return None
        return ops.ties(xs, density=s.density, weights=step.weights, majority=s.majority,
                        normalize=s.normalize)

    def _cluster_basis(self, step, values, tensor):
        s = step.spec
        clustering = self.reduced[step.name]
        xs = self._tensors(step, values, "inputs")
        names = [f"b{j}" for j in range(clustering.k)]
        if xs[0] is None:
            return {n: None for n in names}
        options = {}
        if s.merge == "ties":
            options = {"density": s.density, "majority": s.majority, "normalize": s.normalize}
        return {n: ops.merge_cluster([xs[i] for i in members], merge=s.merge, **options)
                for n, members in zip(names, clustering.members)}

    def _assign(self, step, values, tensor):
        return self._tensors(step, values, "basis")[self.reduced[step.name]]

    def _decompose(self, step, values, tensor):
        import fnmatch
        s = step.spec
        targets = self._tensors(step, values, "inputs")
        refs = self._tensors(step, values, "reference")
        members = step.type.members
        if targets[0] is None:
            return {"shared": dict.fromkeys(members), "unique": dict.fromkeys(members)}
        excluded = any(fnmatch.fnmatchcase(tensor, p) for p in s.exclude)
        rank = s.rank if isinstance(s.rank, int) else {"energy": s.rank.energy}
        result = ops.decompose([*targets, *refs], method=s.method, threshold=s.threshold,
                               rank=rank, vectors_1d=s.vectors_1d, excluded=excluded)
        n = len(targets)
        self.reports.setdefault(step.name, {}).setdefault("tensors", {})[tensor] = result.info
        return {"shared": dict(zip(members, result.shared[:n])),
                "unique": dict(zip(members, result.unique[:n]))}
