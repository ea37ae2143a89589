"""The ``mean`` op: the unweighted mean of task vectors."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import DECOMPOSITION, VECTOR, VECTORS
from tvrecipe.spec.models import ROWWISE, RefList, StepSpec
from tvrecipe.spec.registry import register


@register
class MeanStep(StepSpec):
    """Unweighted mean of task vectors."""

    op: Literal["mean"] = Field(description="The operation: `mean`.")
    inputs: RefList

    accepts: ClassVar = {"inputs": frozenset({VECTOR, VECTORS, DECOMPOSITION})}
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    execution: ClassVar = ROWWISE
    kernel: ClassVar = "tvrecipe.ops:mean"
    example: ClassVar = "avg: {op: mean, inputs: tv}"

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        return None if xs[0] is None else ctx.kernel(xs)
