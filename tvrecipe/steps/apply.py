"""The ``apply`` op: add a scaled task vector to a checkpoint."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import CHECKPOINT, VECTOR
from tvrecipe.spec.models import ROWWISE, PerTensor, Ref, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class ApplyStep(StepSpec):
    """Add a scaled task vector to a checkpoint."""

    op: Literal["apply"] = Field(description="The operation: `apply`.")
    base: Ref = Field(description="The checkpoint to edit.")
    delta: Ref = Field(description="The task vector to add.")
    scale: PerTensor = Field(1.0, description="λ in θ₀ + λ·τ. " + PER_TENSOR_HELP)

    accepts: ClassVar = {"base": frozenset({CHECKPOINT}), "delta": frozenset({VECTOR})}
    independent: ClassVar = True
    stored: ClassVar = ("base",)
    returns: ClassVar = CHECKPOINT
    execution: ClassVar = ROWWISE
    # 2: θ₀ + (s·τ) rounded twice, as numpy and CUDA give it; version 1 fused the multiply-add.
    version: ClassVar = 2
    base_field: ClassVar = "base"
    numpy_rerun: ClassVar = True
    per_tensor: ClassVar = ("scale",)
    kernel: ClassVar = "tvrecipe.ops:apply"
    example: ClassVar = "model: {op: apply, base: base, delta: merged, scale: 0.8}"

    def evaluate(self, ctx: Any) -> Any:
        base, delta = ctx.one("base"), ctx.one("delta")
        if delta is None or not ctx.floating(base):
            return base  # buffers (integer, or rebuilt from the config) are the base's
        # (A base read as stored, 16-bit, is added piece by piece into the delta.)
        out = ctx.scratch(ctx.node("delta"), delta, [base] if base.dtype == delta.dtype else [])
        if out is None:
            out = ctx.scratch(ctx.node("base"), base, [delta])
        return ctx.kernel(base, delta, scale=ctx.param("scale"), out=out)
