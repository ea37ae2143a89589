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
    independent: ClassVar = True
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    execution: ClassVar = ROWWISE
    kernel: ClassVar = "tvrecipe.ops:mean"
    example: ClassVar = "avg: {op: mean, inputs: tv}"

    zero_inputs: ClassVar = True

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        kept = [x for x in xs if x is not None]  # None: an exact zero, counted in n
        if not kept:
            return None
        if len(kept) == len(xs):
            return ctx.kernel(kept)
        from tvrecipe.ops import divide_
        from tvrecipe.ops import sum as weighted_sum
        # Σ over the real ones is Σ over all (adding an exact zero changes nothing), / n.
        return divide_(weighted_sum(kept, weights=[1.0] * len(kept)), len(xs))
