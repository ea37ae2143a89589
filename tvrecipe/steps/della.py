"""The ``della`` op: magnitude-ranked random drops (DELLA's MagPrune, Deep et al., 2024)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from tvrecipe.spec import pertensor
from tvrecipe.spec.kinds import TASK_VECTORS
from tvrecipe.spec.models import PerTensorDensity, Ref, StepSpec
from tvrecipe.spec.pertensor import PER_TENSOR_HELP
from tvrecipe.spec.registry import register


@register
class DellaStep(StepSpec):
    """DELLA: drop entries at random, larger magnitudes kept with higher probability
    (density ± epsilon), and rescale (Deep et al., 2024)."""

    op: Literal["della"] = Field(description="The operation: `della`.")
    input: Ref = Field(description="A vector or vectors.")
    density: PerTensorDensity = Field(
        description="Mean probability of keeping an entry. " + PER_TENSOR_HELP)
    epsilon: pertensor.per_tensor(ge=0.0, lt=1.0) = Field(
        0.15, description="Spread of the keep probabilities around `density`. "
                          + PER_TENSOR_HELP)
    rescale: bool | Literal["l1", "inverse"] = Field(
        True, description="`true` or `l1`: scale kept entries to the tensor's L1 norm (as "
                          "mergekit); `inverse`: divide each by its keep probability (the "
                          "paper's rule, unbiased); `false`: keep them as they are.")

    accepts: ClassVar = {"input": TASK_VECTORS}
    cached: ClassVar = True
    # 2: the L1 rescale's norms summed on one thread (same bytes on any core count).
    version: ClassVar = 2
    seeded: ClassVar = True
    per_tensor: ClassVar = ("density", "epsilon")
    kernel: ClassVar = "tvrecipe.ops:della"
    example: ClassVar = "pruned: {op: della, input: tv, density: 0.4, epsilon: 0.1}"

    @model_validator(mode="after")
    def _inside_unit_interval(self) -> DellaStep:
        # The keep probabilities density ± epsilon must lie in (0, 1) (mergekit's test, as
        # the kernel's): checked here when both are numbers; gradients and rules, whose value
        # depends on the tensor, as the run meets each tensor.
        d, e = self.density, self.epsilon
        if isinstance(d, (int, float)) and isinstance(e, (int, float)) and d < 1 and (
                d + e >= 1 or d - e <= 0):
            raise ValueError(
                f"density ± epsilon must lie strictly inside (0, 1), got density {d!r} and "
                f"epsilon {e!r} (take epsilon below {min(d, 1 - d):g})")
        return self

    def evaluate(self, ctx: Any) -> Any:
        # Results go into the input tensors where nothing reads them later (ctx.map's reuse).
        return ctx.map(ctx.one("input"), lambda t, m: ctx.kernel(
            t, density=ctx.param("density"), epsilon=ctx.param("epsilon"),
            rescale=self.rescale, seed=ctx.seed(m)), reuse=ctx.node("input"))
