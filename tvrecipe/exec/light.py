"""Reruns that only apply cached deltas, computed with numpy: the run never imports torch.

Changing the scale of a final ``apply`` leaves one thing to compute: θ₀ + s·τ, from the base
model and the cached τ. Importing torch takes 0.9-1.2 s of such a rerun's ~2 s on the 2-core
benchmark machine, more than the arithmetic. When every step a run must compute is such an
``apply`` (base: a checkpoint model; delta: a cached result; float32 compute; CPU or ``auto``
device), this module does it with numpy instead, and writes the same bytes:

- ``apply`` is two IEEE float32 operations in both executors, ``θ₀ + (s·τ)``
  (:func:`tvrecipe.ops.apply`);
- bfloat16 and float16 inputs widen to float32 exactly;
- float32 → bfloat16 rounds to nearest even with torch's formula (``u + 0x7FFF + lsb``),
  float32 → float16 with numpy's IEEE cast (round to nearest even, as torch's);
- a result holding NaN (possible only from an infinite cached delta times a zero scale) is
  handed to the torch executor instead, whose NaN bit pattern it does not copy.

Any other run, or this one after a cache entry fails its checksum, returns None: the caller
runs the torch executor (which recomputes the entry).
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tvrecipe.exec.lockfile import machine
from tvrecipe.exec.results import (
    Output,
    RunOptions,
    RunResult,
    abort_outputs,
    cache_hits,
    check_written_range,
    commit_outputs,
    nonfinite_input,
    output_metadata,
    progress_bar,
    upstream_reports,
    with_state,
)
from tvrecipe.plan.graph import CHECKPOINT, VECTOR, Compiled, CompiledStep
from tvrecipe.plan.tensors import TensorPlan, build_tensor_plan, in_flight, rows_per_block
from tvrecipe.store.cache import CacheCorrupt, EntryCheck
from tvrecipe.store.checkpoint import Checkpoint, TensorInfo

_F32_MAX = float(np.finfo(np.float32).max)  # this executor computes in float32

__all__ = ["run_light", "to_bfloat16_bits"]

FLOATS = frozenset({"F32", "F16", "BF16"})


class _Unsupported(Exception):
    """This run needs the torch executor after all (found while running; nothing committed)."""


@dataclass
class _Apply:
    """One ``apply`` step to compute: its base model and its cached delta."""

    step: CompiledStep
    base: str
    delta: str
    scale: np.float32


def to_bfloat16_bits(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """The bfloat16 bits (``uint16``) nearest to float32 ``x`` (ties to even), as torch
    rounds; ``x`` must hold no NaN and is left as it is. ``scratch``: a ``uint32`` buffer of
    at least ``x.size`` elements to work in (saves an allocation per call)."""
    u = x.reshape(-1).view(np.uint32)
    t = np.empty_like(u) if scratch is None else scratch[:u.size]
    np.right_shift(u, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(u, t, out=t)
    np.right_shift(t, 16, out=t)
    return t.astype(np.uint16).reshape(x.shape)


def _widen(bits: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of stored floating bits (exact)."""
    if dtype == "BF16":
        return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    if dtype == "F16":
        return bits.view(np.float16).astype(np.float32)
    return bits.view(np.float32)


def _narrow(x: np.ndarray, dtype: str, scratch: np.ndarray | None = None) -> np.ndarray:
    """The bits of float32 ``x`` in the stored dtype ``dtype`` (``x`` is left as it is)."""
    if dtype == "BF16":
        return to_bfloat16_bits(x, scratch)
    if dtype == "F16":
        with np.errstate(over="ignore"):  # beyond float16's range is ±inf, as in torch
            return x.astype(np.float16).view(np.uint16)
    return x.view(np.uint32)


def _finite(x: np.ndarray) -> bool:
    # The largest and smallest value are finite exactly when all are: two vectorised
    # reductions (NaN propagates through both), cheaper than a sum or an isfinite mask.
    return x.size == 0 or bool(np.isfinite(x.max()) and np.isfinite(x.min()))


