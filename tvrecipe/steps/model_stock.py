"""The ``model_stock`` op: the mean task vector scaled by Model Stock's ratio (Jang et al., 2024)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import ROWWISE, RefList, StepSpec
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
    # The ratio t of each tensor comes from a whole-model pass that accumulates each tensor's
    # Gram matrix over row blocks; t · mean(τ) then streams by rows: the deltas are never
    # held whole (mergekit's peak memory holds every model's largest tensor at once).
    whole_model: ClassVar = True
    execution: ClassVar = ROWWISE
    kernel: ClassVar = "tvrecipe.ops:model_stock_merge"
    example: ClassVar = "stock: {op: model_stock, inputs: tv}"

    def output_type(self, ctx: Any) -> Any:
        ents = ctx.entries("inputs")
        if ents is not None and len(ents) < 2:
            ctx.problem("inputs", f"model_stock needs at least 2 task vectors, got {len(ents)}",
                        "the ratio comes from the angle between pairs of fine-tunes")
        return super().output_type(ctx)

    def whole_model_pass(self, ctx: Any) -> dict[str, float]:
        from tvrecipe.ops import model_stock_t_from_gram
        grams = ctx.grams(ctx.entries("inputs"), "model_stock ratios")
        ratios = {t: model_stock_t_from_gram(g) for t, g in grams.items()}
        ctx.report["t"] = ratios
        return ratios

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        if xs[0] is None:
            return None
        if self.filter_wise and xs[0].dim() >= 2:  # one ratio per row: rows are whole here
            from tvrecipe.ops import model_stock_t
            return ctx.kernel(xs, t=model_stock_t(xs, filter_wise=True))
        return ctx.kernel(xs, t=ctx.result[ctx.tensor])

    def render_report(self, name: str, report: dict) -> str | None:
        ratios = list(report.get("t", {}).values())
        if not ratios:
            return None
        return (f"{name} (model_stock): t from {min(ratios):.3f} to {max(ratios):.3f} over "
                f"{len(ratios)} tensors (mean {sum(ratios) / len(ratios):.3f})")
