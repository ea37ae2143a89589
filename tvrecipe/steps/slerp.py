"""The ``slerp`` op: spherical interpolation of two checkpoints (mergekit's ``slerp``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import CHECKPOINT, VECTOR, ValueType
from tvrecipe.spec.models import ROWWISE, PerTensor, Ref, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class SlerpStep(StepSpec):
    """Spherical interpolation of two checkpoints (or vectors), tensor by tensor, falling back
    to linear interpolation where they are nearly colinear."""

    op: Literal["slerp"] = Field(description="The operation: `slerp`.")
    a: Ref = Field(description="The t = 0 end (mergekit's base model).")
    b: Ref = Field(description="The t = 1 end.")
    t: PerTensor = Field(description="Interpolation factor, 0 gives `a`, 1 gives `b`. "
                                     + PER_TENSOR_HELP)

    accepts: ClassVar = {"a": frozenset({CHECKPOINT, VECTOR}),
                         "b": frozenset({CHECKPOINT, VECTOR})}
    base_field: ClassVar = "a"
    # 2: the floating buffers of checkpoint.BUFFERS (rotary inv_freq, GPT-2's mask) are
    # kept from the reference model, not merged
    version: ClassVar = 2
    per_tensor: ClassVar = ("t",)
    # The angle of each tensor comes from a whole-model pass that accumulates ‖a‖², ‖b‖² and
    # ⟨a, b⟩ over row blocks; c_a·a + c_b·b then streams by rows, so neither model is held
    # a whole tensor at a time.
    whole_model: ClassVar = True
    execution: ClassVar = ROWWISE
    kernel: ClassVar = "tvrecipe.ops:slerp_combine"
    example: ClassVar = "smooth: {op: slerp, a: code_model, b: math_model, t: [0, 0.5, 1]}"

    def output_type(self, ctx: Any) -> ValueType:
        a, b = ctx.refs["a"][0].type, ctx.refs["b"][0].type
        if a.kind != b.kind:
            ctx.problem("b", f"slerp interpolates two values of one kind, but 'a' is a "
                             f"{a.kind} and 'b' a {b.kind}", "give two checkpoints or two vectors")
        return ValueType(a.kind)

    def whole_model_pass(self, ctx: Any) -> dict[str, Any]:
        return ctx.grams([*ctx.entries("a"), *ctx.entries("b")], "slerp angles")

    def evaluate(self, ctx: Any) -> Any:
        from tvrecipe.ops import slerp_coefficients
        a, b = ctx.one("a"), ctx.one("b")
        if a is None or b is None or not ctx.floating(a):
            return a  # integer buffers: a's
        ca, cb = slerp_coefficients(ctx.result[ctx.tensor], t=ctx.param("t"))
        return ctx.kernel(a, b, ca=ca, cb=cb)
