"""The ``decompose`` op: shared and unique parts of task vectors (Damirchi et al., 2025)."""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar, Literal

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
    rank: int | EnergyRank = Field(
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
    per_tensor: ClassVar = ("threshold",)
    kernel: ClassVar = "tvrecipe.ops:decompose"
    example: ClassVar = "parts: {op: decompose, inputs: tv, threshold: 0.85}"

    def output_type(self, ctx: Any) -> ValueType:
        ents = ctx.entries("inputs")
        ref_ents = ctx.entries("reference") or []
        if ents is not None and len(ents) + len(ref_ents) < 2:
            ctx.problem("inputs", f"decompose needs at least 2 task vectors, got {len(ents)}",
                        "a shared part only exists between tasks: add inputs or a "
                        "'reference' set")
        members = None if ents is None else tuple(e.name for e in ents)
        return ValueType(DECOMPOSITION, members)

    def evaluate(self, ctx: Any) -> Any:
        targets = ctx.tensors("inputs")
        refs = ctx.tensors("reference")
        members = ctx.members
        if targets[0] is None:
            return {"shared": dict.fromkeys(members), "unique": dict.fromkeys(members)}
        excluded = any(fnmatch.fnmatchcase(ctx.tensor, p) for p in self.exclude)
        rank = self.rank if isinstance(self.rank, int) else {"energy": self.rank.energy}
        result = ctx.kernel([*targets, *refs], method=self.method,
                            threshold=ctx.param("threshold"),
                            rank=rank, vectors_1d=self.vectors_1d, excluded=excluded)
        ctx.report.setdefault("tensors", {})[ctx.tensor] = result.info
        n = len(targets)
        return {"shared": dict(zip(members, result.shared[:n])),
                "unique": dict(zip(members, result.unique[:n]))}

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
