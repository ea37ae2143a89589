"""The ``scale`` op: task vector(s) times a factor."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import DECOMPOSITION, VECTOR, VECTORS
from tvrecipe.spec.models import ROWWISE, Ref, StepSpec
from tvrecipe.spec.registry import register


@register
class ScaleStep(StepSpec):
    """Multiply task vector(s) by a factor."""

    op: Literal["scale"] = Field(description="The operation: `scale`.")
    input: Ref = Field(description="A vector, vectors or decomposition.")
    factor: float = Field(description="The factor c in c·τ.")

    accepts: ClassVar = {"input": frozenset({VECTOR, VECTORS, DECOMPOSITION})}
    execution: ClassVar = ROWWISE
    kernel: ClassVar = "tvrecipe.ops:scale"
    example: ClassVar = "half: {op: scale, input: tv.math, factor: 0.5}"

    def evaluate(self, ctx: Any) -> Any:
        return ctx.map(ctx.one("input"), lambda t, _m: ctx.kernel(t, factor=self.factor))
