"""The ``cluster_basis`` op: one basis vector per cluster of similar task vectors (Zeng et al.)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from tvrecipe.spec.kinds import TASK_VECTORS, VECTORS, ValueType
from tvrecipe.spec.models import ROWWISE, PerTensorDensity, RefList, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register

MAX_K = 4096  # basis vectors; far beyond any real task library


@register
class ClusterBasisStep(StepSpec):
    """Cluster task vectors by cosine similarity and keep one basis vector per cluster (Zeng et al.)."""

    op: Literal["cluster_basis"] = Field(description="The operation: `cluster_basis`.")
    inputs: RefList
    k: int | Literal["auto"] = Field(
        "auto", description="Number of basis vectors, or `auto`: the largest eigengap of the "
        "normalised Laplacian after the first, kept if its clusters are at least twice as "
        "similar inside as across, else 1 (see docs/methods.md).",
        json_schema_extra={"minimum": 1, "maximum": MAX_K})  # (they bound numbers only)
    k_max: int | None = Field(None, ge=1, description="Upper bound for `k: auto`.")
    merge: Literal["mean", "sum", "ties"] = Field("mean", description="Merge inside a cluster.")
    density: PerTensorDensity = Field(
        0.2, description="With `merge: ties`: fraction kept. " + PER_TENSOR_HELP)
    majority: Literal["total", "count"] = Field("total", description="With `merge: ties`.")
    normalize: bool = Field(True, description="With `merge: ties`.")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    returns: ClassVar = "vectors b0 … b(k-1)"
    cached: ClassVar = True
    # The merge pass goes by row blocks once the clusters are known (a mean or sum is
    # entrywise); `merge: ties` needs each tensor whole for its thresholds (by_rows).
    execution: ClassVar = ROWWISE
    whole_model: ClassVar = True
    seeded: ClassVar = True  # the spectral clustering's eigensolver starts from the seed
    # 2: `merge: ties` trims to k = max(1, floor(density·n)) entries (1 rounded).
    # 3: `k: auto` reads the normalised Laplacian of the zero-diagonal affinity.
    version: ClassVar = 3
    per_tensor: ClassVar = ("density",)
    kernel: ClassVar = "tvrecipe.ops:merge_cluster"
    example: ClassVar = "basis: {op: cluster_basis, inputs: tv, k: auto}"

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= MAX_K:
            raise ValueError(f"k must be 'auto' or between 1 and {MAX_K}, got {v}")
        return v

    def output_type(self, ctx: Any) -> ValueType:
        if isinstance(self.k, int):
            ents = ctx.entries("inputs")
            if ents is not None and self.k > len(ents):
                given = ("only 1 task vector is given" if len(ents) == 1
                         else f"only {len(ents)} task vectors are given")
                ctx.problem("k", f"k = {self.k} but {given}",
                            f"use k between 1 and {len(ents)}, or k: auto")
                return ValueType(VECTORS, None)
            return ValueType(VECTORS, tuple(f"b{i}" for i in range(self.k)))
        return ValueType(VECTORS, ctx.known)  # k: auto: named once the clustering ran

    def whole_model_pass(self, ctx: Any) -> Any:
        from tvrecipe.ops import cluster, cosine_from_gram
        entries = ctx.entries("inputs")
        similarity = cosine_from_gram(ctx.gram(entries))
        clustering = cluster(similarity, k=self.k, k_max=self.k_max, seed=ctx.root_seed)
        names = [e.name for e in entries]
        ctx.report.update({
            **clustering.to_dict(), "tasks": names, "similarity": similarity.tolist(),
            "basis": {f"b{j}": [names[i] for i in members]
                      for j, members in enumerate(clustering.members)}})
        return clustering

    def by_rows(self) -> bool:
        return self.merge != "ties"

    def members_from(self, result: Any) -> tuple[str, ...]:
        return tuple(f"b{j}" for j in range(result.k))

    def evaluate(self, ctx: Any) -> Any:
        clustering = ctx.result
        xs = ctx.tensors("inputs")
        names = [f"b{j}" for j in range(clustering.k)]
        if xs[0] is None:
            return dict.fromkeys(names)
        options = {}
        if self.merge == "ties":
            options = {"density": ctx.param("density"), "majority": self.majority,
                       "normalize": self.normalize}
        return {n: ctx.kernel([xs[i] for i in members], merge=self.merge, **options)
                for n, members in zip(names, clustering.members)}

    def render_report(self, name: str, report: dict) -> str | None:
        if "basis" not in report:
            return None
        lines = [f"{name} (cluster_basis): k = {report.get('k')}"]
        lines += [f"  {b}: {', '.join(tasks)}" for b, tasks in report["basis"].items()]
        return "\n".join(lines)

    def inspection(self, report: dict) -> dict:
        return {"kind": "clusters", "members": report["tasks"], "cosine": report["similarity"],
                "labels": report["labels"], "basis": report["basis"],
                "eigenvalues": report["eigenvalues"]}
