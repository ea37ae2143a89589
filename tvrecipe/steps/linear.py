"""The ``linear`` op: a weighted average of whole checkpoints (mergekit's ``linear``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import CHECKPOINT
from tvrecipe.spec.models import ROWWISE, RefList, StepSpec, Weights
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class LinearStep(StepSpec):
    """Weighted average of checkpoints: Σ w_i θ_i, divided by Σ w_i with `normalize`."""

    op: Literal["linear"] = Field(description="The operation: `linear`.")
    inputs: RefList
    weights: Weights = Field(
        None, description="One weight per entry of `inputs`, a mapping from model name to "
                          "weight, or one scalar for all. Default 1. Each weight: "
                          + PER_TENSOR_HELP)
    normalize: bool = Field(True, description="Divide by the sum of the weights (mergekit's "
                                              "default).")

    accepts: ClassVar = {"inputs": frozenset({CHECKPOINT})}
    # 2: the floating buffers of checkpoint.BUFFERS (rotary inv_freq, GPT-2's mask) are
    # kept from the reference model, not merged
    version: ClassVar = 2
    independent: ClassVar = True
    returns: ClassVar = CHECKPOINT
    execution: ClassVar = ROWWISE
    weighted: ClassVar = "inputs"
    # A checkpoint output copies the first input's config and tokenizer, as mergekit's does
    # without a base model (a soup has no base model for its card, though).
    files_field: ClassVar = "inputs"
    per_tensor: ClassVar = ("weights",)
    kernel: ClassVar = "tvrecipe.ops:linear"
    example: ClassVar = "soup: {op: linear, inputs: [a, b], weights: [0.7, 0.3]}"

    def evaluate(self, ctx: Any) -> Any:
        xs = [ctx.value(r) for r in ctx.refs("inputs")]
        if not ctx.floating(xs[0]):
            return xs[0]  # integer buffers: the first model's
        return ctx.kernel(xs, weights=ctx.weights, normalize=self.normalize)
