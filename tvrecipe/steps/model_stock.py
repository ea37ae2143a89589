"""The ``model_stock`` op: the mean task vector scaled by Model Stock's ratio (Jang et al., 2024)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import RefList, StepSpec
from tvrecipe.spec.registry import register


@register
class ModelStockStep(StepSpec):
    """Model Stock: t · mean(τ_i) with t = k·cos / (1 + (k−1)·cos) from the mean pairwise cosine
    of the task vectors, so that applying it gives t · mean(θ_i) + (1 − t) · θ₀."""

    op: Literal["model_stock"] = Field(description="The operation: `model_stock`.")
    inputs: RefList
    filter_wise: bool = Field(False, description="One ratio per row (last dimension) instead "
                                                 "of one per tensor.")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    kernel: ClassVar = "tvrecipe.ops:model_stock"
    example: ClassVar = "stock: {op: model_stock, inputs: tv}"

    def output_type(self, ctx: Any) -> Any:
        ents = ctx.entries("inputs")
        if ents is not None and len(ents) < 2:
            ctx.problem("inputs", f"model_stock needs at least 2 task vectors, got {len(ents)}",
                        "the ratio comes from the angle between pairs of fine-tunes")
        return super().output_type(ctx)

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        return None if xs[0] is None else ctx.kernel(xs, filter_wise=self.filter_wise)
