"""The ``decompose`` op: shared and unique parts of task vectors (Damirchi et al., 2025)."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec import pertensor
from tvrecipe.spec.kinds import DECOMPOSITION, TASK_VECTORS, ValueType
from tvrecipe.spec.models import Frozen, RefList, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


class EnergyRank(Frozen):
    """Rank chosen as the smallest r that keeps a fraction of the squared Frobenius norm."""

    energy: float = Field(gt=0.0, le=1.0, description="Fraction of ‖W‖²_F to keep, e.g. 0.9.")


DEFAULT_EXCLUDE = ("*embed_tokens*", "*embeddings*", "*wte*", "*wpe*", "*lm_head*", "*embed_out*")


@register
class DecomposeStep(StepSpec):
    """Split task vectors into shared and unique parts (Damirchi et al., 2025)."""

    op: Literal["decompose"] = Field(description="The operation: `decompose`.")
    inputs: RefList
    reference: RefList | None = Field(
        None, description="Extra task vectors that shape the shared subspace but get no parts "
                          "of their own (detox: decompose the toxic vector against references).")
    method: Literal["sandwich", "chain", "mean_projector"] = Field(
        "sandwich", description="Rule for the shared subspace.")
    threshold: pertensor.per_tensor(gt=0.0, le=1.0) = Field(
        0.85, description="Keep shared directions above it. " + PER_TENSOR_HELP)
    rank: Annotated[int, Field(ge=0)] | EnergyRank = Field(
        default_factory=lambda: EnergyRank(energy=0.9),
        description="Per-task subspace rank: an int, or `{energy: e}`.")
    vectors_1d: Literal["unique", "mean"] = Field(
        "unique", description="1-D and excluded tensors: all unique, or the task mean is shared.")
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="Glob patterns of tensor names handled like 1-D tensors (embeddings by default).")

    accepts: ClassVar = {"inputs": TASK_VECTORS, "reference": TASK_VECTORS}
    returns: ClassVar = DECOMPOSITION
    cached: ClassVar = True
    factored: ClassVar = True  # the cache keeps each tensor's shared basis, not the parts
    # 3: the randomized SVD forms its products thin factor first (other float32 rounding).
    # 4: products, factorisations and norms on one thread (same bytes on any core count).
    version: ClassVar = 4
    per_tensor: ClassVar = ("threshold",)
    kernel: ClassVar = "tvrecipe.ops.decompose:decompose_factors"
    example: ClassVar = "parts: {op: decompose, inputs: tv, threshold: 0.85}"

    def output_type(self, ctx: Any) -> ValueType:
        ents = ctx.entries("inputs")
        ref_ents = ctx.entries("reference") or []
        if ents is not None and len(ents) + len(ref_ents) < 2:
            ctx.problem("inputs", f"decompose needs at least 2 task vectors, got {len(ents)}",
                        "a shared part only exists between tasks: add inputs or a "
                        "'reference' set")
        if ents is not None:
            ctx.distinct_names("inputs", [*ents, *ref_ents], "the parts")
        members = None if ents is None else tuple(e.name for e in ents)
        return ValueType(DECOMPOSITION, members)

    def evaluate(self, ctx: Any) -> Any:
        from tvrecipe.ops.decompose import (
            decomposition_info,
            decomposition_parts,
            shared_coefficients,
        )
        from tvrecipe.ops.parallel import parallel_map
        targets = ctx.tensors("inputs")
        deltas = [*targets, *ctx.tensors("reference")]
        members = ctx.members
        if targets[0] is None:
            return {"shared": dict.fromkeys(members), "unique": dict.fromkeys(members)}
        excluded = any(fnmatch.fnmatchcase(ctx.tensor, p) for p in self.exclude)
        factors = ctx.kept
        first = deltas[0]

        def spread(fn: Any, items: list) -> Any:  # one task's SVD (or parts) per math thread
            return parallel_map(fn, items, numel=first.numel(), device=first.device)

        if factors is None:
            rank = self.rank if isinstance(self.rank, int) else {"energy": self.rank.energy}
            factors = ctx.kernel(deltas, method=self.method, threshold=ctx.param("threshold"),
                                 rank=rank, excluded=excluded, parallel=spread)
            ctx.keep(factors)
        # Facts first: the unique parts may be written into the deltas (reuse).
        coeffs = shared_coefficients(deltas, factors, spread)
        ctx.report.setdefault("tensors", {})[ctx.tensor] = decomposition_info(
            deltas, factors, vectors_1d=self.vectors_1d, excluded=excluded,
            coefficients=coeffs)
        ptrs = [t.data_ptr() for t in deltas]
        reuse = [ptrs.count(p) == 1 and ctx.scratch(e.ref.node, t, []) is not None
                 for e, t, p in zip(ctx.entries("inputs"), targets, ptrs)]
        shared, unique = decomposition_parts(
            deltas[:len(targets)], factors, vectors_1d=self.vectors_1d,
            shared=[ctx.reads("shared", m) for m in members],
            unique=[ctx.reads("unique", m) for m in members], reuse=reuse,
            coefficients=coeffs, parallel=spread)
        # A part nothing reads is left out; None is an exact zero (a 1-D shared part).
        return {"shared": {m: t for m, t in zip(members, shared)
                           if ctx.reads("shared", m)},
                "unique": {m: t for m, t in zip(members, unique)
                           if ctx.reads("unique", m)}}

    def render_report(self, name: str, report: dict) -> str | None:
        if "tensors" not in report:
            return None
        infos = report["tensors"].values()
        sub = [i for i in infos if i.get("mode") == "subspace"]
        dims = [i["shared_dim"] for i in sub]
        mean_dim = sum(dims) / len(dims) if dims else 0
        return (f"{name} (decompose): {len(sub)} tensors split by subspace, "
                f"mean shared dimension {mean_dim:.1f}, "
                f"{len(report['tensors']) - len(sub)} handled as 1-D/excluded")

    def spectra_options(self) -> dict:
        return {"excluded": tuple(self.exclude),
                "k": self.rank if isinstance(self.rank, int) else None}
