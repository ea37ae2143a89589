"""The ``sum`` op: a weighted sum of task vectors (task arithmetic)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import DECOMPOSITION, VECTOR, VECTORS
from tvrecipe.spec.models import ROWWISE, RefList, StepSpec, Weights
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class SumStep(StepSpec):
    """Weighted sum of task vectors (task arithmetic)."""

    op: Literal["sum"] = Field(description="The operation: `sum`.")
    inputs: RefList
    weights: Weights = Field(
        None, description="One weight per entry of `inputs` (a weight given for a `vectors` "
                          "reference applies to each member), a mapping from member name to "
                          "weight, or one scalar for all. Default 1. Each weight: "
                          + PER_TENSOR_HELP)

    accepts: ClassVar = {"inputs": frozenset({VECTOR, VECTORS, DECOMPOSITION})}
    independent: ClassVar = True
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    execution: ClassVar = ROWWISE
    weighted: ClassVar = "inputs"
    per_tensor: ClassVar = ("weights",)
    suggested_for: ClassVar = "combine"
    kernel: ClassVar = "tvrecipe.ops:sum"
    example: ClassVar = "merged: {op: sum, inputs: [tv.math, tv.code], weights: [0.5, 0.5]}"

    zero_inputs: ClassVar = True

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        if all(x is None for x in xs):  # (an integer buffer: no vector holds it, and the
            return None                 # weights' rules need not cover it)
        weights = ctx.weights
        nodes = [e.ref.node for e in ctx.entries("inputs")]
        # A None entry is an exact zero (an adapter's uncovered tensor): it adds nothing.
        kept = [(x, w, n) for x, w, n in zip(xs, weights, nodes) if x is not None]
        xs, weights, nodes = (list(c) for c in zip(*kept))
        return ctx.kernel(xs, weights=weights, out=ctx.scratch(nodes[0], xs[0], xs[1:]))
