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
    rescale: bool = Field(False, description="Scale the kept entries back to the tensor's L1 "
                                             "norm (mergekit's `rescale`).")

    accepts: ClassVar = {"input": TASK_VECTORS}
    cached: ClassVar = True
    # 2: keeps k = max(1, floor(density·n)) entries, as mergekit and peft (1 rounded); and
    # the `rescale` field. 3: the L1 rescale's norms summed on one thread (same bytes on
    # any core count).
    version: ClassVar = 3
    per_tensor: ClassVar = ("density",)
    kernel: ClassVar = "tvrecipe.ops:prune"
    example: ClassVar = "sparse: {op: prune, input: tv, density: 0.1}"

    def evaluate(self, ctx: Any) -> Any:
        from tvrecipe.ops import l1_rescale

        def one(t: Any, _member: str) -> Any:
            kept = ctx.kernel(t, density=ctx.param("density"), by=self.by)
            return l1_rescale(t, kept) if self.rescale else kept

        return ctx.map(ctx.one("input"), one)
