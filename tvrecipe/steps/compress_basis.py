"""The ``compress_basis`` and ``rebuild`` ops: n task vectors in m < n atoms, and back
(Zeng et al., task vector bases, later versions)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from tvrecipe.spec.kinds import TASK_VECTORS, VECTORS, ValueType
from tvrecipe.spec.models import ROWWISE, Ref, RefList, StepSpec
from tvrecipe.spec.registry import register


def _atom_names(m: int, mean: bool) -> tuple[str, ...]:
    return tuple(f"atom{i}" for i in range(m)) + (("mean",) if mean else ())


@register
class CompressBasisStep(StepSpec):
    """Compress n task vectors into m < n atoms through their Gram matrix (PCA or autoencoder)."""

    op: Literal["compress_basis"] = Field(description="The operation: `compress_basis`.")
    inputs: RefList
    method: Literal["pca", "autoencoder"] = Field(
        "pca", description="`pca`: centred principal directions, scaled by their singular "
        "value, plus the task mean (member `mean`) for rebuilds; `autoencoder`: atoms that are "
        "convex combinations of the tasks, learned on the Gram matrix.")
    m: int | None = Field(None, ge=1, description="Number of atoms, below the number of task "
                          "vectors; default half of them (at least 1).")
    steps: int = Field(6000, ge=1, le=1_000_000,
                       description="With `method: autoencoder`: Adam steps.")
    lr: float = Field(1e-2, gt=0.0, le=1.0, description="With `method: autoencoder`: Adam's "
                      "learning rate.")
    temperature: float = Field(5.0, gt=0.0, description="With `method: autoencoder`: the "
                               "softmax temperature of the encoder.")

    accepts: ClassVar = {"inputs": TASK_VECTORS}
    returns: ClassVar = "vectors atom0 … atom(m-1), and mean with pca"
    cached: ClassVar = True
    execution: ClassVar = ROWWISE  # each atom is an entrywise combination of the inputs
    whole_model: ClassVar = True
    seeded: ClassVar = True  # the autoencoder's encoder starts from the seed
    kernel: ClassVar = "tvrecipe.ops.compress:pca_basis"
    example: ClassVar = "basis: {op: compress_basis, inputs: tv, method: pca, m: 4}"

    def atoms(self, n: int) -> int:
        """The number of atoms for n task vectors."""
        return self.m if self.m is not None else max(1, n // 2)

    def output_type(self, ctx: Any) -> ValueType:
        ents = ctx.entries("inputs")
        if ents is None:
            return ValueType(VECTORS, None)
        n = len(ents)
        if n < 2:
            ctx.problem("inputs", f"compress_basis needs at least 2 task vectors, got {n}",
                        "a basis smaller than its tasks needs 2 or more of them")
            return ValueType(VECTORS, None)
        if not ctx.distinct_names("inputs", ents, "the tasks a rebuild gives back"):
            return ValueType(VECTORS, None)
        m = self.atoms(n)
        if m >= n:
            ctx.problem("m", f"m = {m} atoms for {n} task vectors: a compressed basis has fewer "
                        "atoms than tasks", f"use m between 1 and {n - 1}")
            return ValueType(VECTORS, None)
        return ValueType(VECTORS, _atom_names(m, self.method == "pca"))

    def whole_model_pass(self, ctx: Any) -> Any:
        from tvrecipe.ops import cosine_from_gram, derive_seed
        from tvrecipe.ops.compress import autoencoder_basis, pca_basis
        entries = ctx.entries("inputs")
        gram = ctx.gram(entries)
        m = self.atoms(len(entries))
        if self.method == "pca":
            basis = pca_basis(gram, m)
        else:
            basis = autoencoder_basis(
                gram, m, seed=derive_seed(ctx.root_seed, ctx.step.name, "autoencoder"),
                steps=self.steps, lr=self.lr, temperature=self.temperature)
        names = [e.name for e in entries]
        atoms = _atom_names(m, basis.mean)
        ctx.report.update({
            "method": self.method, "tasks": names, "atoms": list(atoms),
            "similarity": cosine_from_gram(gram).tolist(),
            # atom -> its weight on each task; task -> its rebuild's weight on each atom
            "encoder": {a: basis.atoms[:, j].tolist() for j, a in enumerate(atoms[:m])},
            "decoder": {t: basis.decoder[:, i].tolist() for i, t in enumerate(names)},
            "relative_error": dict(zip(names, basis.errors)),
            "loss": basis.loss, "bound": basis.bound, **basis.info})
        return basis

    def evaluate(self, ctx: Any) -> Any:
        from tvrecipe.ops.compress import combine
        report = ctx.report
        atoms = report["atoms"]
        xs = ctx.tensors("inputs")
        if xs[0] is None:
            return dict.fromkeys(atoms)
        out = {a: combine(xs, report["encoder"][a]) for a in atoms if a != "mean"}
        if "mean" in atoms:
            out["mean"] = combine(xs, [1.0 / len(xs)] * len(xs))
        return out

    def inspection(self, report: dict) -> dict:
        return {"kind": "compressed basis", "members": report["tasks"],
                "cosine": report["similarity"], "rebuild_error": report["relative_error"],
                "loss": report["loss"], "bound": report["bound"], "atoms": report["atoms"]}

    def render_report(self, name: str, report: dict) -> str | None:
        if "relative_error" not in report:
            return None
        errs = report["relative_error"]
        worst = max(errs, key=errs.get)
        atoms = [a for a in report["atoms"] if a != "mean"]
        mean = " and the mean" if "mean" in report["atoms"] else ""
        return (f"{name} (compress_basis, {report['method']}): {len(atoms)} atoms{mean} "
                f"for {len(errs)} tasks; rebuild error (relative, squared) mean "
                f"{sum(errs.values()) / len(errs):.4f}, worst {worst} {errs[worst]:.4f}; "
                f"loss {report['loss']:.4g} against the Eckart–Young bound "
                f"{report['bound']:.4g}")


@register
class RebuildStep(StepSpec):
    """Rebuild task vectors from a compress_basis step's atoms (for negation or inspection)."""

    op: Literal["rebuild"] = Field(description="The operation: `rebuild`.")
    basis: Ref = Field(description="A `compress_basis` step.")
    tasks: list[str] | None = Field(
        None, description="Tasks to rebuild, by their names in the basis's inputs; default all.")

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("[] names no task: leave 'tasks' out to rebuild every "
                             "task, or name the ones to rebuild")
        return v

    accepts: ClassVar = {"basis": frozenset({VECTORS})}
    returns: ClassVar = "vectors named by task"
    execution: ClassVar = ROWWISE
    kernel: ClassVar = "tvrecipe.ops.compress:combine"
    example: ClassVar = "rebuilt: {op: rebuild, basis: basis, tasks: [math]}"

    def output_type(self, ctx: Any) -> ValueType:
        ref = ctx.refs["basis"][0]
        source = ctx.step(ref.node)
        if ref.selector or source is None or source.op != "compress_basis":
            ctx.problem("basis", f"{ref.text!r} is not a compress_basis step",
                        "name a step whose op is compress_basis, whole (basis, not basis.atom0)")
            return ValueType(VECTORS, None)
        names = tuple(e.name for e in source.entries.get("inputs", []))
        for t in self.tasks or ():
            if t not in names:
                ctx.problem("tasks", f"{t!r} is not a task of {ref.node!r}",
                            "its tasks: " + ", ".join(names))
                return ValueType(VECTORS, None)
        return ValueType(VECTORS, tuple(self.tasks) if self.tasks else names)

    def evaluate(self, ctx: Any) -> Any:
        atoms = ctx.one("basis")
        report = ctx.report_of(ctx.node("basis"))
        tasks = ctx.members
        if atoms is None or all(v is None for v in atoms.values()):
            return dict.fromkeys(tasks)
        names = [a for a in report["atoms"] if a != "mean"]
        xs = [atoms[a] for a in names]
        out = {}
        for t in tasks:
            weights = report["decoder"][t]
            if "mean" in atoms:
                out[t] = ctx.kernel([atoms["mean"], *xs], [1.0, *weights])
            else:
                out[t] = ctx.kernel(xs, weights)
        return out