class _LightRun:
    def __init__(self, compiled: Compiled, options: RunOptions, applies: list[_Apply]):
        self.compiled, self.options, self.applies = compiled, options, applies
        # delta step -> (manifest, its checkpoint per slot, the check of what is read)
        self.cached: dict[str, tuple[dict, dict[str, Checkpoint], EntryCheck]] = {}
        self.plan: TensorPlan | None = None
        self.bytes_read = 0

    def lookup(self) -> bool:
        """Find every delta in the cache (in the torch executor's order, so hits and their
        reports come out alike); False when one is missing or not a single vector."""
        cache, keys = self.options.cache, self.options.keys
        deltas = {a.delta for a in self.applies}
        self.cached = cache_hits(self.compiled, lambda name, _step: (
            cache.lookup(keys[name], False) if name in deltas else None))
        return set(self.cached) == deltas and all(set(s) == {""} for _m, s, _c in
                                                  self.cached.values())

    def supported(self) -> bool:
        """Whether every tensor has dtypes this executor handles as torch would: floating
        ones in float32/float16/bfloat16 in every base (the output takes the reference
        model's dtype), others in the reference's own dtype (copied, not cast)."""
        bases = [self.plan.models[b] for b in self.bases]
        if any(handle.kind != CHECKPOINT for handle in bases):
            return False
        for t, info in self.plan.tensors.items():
            stored = [handle.parts[""].tensors[t].dtype for handle in bases]
            if not info.is_floating:
                if any(dt != info.dtype for dt in stored):
                    return False
            elif any(dt not in FLOATS for dt in stored) or any(
                    ck.tensors.get(t) is not None and ck.tensors[t].dtype != "F32"
                    for _m, slots, _c in self.cached.values() for ck in slots.values()):
                return False
        return True

    @property
    def bases(self) -> list[str]:
        """The base models, in the torch executor's reading order (the plan's)."""
        wanted = {a.base for a in self.applies}
        return [m for m in self.plan.models if m in wanted]

    def read(self, tensor: str, info: TensorInfo, span: tuple[int, int] | None) -> dict:
        """Base values (float32, checked finite) and cached deltas of one block, read in the
        torch executor's order (models, then cache entries), so the first problem met, and
        reported, is the same."""
        got: dict[str, np.ndarray | None] = {}
        for base in self.bases:
            ck = self.plan.models[base].parts[""]
            bits = ck.get_bits(tensor, span)
            self.bytes_read += bits.nbytes
            if info.is_floating:
                bits = _widen(bits, ck.tensors[tensor].dtype)
                if not _finite(bits):
                    raise nonfinite_input(f"model {base!r}", tensor)
            got[base] = bits
        for delta, (_manifest, slots, check) in self.cached.items():
            ck = slots[""]
            entry = ck.tensors.get(tensor)
            if entry is None or not info.is_floating:
                got[delta] = None
                continue
            bits = ck.get_bits(tensor, span)
            check("", tensor, span, entry.shape[0] if entry.shape else 1, bits)
            got[delta] = bits.view(np.float32)
        return got

    def compute(self, info: TensorInfo, got: dict) -> dict[str, np.ndarray]:
        """Each apply step's float32 result (the base's bits for a non-floating tensor)."""
        uses: dict[str, int] = {}
        for a in self.applies:
            uses[a.delta] = uses.get(a.delta, 0) + 1
        out = {}
        for a in self.applies:
            base, delta = got[a.base], got[a.delta]
            if delta is None or not info.is_floating:
                out[a.step.name] = base
                continue
            uses[a.delta] -= 1
            # Overflow to ±inf is the result, as in torch: no warning on stderr.
            with np.errstate(over="ignore"):
                res = np.multiply(delta, a.scale, out=delta if uses[a.delta] == 0 else None)
                res += base
            if res.size and np.isnan(res.max()):  # NaN propagates through max
                raise _Unsupported("NaN in a result")
            out[a.step.name] = res
        return out

    def run(self) -> RunResult | None:
        start = time.perf_counter()
        outputs: dict[str, Output] = {}
        try:
            if not self.lookup():
                return None
            self.plan = build_tensor_plan(self.compiled)
            if not self.supported():
                return None
            metadata = output_metadata(self.compiled, self.options)
            for name in self.compiled.outputs:
                outputs[name] = Output(name, self.compiled, self.plan, self.options, "F32",
                                       metadata)
            written = self._stream(outputs)
            reports = {}
            for d, (m, _s, _c) in self.cached.items():
                # (as the torch executor does)
                reports.update(upstream_reports(m, self.options.keys or {}))
                if m.get("report"):
                    reports[d] = m["report"]
            for o in outputs.values():
                o.finish(self.compiled, reports.get(o.res.node))
            where = machine()  # (numpy, on this CPU)
            paths = commit_outputs(outputs, self.options, where)
        except (CacheCorrupt, _Unsupported) as exc:
            abort_outputs(outputs)
            if isinstance(exc, CacheCorrupt):
                self.options.cache.discard(exc.key, str(exc))
            return None
        except BaseException:
            abort_outputs(outputs)
            raise
        finally:
            if self.plan is not None:
                self.plan.close()
            for _m, slots, _c in self.cached.values():
                for ck in slots.values():
                    ck.close()
        return RunResult(paths, reports, "cpu", time.perf_counter() - start, self.bytes_read,
                         written, ["merge"], list(self.cached),
                         {n: o.digests for n, o in outputs.items()}, machine=where)

    def _stream(self, outputs: dict[str, Output]) -> int:
        """Read ahead on one thread, compute here, write behind on another (numpy, file IO
        and hashing release the GIL); returns the bytes written."""
        items = []
        for tensor, info in self.plan.tensors.items():
            step = rows_per_block(info.shape)
            if step is None:
                items.append((tensor, info, None))
            else:
                items += [(tensor, info, (r, min(r + step, info.shape[0])))
                          for r in range(0, info.shape[0], step)]

        def stored(tensor: str, info: TensorInfo, results: dict[str, np.ndarray]) -> dict:
            # Rounded here, not on the writing thread, which hashes and writes: the three
            # threads then carry about equal work.
            if not info.is_floating:
                return {name: results[o.res.node] for name, o in outputs.items()}
            if not self.options.allow_nonfinite:
                for name, o in outputs.items():
                    x = results[o.res.node]
                    if x.size:
                        check_written_range(name, tensor, o.dtypes[tensor], float(x.min()),
                                            float(x.max()), _F32_MAX)
            return {name: _narrow(results[o.res.node], o.dtypes[tensor], scratch)
                    for name, o in outputs.items()}

        def write(tensor: str, info: TensorInfo, values: dict[str, np.ndarray]) -> int:
            return sum(o.write(tensor, info, values[name]) for name, o in outputs.items())

        scratch = np.empty(max((math.prod(info.shape) if s is None else
                                (s[1] - s[0]) * math.prod(info.shape[1:]))
                               for _t, info, s in items) if items else 0, np.uint32)
        ahead = in_flight(True)
        bar = progress_bar(len(items), "merge", self.options.progress)
        reads: deque = deque()
        writes: deque = deque()
        written = 0
        with (ThreadPoolExecutor(1, thread_name_prefix="tvrecipe-read") as reader,
              ThreadPoolExecutor(1, thread_name_prefix="tvrecipe-write") as writer):
            try:
                reads.extend(reader.submit(self.read, *it) for it in items[:ahead])
                for i, (tensor, info, _span) in enumerate(items):
                    got = reads.popleft().result()
                    if i + ahead < len(items):
                        reads.append(reader.submit(self.read, *items[i + ahead]))
                    values = stored(tensor, info, self.compute(info, got))
                    if len(writes) >= ahead:
                        written += writes.popleft().result()
                    writes.append(writer.submit(write, tensor, info, values))
                    bar.update(1)
                while writes:
                    written += writes.popleft().result()
            finally:
                for f in [*reads, *writes]:
                    f.cancel()
                bar.close()
        return written


