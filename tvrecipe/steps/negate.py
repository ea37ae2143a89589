"""The ``negate`` op: minus task vector(s), to forget a task."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import DECOMPOSITION, VECTOR, VECTORS
from tvrecipe.spec.models import ROWWISE, Ref, StepSpec
from tvrecipe.spec.registry import register


@register
class NegateStep(StepSpec):
    """Negate task vector(s): forgetting a task."""

    op: Literal["negate"] = Field(description="The operation: `negate`.")
    input: Ref = Field(description="A vector, vectors or decomposition.")

    accepts: ClassVar = {"input": frozenset({VECTOR, VECTORS, DECOMPOSITION})}
    independent: ClassVar = True
    execution: ClassVar = ROWWISE
    kernel: ClassVar = "tvrecipe.ops:negate"
    example: ClassVar = "detox: {op: negate, input: tv.toxic}"

    def evaluate(self, ctx: Any) -> Any:
        return ctx.map(ctx.one("input"), lambda t, _m: ctx.kernel(t))
