"""The ``assign`` op: the basis vector most similar to a new task vector."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import VECTOR, VECTORS
from tvrecipe.spec.models import Ref, StepSpec
from tvrecipe.spec.registry import register


@register
class AssignStep(StepSpec):
    """Pick the basis vector most similar (cosine over the whole model) to a new task vector."""

    op: Literal["assign"] = Field(description="The operation: `assign`.")
    input: Ref = Field(description="The new task vector.")
    basis: Ref = Field(description="A `vectors` set, such as a `cluster_basis` result.")

    accepts: ClassVar = {"input": frozenset({VECTOR}), "basis": frozenset({VECTORS})}
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    whole_model: ClassVar = True
    kernel: ClassVar = "tvrecipe.ops:assign"
    example: ClassVar = "near: {op: assign, input: novel, basis: basis}"

    def whole_model_pass(self, ctx: Any) -> int:
        from tvrecipe.ops import cosine_from_gram
        basis = ctx.entries("basis")
        row = cosine_from_gram(ctx.gram([*ctx.entries("input"), *basis]))[0, 1:].tolist()
        chosen = ctx.kernel(row)
        ctx.report.update({"assigned": basis[chosen].name,
                           "cosine": {e.name: c for e, c in zip(basis, row)}})
        return chosen

    def evaluate(self, ctx: Any) -> Any:
        return ctx.tensors("basis")[ctx.result]

    def render_report(self, name: str, report: dict) -> str | None:
        if "assigned" not in report:
            return None
        cos = ", ".join(f"{b} {c:.3f}" for b, c in report["cosine"].items())
        return f"{name} (assign): {report['assigned']} (cosine: {cos})"
