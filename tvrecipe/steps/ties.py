"""The ``ties`` op: TIES merging, trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import Density, RefList, StepSpec
from tvrecipe.spec.registry import register


@register
class TiesStep(StepSpec):
    """TIES merging: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

    op: Literal["ties"] = Field(description="The operation: `ties`.")
    inputs: RefList
    density: Density = Field(0.2, description="Fraction of entries kept per tensor, by magnitude.")
    weights: float | list[float] | dict[str, float] | None = Field(
        None, description="Per-input weights, as for `sum`. Default 1.")
    majority: Literal["total", "count"] = Field(
        "total", description="Sign election: by total weighted mass or by count of inputs.")
    normalize: bool = Field(True, description="Divide by the sum of the agreeing weights.")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    weighted: ClassVar = "inputs"
    kernel: ClassVar = "tvrecipe.ops:ties"
    example: ClassVar = "merged: {op: ties, inputs: tv, density: 0.2}"

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        if xs[0] is None:
            return None
        return ctx.kernel(xs, density=self.density, weights=ctx.weights,
                          majority=self.majority, normalize=self.normalize)
