"""The ``consensus`` op: mergekit's combine step of task vectors (generalized task arithmetic)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import ROWWISE, RefList, StepSpec, Weights
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class ConsensusStep(StepSpec):
    """Weighted sum of (sparsified) task vectors with mergekit's sign election and
    normalization, exactly as its task_arithmetic, ties, dare, breadcrumbs and della methods
    combine them; `tvrecipe import` writes it after the sparsifying step."""

    op: Literal["consensus"] = Field(description="The operation: `consensus`.")
    inputs: RefList
    weights: Weights = Field(
        None, description="Per-input weights, as for `sum`. Default 1. Each weight: "
                          + PER_TENSOR_HELP)
    majority: Literal["total", "count", "none"] = Field(
        "total", description="Sign election: `total` (the sign of Σ w_i τ_i, + where it is 0), "
                             "`count` (the sign most inputs have, + on a tie) or `none`.")
    normalize: bool = Field(
        True, description="Divide by the sum of the (agreeing) weights; where that is 0, by 1.")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    execution: ClassVar = ROWWISE  # entry by entry across the inputs
    weighted: ClassVar = "inputs"
    per_tensor: ClassVar = ("weights",)
    kernel: ClassVar = "tvrecipe.ops:consensus_merge"
    example: ClassVar = ("merged: {op: consensus, inputs: [sparse.math, sparse.code], "
                         "weights: [0.6, 0.4]}")

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        if xs[0] is None:
            return None
        return ctx.kernel(xs, weights=ctx.weights,
                          majority=None if self.majority == "none" else self.majority,
                          normalize=self.normalize)
