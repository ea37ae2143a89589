"""The ``prune`` op: keep the largest entries of each tensor by magnitude."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS
from tvrecipe.spec.models import PerTensorDensity, Ref, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class PruneStep(StepSpec):
    """Keep the top `density` fraction of entries of each tensor by magnitude."""

    op: Literal["prune"] = Field(description="The operation: `prune`.")
    input: Ref = Field(description="A vector or vectors.")
    density: PerTensorDensity = Field(
        description="Fraction of entries kept per tensor. " + PER_TENSOR_HELP)
    by: Literal["magnitude"] = Field("magnitude", description="Selection rule.")

    accepts: ClassVar = {"input": TASK_VECTORS}
    cached: ClassVar = True
    per_tensor: ClassVar = ("density",)
    kernel: ClassVar = "tvrecipe.ops:prune"
    example: ClassVar = "sparse: {op: prune, input: tv, density: 0.1}"

    def evaluate(self, ctx: Any) -> Any:
        return ctx.map(ctx.one("input"),
                       lambda t, _m: ctx.kernel(t, density=ctx.param("density"), by=self.by))
