"""The ``scale`` op: task vector(s) times a factor."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import DECOMPOSITION, VECTOR, VECTORS
from tvrecipe.spec.models import ROWWISE, PerTensor, Ref, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class ScaleStep(StepSpec):
    """Multiply task vector(s) by a factor."""

    op: Literal["scale"] = Field(description="The operation: `scale`.")
    input: Ref = Field(description="A vector, vectors or decomposition.")
    factor: PerTensor = Field(description="The factor c in c·τ. " + PER_TENSOR_HELP)

    accepts: ClassVar = {"input": frozenset({VECTOR, VECTORS, DECOMPOSITION})}
    independent: ClassVar = True
    execution: ClassVar = ROWWISE
    per_tensor: ClassVar = ("factor",)
    kernel: ClassVar = "tvrecipe.ops:scale"
    example: ClassVar = "half: {op: scale, input: tv.math, factor: 0.5}"

    def evaluate(self, ctx: Any) -> Any:
        return ctx.map(ctx.one("input"), lambda t, _m: ctx.kernel(t, factor=ctx.param("factor")))
