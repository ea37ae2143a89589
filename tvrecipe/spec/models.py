"""The recipe language as Pydantic models: settings, models, outputs, and the base of every op."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tvrecipe.spec import pertensor
from tvrecipe.spec.kinds import ValueType
from tvrecipe.store.remote import known_schemes, url_scheme

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
# Per-tensor numeric parameters (a number, a layer gradient or match rules).
PerTensor = pertensor.PerTensor
PerTensorDensity = pertensor.per_tensor(gt=0.0, le=1.0)
PerTensorRank = pertensor.per_tensor(ge=1.0)
# A ``weights`` field: one number for all, one value per entry of the weighted list, or a
# mapping by member; each value a number, a layer gradient or match rules.
Weights = float | list[PerTensor] | dict[str, PerTensor] | None


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Settings(Frozen):
    """Run-wide settings."""

    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="Where kernels run: `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.")
    compute_dtype: Literal["float32", "float64"] = Field(
        "float32", description="Dtype every kernel computes in; outputs are cast only when written.")
    seed: int = Field(0, ge=0, strict=True,
                      description="Root seed; every random op derives its own from it.")


class ModelSpec(Frozen):
    """A named input: a checkpoint, or task vectors saved by an earlier run."""

    path: str = Field(description="A folder (Hugging Face layout, sharded or not) or one "
                                  "`.safetensors` file; relative to the recipe's folder. Or "
                                  "the URL of one (`s3://`, `gs://`, `hf://org/model@rev`, "
                                  "`https://`, `file://`), read by byte range with fsspec.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$",
        description="Optional pin: the content hash `tvrecipe hash PATH` prints. A mismatch is an error.")
    kind: Literal["checkpoint", "task_vector", "lora"] = Field(
        "checkpoint", description="`checkpoint`: full weights. `task_vector`: deltas written by a "
                                  "tvrecipe vector or vectors output. `lora`: a peft LoRA "
                                  "adapter folder, read as the task vector s·B·A over `base`.")
    base: Name | None = Field(
        None, description="`kind: lora` only: the checkpoint model the adapter was trained on "
                          "(its tensor names and shapes). Default: the model named `base`.")

    @field_validator("path")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a model path is empty; write the folder or file of the model, "
                             "relative to the recipe's folder")
        scheme = url_scheme(v)
        known = known_schemes() if scheme is not None else None
        if known is not None and scheme not in known:
            raise ValueError(f"unknown URL scheme {scheme}:// in {v!r}; a model path is a local "
                             "path or a URL that fsspec reads, such as s3://, gs://, hf://, "
                             "https:// or file://")
        return v

    @model_validator(mode="after")
    def _base_for_lora(self) -> ModelSpec:
        if self.base is not None and self.kind != "lora":
            raise ValueError("`base` is for `kind: lora` models only")
        return self

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



# How an op's per-tensor work is streamed: ``rowwise`` ops compute a row range of a tensor from
# the same rows of their inputs (large tensors go through in row blocks of bounded size);
# ``tensor`` ops need whole tensors.
ROWWISE, TENSORWISE = "rowwise", "tensor"
# ``returns`` of an op that gives the kind of its one input (scale: vector -> vector, ...).
SAME_AS_INPUT = "same as input"


class StepSpec(Frozen):
    """The base of every op: its YAML fields, and what the engine needs to know to run it.

    An op is one subclass, registered with :func:`tvrecipe.spec.registry.register`: the
    pydantic fields are the YAML fields (``op`` a literal of the op's name), the class
    attributes below declare how the engine handles it, and the methods compute its result.
    The engine (compile, plan, evaluate, cache, lock, report) reads only these.

    Class attributes:
        accepts: Reference field -> the kinds of value it takes.
        returns: The kind of the result, or ``SAME_AS_INPUT``; :meth:`output_type` follows it
            unless the op overrides that.
        cached: Whether results are kept in the content-addressed cache (worth it when
            recomputing costs more than reading back).
        factored: With ``cached``: the cache keeps, per tensor, the small state ``evaluate``
            hands to ``ctx.keep`` (a decomposition's shared basis), not the result. A run
            that finds it gives it back as ``ctx.kept`` and still reads the step's inputs,
            from which ``evaluate`` expands the result (a low-rank result costs a few
            columns of cache instead of full tensors). Needs ``TENSORWISE`` execution.
        execution: ``ROWWISE`` or ``TENSORWISE`` (see above).
        whole_model: The op needs a whole-model pass (:meth:`whole_model_pass`) before its
            per-tensor work (``cluster_basis``'s similarity matrix).
        folds: The kernel takes its task vectors one at a time, in order, and accepts
            :class:`~tvrecipe.ops.deferred.Deferred` ones (called when their turn comes,
            perhaps more than once). Where every reader of an ``extract`` step folds, the
            executor reads that step's fine-tuned models only when the kernel asks for
            them, so one task's delta of a tensor is in memory at a time.
        defers: The reference field whose checkpoints the op hands on deferred when every
            reader of its result folds (``extract``'s ``finetuned``), or None.
        stored: The reference fields whose checkpoint tensors the kernel takes as stored (a
            16-bit float tensor not widened to float32: the kernel widens it piece by piece,
            with the same bytes). In a stream of folding ops, a checkpoint that only such
            fields read is read that way (``extract``'s and ``apply``'s ``base``): half the
            memory of the widened tensor while the op works.
        independent: Each tensor's result depends on that tensor's inputs alone, and the op
            records nothing from one tensor to the next (no report, kept state or random
            stream): a fold stream whose every op is independent, and one of them asks for
            it (:meth:`side_by_side`), evaluates up to two small tensors per core at once,
            on a CPU.
        version: Part of every cache key; bump when the kernel's output for the same inputs
            changes.
        seeded: The op is random (or seeds a clustering): its key includes the recipe's seed
            and the step's name, from which its generators derive.
        weighted: The list field whose entries the ``weights`` field weighs, or None.
        base_field: For an op that makes a checkpoint, the reference field naming the
            checkpoint it derives from (non-weight files are copied from there).
        files_field: For an op that makes a checkpoint from several with none as its base
            (``linear``), the field whose first reference its non-weight files are copied
            from.
        numpy_rerun: The op computes ``base + scale·delta`` with the fields of those names,
            rounded twice, so that a rerun over a cached delta may run in numpy (exec.light).
        per_tensor: Parameters that may vary by tensor (a layer gradient or match rules, see
            :mod:`tvrecipe.spec.pertensor`); ``evaluate`` reads them with ``ctx.param``.
        kernel: ``module:function`` of the main kernel, for the reference docs.
        suggested_for: The mistake the compiler's hints suggest this op for: ``"combine"``
            (a set given where one vector belongs: ``sum``), ``"task_vector"`` (a
            checkpoint given where a task vector belongs: ``extract``), or None.
        example: One YAML line using the op, for the reference docs and error hints.
    """

    accepts: ClassVar[dict[str, frozenset[str]]] = {}
    returns: ClassVar[str] = SAME_AS_INPUT
    cached: ClassVar[bool] = False
    factored: ClassVar[bool] = False
    execution: ClassVar[str] = TENSORWISE
    # The op reads a None entry of ctx.tensors as an exact zero (skips it) itself.
    zero_inputs: ClassVar[bool] = False
    whole_model: ClassVar[bool] = False
    folds: ClassVar[bool] = False
    defers: ClassVar[str | None] = None
    stored: ClassVar[tuple[str, ...]] = ()
    independent: ClassVar[bool] = False
    version: ClassVar[int] = 1
    seeded: ClassVar[bool] = False
    weighted: ClassVar[str | None] = None
    base_field: ClassVar[str | None] = None
    files_field: ClassVar[str | None] = None
    numpy_rerun: ClassVar[bool] = False
    per_tensor: ClassVar[tuple[str, ...]] = ()
    kernel: ClassVar[str] = ""
    example: ClassVar[str] = ""
    suggested_for: ClassVar[str | None] = None

    @classmethod
    def op_name(cls) -> str:
        """The op's name: the value of its ``op`` literal."""
        (name,) = get_args(cls.model_fields["op"].annotation)
        return name

    @classmethod
    def per_tensor_default(cls, field: str) -> float | None:
        """The value a per-tensor field takes where none of its rules matches a tensor: the
        field's numeric default, or None (weights and required fields have none)."""
        default = cls.model_fields[field].default
        return float(default) if isinstance(default, (int, float)) and \
            not isinstance(default, bool) else None

    @classmethod
    def summary(cls) -> str:
        """The first paragraph of the op's docstring, on one line."""
        first = (cls.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(line.strip() for line in first.splitlines())

    def references(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every reference this step makes, with the field path it sits at."""
        refs: list[tuple[tuple[str | int, ...], str]] = []
        for field_name in self.accepts:
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

    def params(self) -> dict[str, Any]:
        """The op's parameters (every field that is not a reference), for cache keys and kernels."""
        skip = {"op", *self.accepts}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}

    # ---- behaviour: the engine calls these ------------------------------------------------
    def by_rows(self) -> bool:
        """Whether this step, with its fields as given, may run on row blocks: ``execution``
        unless a field makes it need the whole tensor (DARE's L1 rescale)."""
        return self.execution == ROWWISE

    def output_type(self, ctx: Any) -> ValueType:
        """The type of the result (compile time), from the inputs' types in ``ctx``.

        Args:
            ctx: A :class:`tvrecipe.plan.graph.TypeContext`: the step's resolved references
                and expanded entries, and ``problem()`` to report a located error.
        """
        if self.returns == SAME_AS_INPUT:
            field = next(iter(self.accepts))
            return ctx.refs[field][0].type
        return ValueType(self.returns)

    def evaluate(self, ctx: Any) -> Any:
        """The result for one tensor (or one row block of it, for ``ROWWISE`` ops).

        Args:
            ctx: A :class:`tvrecipe.exec.evaluate.TensorContext`: the inputs' values for this
                tensor and helpers (seeds, in-place buffers, the whole-model result).
        """
        raise NotImplementedError(f"op {self.op_name()!r} has no evaluate()")

    def whole_model_pass(self, ctx: Any) -> Any:
        """The whole-model result (``whole_model`` ops): computed once, before the per-tensor
        work, with the streaming helpers of ``ctx`` (a :class:`tvrecipe.exec.runner.PassContext`).
        Facts for the run report go into ``ctx.report``."""
        raise NotImplementedError(f"op {self.op_name()!r} has no whole-model pass")

    def members_from(self, result: Any) -> tuple[str, ...] | None:
        """Member names learnt from the whole-model result, when the compiler could not know
        them (``cluster_basis`` with ``k: auto``); None otherwise."""
        return None

    def side_by_side(self) -> bool:
        """Whether a fold stream should evaluate several small tensors at a time for this
        step, up to two per core: its work on one tensor is mostly one thread's (Iso-C's one
        eigendecomposition), so the tensors beside it use the idle cores. Taken only where
        every step of the stream is ``independent``. Ops that spread one tensor's work over
        the cores themselves (TSV-M's tasks) say no: more tensors at once would only hold
        more memory."""
        return False

    def render_report(self, name: str, report: dict) -> str | None:
        """A short text of the step's run report for the terminal, or None."""
        return None

    def spectra_options(self) -> dict | None:
        """For a spectral op, what `tvrecipe inspect` passes to the spectra of its inputs
        (:func:`tvrecipe.exec.spectra.spectra`: ``excluded`` patterns, directions ``k``);
        None (the default) for other ops."""
        return None

    def inspection(self, report: dict) -> dict | None:
        """What ``tvrecipe inspect`` shows of this step from its whole-model report, or None
        to show its value (a cosine matrix of a set, a decomposition's ranks)."""
        return None


class ModelCardSpec(Frozen):
    """What a checkpoint output's model card says beyond what the recipe tells."""

    base_model: Union[str, list[str], None] = Field(  # noqa: UP007
        None, description="Hub id(s) of the base model for the card's front matter. Default: "
                          "the base checkpoint's `_name_or_path` in its config.json, when that "
                          "is a Hub id.")
    license: str | None = Field(None, description="License id for the front matter, e.g. "
                                                  "`apache-2.0`, or `other` with "
                                                  "`license_name` and `license_link`. Default: "
                                                  "the base's, from its README.md's front "
                                                  "matter.")
    license_name: str | None = Field(None, description="With `license: other`: the license's "
                                                       "short name, as the Hub takes it.")
    license_link: str | None = Field(None, description="With `license: other`: the license "
                                                       "file's name (`LICENSE`) or URL.")
    library_name: str | None = Field(
        None, description="Default: `transformers` when the folder has a config.json.")
    tags: list[str] = Field(default_factory=list,
                            description="Tags added to `merge`, `tvrecipe`, `task-vectors`.")


class RankEnergy(Frozen):
    """A rank chosen per tensor: the fewest singular values holding this share of Σσ²."""

    energy: float = Field(gt=0, le=1, description="Share of the squared singular values kept, "
                                                  "in (0, 1].")


class OutputSpec(Frozen):
    """One thing to write."""

    from_: Ref = Field(alias="from", description="The model or step whose value is written.")
    path: str = Field(description="Target folder, relative to the recipe's folder (a local "
                                  "folder: write it, then upload it).")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        None, description="Dtype of floating tensors on disk. Default: the base checkpoint's "
                          "dtype for checkpoints, the compute dtype for task vectors.")
    shard_size: Union[int, str] = Field(  # noqa: UP007
        "5GB", description="Largest shard, e.g. `2GB`, `500MB`, `1.5GiB`, or bytes.",
        json_schema_extra={"minimum": 1, "pattern": _SIZE_RE})  # (numbers, strings)
    copy_files_from: Name | None = Field(
        None, description="A model whose non-weight files (config, tokenizer) are copied. "
                          "Default for checkpoints: the model it derives from (`apply`'s `base`, "
                          "`slerp`'s `a`, `linear`'s first input).")
    format: Literal["safetensors", "peft"] = Field(
        "safetensors", description="`peft`: write a vector as a peft LoRA adapter folder "
                                   "(truncated SVD of each 2-D delta; needs `rank`).")
    rank: Union[Annotated[int, Field(ge=1, strict=True)], RankEnergy, PerTensorRank, None] = Field(  # noqa: UP007
        None, description="`format: peft` only: the LoRA rank of every tensor; "
                          "`{energy: 0.9}` for the fewest singular values holding that share "
                          "of each tensor's Σσ²; or a rank per tensor (rounded): "
                          + pertensor.PER_TENSOR_HELP)
    full_tensors: Literal["drop", "save"] = Field(
        "drop", description="`format: peft` only: tensors that cannot be LoRA targets (norms, "
                            "biases: not 2-D). `drop` leaves them out (the run says how many); "
                            "`save` writes their modules whole (`modules_to_save`, base + "
                            "delta; needs `base`).")
    base: Name | None = Field(
        None, description="`format: peft` with `full_tensors: save`: the checkpoint model the "
                          "vector's deltas are over.")
    base_model: str | None = Field(
        None, description="`format: peft` only: `base_model_name_or_path` in the adapter's "
                          "config (default: the base checkpoint's `_name_or_path` when it is "
                          "a Hub id).")
    model_card: Union[bool, ModelCardSpec] = Field(  # noqa: UP007
        True, description="Checkpoint and `format: peft` outputs only: write `README.md` (a "
                          "model card), `tvrecipe.yaml` (this output's recipe, inputs pinned by hash) and "
                          "`tvrecipe.lock` (its lock entry) into the folder; `false` writes "
                          "none of them; a mapping sets the card's front matter.")
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False,
        # _peft_fields's rules, for editors (JSON Schema's if/then/else).
        json_schema_extra={"allOf": [
            {"if": {"properties": {"format": {"const": "peft"}}, "required": ["format"]},
             "then": {"required": ["rank"]},
             "else": {"properties": {"rank": {"type": "null"}, "base": {"type": "null"},
                                     "base_model": {"type": "null"},
                                     "full_tensors": {"const": "drop"}}}},
            {"if": {"properties": {"full_tensors": {"const": "save"}},
                    "required": ["full_tensors"]},
             "then": {"required": ["base"]}}]})

    @model_validator(mode="after")
    def _peft_fields(self) -> OutputSpec:
        if self.format == "peft" and self.rank is None:
            raise ValueError("`format: peft` needs `rank`: a number such as 16, or "
                             "`{energy: 0.9}`")
        if self.format != "peft" and (self.rank is not None or self.base_model is not None
                                      or self.base is not None or self.full_tensors != "drop"):
            raise ValueError("`rank`, `full_tensors`, `base` and `base_model` are for "
                             "`format: peft` outputs only")
        if self.full_tensors == "save" and self.base is None:
            raise ValueError("`full_tensors: save` writes base + delta: name the checkpoint "
                             "the deltas are over with `base: MODEL`")
        return self

    @field_validator("path")
    @classmethod
    def _local(cls, v: str) -> str:
        if url_scheme(v) is not None:
            raise ValueError(f"{v!r} is a URL, but outputs are written to local folders only; "
                             "write the output to a local folder, then upload it (for example "
                             "`huggingface-cli upload ORG/NAME ./out/merged` or `aws s3 cp "
                             "--recursive ./out/merged s3://…`)")
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if (isinstance(v, int) and v <= 0) or (isinstance(v, str) and not re.match(_SIZE_RE, v)):
            raise ValueError(f"shard_size must be a positive size such as 2GB, 500MB, 1.5GiB "
                             f"or a number of bytes, got {v!r}")
        return v


class Recipe(Frozen):
    """A tvrecipe recipe: inputs, steps, outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="tvrecipe recipe",
                              allow_inf_nan=False)

    tvrecipe: Literal[1] = Field(description="Format version of the recipe language.")
    name: str | None = Field(None, description="Free text.")
    description: str | None = Field(None, description="Free text.")
    settings: Settings = Field(default_factory=Settings, description="Run-wide settings.")
    models: dict[Name, ModelEntry] = Field(description="Named inputs.")
    # The op union is filled in from the registry (tvrecipe.spec.registry.recipe_model).
    steps: dict[Name, Any] = Field(default_factory=dict, description="Named operations, in any order.")
    outputs: dict[Name, OutputSpec] = Field(description="What is written.")
