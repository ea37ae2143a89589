"""The recipe language as Pydantic models: one frozen class per op, joined in one discriminated union."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
REF_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Ref = Annotated[
    str,
    Field(pattern=REF_PATTERN,
          description="A reference to a model or step, optionally dotted: `tv`, `tv.math`, "
                      "`parts.unique.toxic`."),
]
RefList = Annotated[
    Ref | Annotated[list[Ref], Field(min_length=1)],
    Field(description="One reference (a `vectors` value stands for all its members) or a list."),
]
Density = Annotated[float, Field(gt=0.0, le=1.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Settings(_Frozen):
    """Run-wide settings."""

    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="Where kernels run: `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.")
    compute_dtype: Literal["float32", "float64"] = Field(
        "float32", description="Dtype every kernel computes in; outputs are cast only when written.")
    seed: int = Field(0, ge=0, description="Root seed; every random op derives its own from it.")


class ModelSpec(_Frozen):
    """A named input: a checkpoint, or task vectors saved by an earlier run."""

    path: str = Field(description="A folder (Hugging Face layout, sharded or not) or one "
                                  "`.safetensors` file; relative to the recipe's folder.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$",
        description="Optional pin: the content hash `tvrecipe hash PATH` prints. A mismatch is an error.")
    kind: Literal["checkpoint", "task_vector"] = Field(
        "checkpoint", description="`checkpoint`: full weights. `task_vector`: deltas written by a "
                                  "tvrecipe vector or vectors output.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return _model_from_string(value)


def _model_from_string(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


# In a recipe a model is a path, or a mapping with a path and options; the schema says both.
ModelEntry = Annotated[
    ModelSpec,
    BeforeValidator(_model_from_string, json_schema_input_type=Union[str, ModelSpec]),  # noqa: UP007
]

_SIZE_RE = r"^\s*(\d+(\.\d*)?|\.\d+)\s*([kKmMgGtT]i?[bB]|[bB])?\s*$"


class _Step(_Frozen):
    def references(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every reference this step makes, with the field path it sits at."""
        refs: list[tuple[tuple[str | int, ...], str]] = []
        for field_name in self.ref_fields:
            value = getattr(self, field_name)
            if value is None:
                continue
            if isinstance(value, str):
                refs.append(((field_name,), value))
            elif isinstance(value, list):
                refs.extend(((field_name, i), v) for i, v in enumerate(value))
            elif isinstance(value, dict):
                refs.extend(((field_name, k), v) for k, v in value.items())
        return refs

    ref_fields: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, Any]:
        """The op's parameters (every field that is not a reference), for cache keys and kernels."""
        skip = {"op", *self.ref_fields}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


class ExtractStep(_Step):
    """Task vectors: fine-tuned weights minus base weights."""

    op: Literal["extract"] = Field(description="The operation: `extract`.")
    base: Ref = Field(description="The pre-trained checkpoint.")
    finetuned: (Ref | Annotated[list[Ref], Field(min_length=1)]
                | Annotated[dict[Name, Ref], Field(min_length=1)]) = Field(
        description="One checkpoint (gives a `vector`), a list (a `vectors` set named after the "
                    "models) or a mapping `{member: model}` (a set with those member names).")
    ref_fields: ClassVar[tuple[str, ...]] = ("base", "finetuned")


class ScaleStep(_Step):
    """Multiply task vector(s) by a factor."""

    op: Literal["scale"] = Field(description="The operation: `scale`.")
    input: Ref = Field(description="A vector, vectors or decomposition.")
    factor: float = Field(description="The factor c in c·τ.")
    ref_fields: ClassVar[tuple[str, ...]] = ("input",)


class NegateStep(_Step):
    """Negate task vector(s): forgetting a task."""

    op: Literal["negate"] = Field(description="The operation: `negate`.")
    input: Ref = Field(description="A vector, vectors or decomposition.")
    ref_fields: ClassVar[tuple[str, ...]] = ("input",)


