"""The ``ties`` op: TIES merging, trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import PerTensorDensity, RefList, StepSpec, Weights
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class TiesStep(StepSpec):
    """TIES merging: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

    op: Literal["ties"] = Field(description="The operation: `ties`.")
    inputs: RefList
    density: PerTensorDensity = Field(
        0.2, description="Fraction of entries kept per tensor, by magnitude. " + PER_TENSOR_HELP)
    weights: Weights = Field(
        None, description="Per-input weights, as for `sum`. Default 1. Each weight: "
                          + PER_TENSOR_HELP)
    majority: Literal["total", "count"] = Field(
        "total", description="Sign election: by total weighted mass or by count of inputs.")
    normalize: bool = Field(True, description="Divide by the sum of the agreeing inputs' "
                                              "|weights|.")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    # 2: the trim keeps k = max(1, floor(density·n)) entries, as mergekit and peft (1 rounded).
    version: ClassVar = 2
    weighted: ClassVar = "inputs"
    per_tensor: ClassVar = ("density", "weights")
    kernel: ClassVar = "tvrecipe.ops:ties"
    example: ClassVar = "merged: {op: ties, inputs: tv, density: 0.2}"

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        if xs[0] is None:
            return None
        return ctx.kernel(xs, density=ctx.param("density"), weights=ctx.weights,
                          majority=self.majority, normalize=self.normalize)
