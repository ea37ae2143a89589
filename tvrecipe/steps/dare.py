"""The ``dare`` op: drop entries at random and rescale the rest (Yu et al., 2024)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS
from tvrecipe.spec.models import ROWWISE, PerTensorDensity, Ref, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class DareStep(StepSpec):
    """DARE: randomly drop entries and rescale the rest (Yu et al., 2024)."""

    op: Literal["dare"] = Field(description="The operation: `dare`.")
    input: Ref = Field(description="A vector or vectors.")
    density: PerTensorDensity = Field(
        description="Probability of keeping each entry. " + PER_TENSOR_HELP)
    rescale: bool | Literal["l1"] = Field(
        True, description="`true`: divide kept entries by `density` (unbiased); `l1`: scale "
                          "them back to the tensor's L1 norm (mergekit 0.1's `rescale`); "
                          "`false`: keep them as they are.")

    accepts: ClassVar = {"input": TASK_VECTORS}
    cached: ClassVar = True
    # Row blocks draw their share of the tensor's keyed stream (ctx.uniform): same bytes as
    # whole tensors. `rescale: l1` needs the whole tensor's norms (by_rows).
    execution: ClassVar = ROWWISE
    # 2: every zero of the result is +0.0 (a kept -0.0 input was -0.0 in version 1).
    # 3: `rescale: l1`'s norms summed on one thread (same bytes on any core count).
    version: ClassVar = 3
    seeded: ClassVar = True
    per_tensor: ClassVar = ("density",)
    kernel: ClassVar = "tvrecipe.ops:dare"
    example: ClassVar = "dropped: {op: dare, input: tv, density: 0.3}"

    def by_rows(self) -> bool:
        return self.rescale != "l1"

    def evaluate(self, ctx: Any) -> Any:
        from tvrecipe.ops import l1_rescale

        def one(t: Any, member: str) -> Any:
            kept = ctx.kernel(t, density=ctx.param("density"), rescale=self.rescale is True,
                              draw=ctx.uniform(member, t.shape))
            return l1_rescale(t, kept) if self.rescale == "l1" else kept

        # The draws are CPU work whatever the device: members draw on parallel threads.
        return ctx.map(ctx.one("input"), one, reuse=ctx.node("input"), cpu_work=True)
