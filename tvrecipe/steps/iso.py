"""The ``iso`` op: Iso-C and Iso-CTS, isotropic merging (Marczak et al., 2025)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import RefList, StepSpec
from tvrecipe.spec.registry import register


@register
class IsoStep(StepSpec):
    """Iso-C / Iso-CTS: the summed task vectors with a flat singular spectrum (Marczak et al., 2025).

    Per 2-D tensor, Δ_TA = Σ_t Δ_t = U·Σ·Vᵀ. `variant: c` gives σ̄·U·Vᵀ (σ̄ the mean singular
    value). `variant: cts` keeps the top ⌊common·r⌋ directions of Δ_TA and adds each task's
    top directions outside them, orthogonalises the stacked directions (polar factors) and
    sets every singular value to their mean. Other tensors are averaged. Scale the result
    with `apply`.
    """

    op: Literal["iso"] = Field(description="The operation: `iso`.")
    inputs: RefList
    variant: Literal["c", "cts"] = Field("c", description="`c` (Iso-C) or `cts` (Iso-CTS).")
    common: float = Field(0.8, ge=0, le=1,
                          description="`cts` only: share of the rank kept for the common "
                                      "subspace (then moved to the nearest k whose rest "
                                      "divides among the tasks).")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    independent: ClassVar = True
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    # 3: Gram matrices summed over blocks, tasks one at a time. 4: every product and
    # factorisation on one thread (same bytes on any core count). 5: Iso-CTS's k rounded as
    # the reference implementation does (it was rounded down, raising k). 6: Iso-CTS leaves
    # residual directions at the rounding floor out (a low-rank task's residual is noise),
    # and σ̄ is the stacked values' sum over r (over fewer for a rank-deficient Δ_TA before).
    version: ClassVar = 6
    folds: ClassVar = True
    kernel: ClassVar = "tvrecipe.ops.spectral:iso"
    example: ClassVar = "merged: {op: iso, inputs: tv, variant: cts}"

    def side_by_side(self) -> bool:
        # Iso-C: one eigendecomposition per tensor, on one thread (24.96 s against 35.3 s
        # for the large benchmark on 2 cores, two tensors at a time). Iso-CTS spreads its
        # tasks' spectra over the math threads: two at a time saved 3% of its time and
        # added 54 MB to its peak.
        return self.variant == "c"

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        return None if xs[0] is None else ctx.kernel(xs, variant=self.variant,
                                                     common=self.common)

    def spectra_options(self) -> dict:
        return {}
