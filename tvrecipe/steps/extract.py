"""The ``extract`` op: task vectors, fine-tuned weights minus base weights."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from tvrecipe.spec.kinds import CHECKPOINT, VECTOR, VECTORS, ValueType
from tvrecipe.spec.models import ROWWISE, Name, Ref, StepSpec
from tvrecipe.spec.registry import register


@register
class ExtractStep(StepSpec):
    """Task vectors: fine-tuned weights minus base weights."""

    op: Literal["extract"] = Field(description="The operation: `extract`.")
    base: Ref = Field(description="The pre-trained checkpoint.")
    finetuned: (Ref | Annotated[list[Ref], Field(min_length=1)]
                | Annotated[dict[Name, Ref], Field(min_length=1)]) = Field(
        description="One checkpoint (gives a `vector`), a list (a `vectors` set named after the "
                    "models) or a mapping `{member: model}` (a set with those member names).")

    accepts: ClassVar = {"base": frozenset({CHECKPOINT}), "finetuned": frozenset({CHECKPOINT})}
    # 2: the floating buffers of checkpoint.BUFFERS (rotary inv_freq, GPT-2's mask) are
    # kept from the reference model, not merged. 3: a 1-D `attn.bias` is a weight (only a
    # 4-D one is GPT-2's mask): the keys after an extract change, so no cached result made
    # without it is reused
    version: ClassVar = 3
    independent: ClassVar = True
    returns: ClassVar = "vector (one model) or vectors (a list or mapping)"
    execution: ClassVar = ROWWISE
    defers: ClassVar = "finetuned"
    stored: ClassVar = ("base",)
    suggested_for: ClassVar = "task_vector"
    kernel: ClassVar = "tvrecipe.ops:extract"
    example: ClassVar = "tv: {op: extract, base: base, finetuned: [math, code]}"

    def output_type(self, ctx: Any) -> ValueType:
        fin = self.finetuned
        if isinstance(fin, str):
            return ValueType(VECTOR)
        names = list(fin) if isinstance(fin, dict) else [r.split(".")[-1] for r in fin]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            ctx.problem("finetuned", f"member name(s) {', '.join(dupes)} used twice",
                        "give explicit names with a mapping: finetuned: {a: m1, b: m2}")
        return ValueType(VECTORS, tuple(names))

    def evaluate(self, ctx: Any) -> Any:
        base = ctx.one("base")
        if not ctx.floating(base):  # integer buffers have no task vector
            return None if isinstance(self.finetuned, str) else dict.fromkeys(ctx.members)
        from tvrecipe.ops.deferred import Deferred  # (the light executor imports no torch)
        refs = ctx.refs("finetuned")
        fts = [ctx.value(ref) for ref in refs]
        # Members read now, each with where its delta may go (the rows of one tensor in a
        # whole-model pass, else the member's own buffer where nothing reads it later);
        # their subtractions are independent (see TensorContext.each). A deferred one is
        # read when a folding op asks, and makes a delta of its own.
        read = [(ref, ft) for ref, ft in zip(refs, fts) if not isinstance(ft, Deferred)]
        rows = ctx.stacked([ft for _ref, ft in read], [base])
        now = [(ft, row if row is not None else ctx.scratch(ref.node, ft, [base]))
               for (ref, ft), row in zip(read, rows)]
        made = iter(ctx.each(lambda w: ctx.kernel(base, w[0], out=w[1]), now, base))
        deltas = [ft.then(lambda t: ctx.kernel(base, t, out=t)) if isinstance(ft, Deferred)
                  else next(made) for ft in fts]
        if isinstance(self.finetuned, str):
            return deltas[0]
        return dict(zip(ctx.members, deltas))
