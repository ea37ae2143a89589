"""The ``breadcrumbs`` op: drop the largest and the smallest entries (Davari & Belilovsky, 2023)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec import pertensor
from tvrecipe.spec.kinds import TASK_VECTORS
from tvrecipe.spec.models import PerTensorDensity, Ref, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class BreadcrumbsStep(StepSpec):
    """Model Breadcrumbs: per tensor, drop the largest `gamma` fraction of entries by magnitude
    and keep the next `density` fraction (Davari & Belilovsky, 2023)."""

    op: Literal["breadcrumbs"] = Field(description="The operation: `breadcrumbs`.")
    input: Ref = Field(description="A vector or vectors.")
    density: PerTensorDensity = Field(
        description="Fraction of entries kept per tensor. " + PER_TENSOR_HELP)
    gamma: pertensor.per_tensor(ge=0.0, le=1.0) = Field(
        0.01, description="Fraction of the largest entries dropped as outliers. "
                          + PER_TENSOR_HELP)
    rescale: bool = Field(False, description="Scale the kept entries back to the tensor's L1 "
                                             "norm (mergekit's `rescale`).")

    # 2: the L1 rescale's norms summed on one thread (same bytes on any core count).
    version: ClassVar = 2
    accepts: ClassVar = {"input": TASK_VECTORS}
    cached: ClassVar = True
    per_tensor: ClassVar = ("density", "gamma")
    kernel: ClassVar = "tvrecipe.ops:breadcrumbs"
    example: ClassVar = "crumbs: {op: breadcrumbs, input: tv, density: 0.9, gamma: 0.01}"

    def evaluate(self, ctx: Any) -> Any:
        # Results go into the input tensors where nothing reads them later (ctx.map's reuse).
        return ctx.map(ctx.one("input"), lambda t, _m: ctx.kernel(
            t, density=ctx.param("density"), gamma=ctx.param("gamma"), rescale=self.rescale),
            reuse=ctx.node("input"))