def _applies(compiled: Compiled, options: RunOptions) -> list[_Apply] | None:
    """The apply steps to compute, when this executor can run the recipe; else None."""
    settings = compiled.loaded.recipe.settings
    if (options.cache is None or options.keys is None or options.targets
            or options.allow_nonfinite or settings.compute_dtype != "float32"
            or (options.device or settings.device) not in ("auto", "cpu")):
        return None
    applies = []
    for _spec, res in compiled.outputs.values():
        step = compiled.steps.get(res.node)
        if (res.type.kind != CHECKPOINT or res.selector or step is None
                or not step.spec.numpy_rerun
                or _spec.dtype not in (None, "float32", "float16", "bfloat16")):
            return None
        (base,), (delta,) = step.refs["base"], step.refs["delta"]
        if not isinstance(step.spec.scale, (int, float)):
            return None  # a scale that varies by tensor: the torch executor resolves it
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
            scale = np.float32(step.spec.scale)
        if (base.node not in compiled.models or base.selector
                or compiled.type_of(base.node).kind != CHECKPOINT
                or delta.node not in compiled.steps or delta.selector
                or not compiled.steps[delta.node].spec.cached
                or delta.type.kind != VECTOR or delta.node not in options.keys
                or scale == 0 or not math.isfinite(scale)):
            return None
        applies.append(_Apply(step, base.node, delta.node, scale))
    return list({a.step.name: a for a in applies}.values()) or None


def run_light(compiled: Compiled, options: RunOptions) -> RunResult | None:
    """Run the recipe with numpy when all it computes is ``apply`` over cached deltas.

    Returns:
        What the run did, or None when this executor does not run this recipe (the caller
        runs :func:`tvrecipe.exec.runner.run_recipe`); outputs are then untouched, though a
        corrupt cache entry met on the way has been removed and reported in the cache's
        warnings.

    Raises:
        TvrecipeError: as the torch executor would, for a user-facing failure (a NaN in the
            base model, a file that cannot be written, ...); no output is left half-written.
    """
    applies = _applies(compiled, options)
    if applies is None:
        return None
    return _LightRun(compiled, with_state(compiled, options), applies).run()
