"""The ``tsv_merge`` op: TSV-M, Task Singular Vectors merging (Gargiulo et al., 2025)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import RefList, StepSpec
from tvrecipe.spec.registry import register


@register
class TsvMergeStep(StepSpec):
    """TSV-M: each task's top singular vectors per 2-D tensor, decorrelated (Gargiulo et al., 2025).

    Per 2-D tensor each task keeps its top k = ⌊fraction·r/T⌋ singular triplets (r the
    smaller side, T the number of tasks); the stacked left and right singular vectors are
    replaced by their nearest orthonormal matrices (polar factors), and Δ = U⊥·Σ·V⊥ᵀ. Other
    tensors are averaged. Scale the result with `apply` (α ≈ 1).
    """

    op: Literal["tsv_merge"] = Field(description="The operation: `tsv_merge`.")
    inputs: RefList
    fraction: float = Field(1.0, gt=0, le=1,
                            description="Share of the rank r split among the tasks: each "
                                        "keeps ⌊fraction·r/T⌋ (at least 1) singular triplets.")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    independent: ClassVar = True
    returns: ClassVar = VECTOR
    cached: ClassVar = True
    # 3: Gram matrices summed over blocks, tasks one at a time. 4: every product and
    # factorisation on one thread (same bytes on any core count).
    version: ClassVar = 4
    folds: ClassVar = True
    kernel: ClassVar = "tvrecipe.ops.spectral:tsv_merge"
    example: ClassVar = "merged: {op: tsv_merge, inputs: tv}"

    def evaluate(self, ctx: Any) -> Any:
        xs = ctx.tensors("inputs")
        return None if xs[0] is None else ctx.kernel(xs, fraction=self.fraction)

    def spectra_options(self) -> dict:
        return {}