class SumStep(_Step):
    """Weighted sum of task vectors (task arithmetic)."""

    op: Literal["sum"] = Field(description="The operation: `sum`.")
    inputs: RefList
    weights: float | list[float] | dict[str, float] | None = Field(
        None, description="One weight per entry of `inputs` (a weight given for a `vectors` "
                          "reference applies to each member), a mapping from member name to "
                          "weight, or one scalar for all. Default 1.")
    ref_fields: ClassVar[tuple[str, ...]] = ("inputs",)


class MeanStep(_Step):
    """Unweighted mean of task vectors."""

    op: Literal["mean"] = Field(description="The operation: `mean`.")
    inputs: RefList
    ref_fields: ClassVar[tuple[str, ...]] = ("inputs",)


class TiesStep(_Step):
    """TIES merging: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

    op: Literal["ties"] = Field(description="The operation: `ties`.")
    inputs: RefList
    density: Density = Field(0.2, description="Fraction of entries kept per tensor, by magnitude.")
    weights: float | list[float] | dict[str, float] | None = Field(
        None, description="Per-input weights, as for `sum`. Default 1.")
    majority: Literal["total", "count"] = Field(
        "total", description="Sign election: by total weighted mass or by count of inputs.")
    normalize: bool = Field(True, description="Divide by the sum of the agreeing weights.")
    ref_fields: ClassVar[tuple[str, ...]] = ("inputs",)


class DareStep(_Step):
    """DARE: randomly drop entries and rescale the rest (Yu et al., 2024)."""

    op: Literal["dare"] = Field(description="The operation: `dare`.")
    input: Ref = Field(description="A vector or vectors.")
    density: Density = Field(description="Probability of keeping each entry.")
    rescale: bool = Field(True, description="Divide kept entries by `density`.")
    ref_fields: ClassVar[tuple[str, ...]] = ("input",)


class PruneStep(_Step):
    """Keep the top `density` fraction of entries of each tensor by magnitude."""

    op: Literal["prune"] = Field(description="The operation: `prune`.")
    input: Ref = Field(description="A vector or vectors.")
    density: Density = Field(description="Fraction of entries kept per tensor.")
    by: Literal["magnitude"] = Field("magnitude", description="Selection rule.")
    ref_fields: ClassVar[tuple[str, ...]] = ("input",)


MAX_K = 4096  # basis vectors; far beyond any real task library


class ClusterBasisStep(_Step):
    """Cluster task vectors by cosine similarity and keep one basis vector per cluster (Zeng et al.)."""

    op: Literal["cluster_basis"] = Field(description="The operation: `cluster_basis`.")
    inputs: RefList
    k: int | Literal["auto"] = Field(
        "auto", description="Number of basis vectors, or `auto` (largest Laplacian eigengap).")
    k_max: int | None = Field(None, ge=1, description="Upper bound for `k: auto`.")
    merge: Literal["mean", "sum", "ties"] = Field("mean", description="Merge inside a cluster.")
    density: Density = Field(0.2, description="With `merge: ties`: fraction kept.")
    majority: Literal["total", "count"] = Field("total", description="With `merge: ties`.")
    normalize: bool = Field(True, description="With `merge: ties`.")
    ref_fields: ClassVar[tuple[str, ...]] = ("inputs",)

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= MAX_K:
            raise ValueError(f"k must be 'auto' or between 1 and {MAX_K}, got {v}")
        return v


class AssignStep(_Step):
    """Pick the basis vector most similar (cosine over the whole model) to a new task vector."""

    op: Literal["assign"] = Field(description="The operation: `assign`.")
    input: Ref = Field(description="The new task vector.")
    basis: Ref = Field(description="A `vectors` set, such as a `cluster_basis` result.")
    ref_fields: ClassVar[tuple[str, ...]] = ("input", "basis")


class EnergyRank(_Frozen):
    """Rank chosen as the smallest r that keeps a fraction of the squared Frobenius norm."""

    energy: float = Field(gt=0.0, le=1.0, description="Fraction of ‖W‖²_F to keep, e.g. 0.9.")


DEFAULT_EXCLUDE = ("*embed_tokens*", "*embeddings*", "*wte*", "*wpe*", "*lm_head*", "*embed_out*")


class DecomposeStep(_Step):
    """Split task vectors into shared and unique parts (Damirchi et al., 2025)."""

    op: Literal["decompose"] = Field(description="The operation: `decompose`.")
    inputs: RefList
    reference: RefList | None = Field(
        None, description="Extra task vectors that shape the shared subspace but get no parts "
                          "of their own (detox: decompose the toxic vector against references).")
    method: Literal["sandwich", "chain", "mean_projector"] = Field(
        "sandwich", description="Rule for the shared subspace.")
    threshold: float = Field(0.85, gt=0.0, le=1.0, description="Keep shared directions above it.")
    rank: int | EnergyRank = Field(
        default_factory=lambda: EnergyRank(energy=0.9),
        description="Per-task subspace rank: an int, or `{energy: e}`.")
    vectors_1d: Literal["unique", "mean"] = Field(
        "unique", description="1-D and excluded tensors: all unique, or the task mean is shared.")
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="Glob patterns of tensor names handled like 1-D tensors (embeddings by default).")
    ref_fields: ClassVar[tuple[str, ...]] = ("inputs", "reference")


class ApplyStep(_Step):
    """Add a scaled task vector to a checkpoint."""

    op: Literal["apply"] = Field(description="The operation: `apply`.")
    base: Ref = Field(description="The checkpoint to edit.")
    delta: Ref = Field(description="The task vector to add.")
    scale: float = Field(1.0, description="λ in θ₀ + λ·τ.")
    ref_fields: ClassVar[tuple[str, ...]] = ("base", "delta")


STEP_CLASSES: dict[str, type[_Step]] = {
    "extract": ExtractStep, "scale": ScaleStep, "negate": NegateStep, "sum": SumStep,
    "mean": MeanStep, "ties": TiesStep, "dare": DareStep, "prune": PruneStep,
    "cluster_basis": ClusterBasisStep, "assign": AssignStep, "decompose": DecomposeStep,
    "apply": ApplyStep,
}

# One union over the registry, so a new op is added in one place.
Step = Annotated[Union[tuple(STEP_CLASSES.values())], Field(discriminator="op")]  # noqa: UP007


class OutputSpec(_Frozen):
    """One thing to write."""

    from_: Ref = Field(alias="from", description="The model or step whose value is written.")
    path: str = Field(description="Target folder, relative to the recipe's folder.")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        None, description="Dtype of floating tensors on disk. Default: the base checkpoint's "
                          "dtype for checkpoints, the compute dtype for task vectors.")
    shard_size: Union[int, str] = Field(  # noqa: UP007
        "5GB", description="Largest shard, e.g. `2GB`, `500MB`, `1.5GiB`, or bytes.")
    copy_files_from: Name | None = Field(
        None, description="A model whose non-weight files (config, tokenizer) are copied. "
                          "Default for checkpoints: the base of the checkpoint.")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              allow_inf_nan=False)

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if (isinstance(v, int) and v <= 0) or (isinstance(v, str) and not re.match(_SIZE_RE, v)):
            raise ValueError(f"shard_size must be a positive size such as 2GB, 500MB, 1.5GiB "
                             f"or a number of bytes, got {v!r}")
        return v


class Recipe(_Frozen):
    """A tvrecipe recipe: inputs, steps, outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="tvrecipe recipe",
                              allow_inf_nan=False)

    tvrecipe: Literal[1] = Field(description="Format version of the recipe language.")
    name: str | None = Field(None, description="Free text.")
    description: str | None = Field(None, description="Free text.")
    settings: Settings = Field(default_factory=Settings, description="Run-wide settings.")
    models: dict[Name, ModelEntry] = Field(description="Named inputs.")
    steps: dict[Name, Step] = Field(default_factory=dict, description="Named operations, in any order.")
    outputs: dict[Name, OutputSpec] = Field(description="What is written.")
