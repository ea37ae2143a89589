"""The tensor plan: which tensors exist, their shapes and dtypes, from safetensors headers only."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tvrecipe.errors import InputError, MissingPackage, TvrecipeError, about
from tvrecipe.plan.graph import (
    CHECKPOINT,
    VECTORS,
    VECTORS_INDEX,
    Compiled,
    CompiledStep,
    lora_base,
)
from tvrecipe.spec.pertensor import layer_counts
from tvrecipe.store.checkpoint import Checkpoint, RemoteCheckpoint, TensorInfo, open_checkpoint
from tvrecipe.store.hashing import checkpoint_digest
from tvrecipe.store.lora import LoraAdapter
from tvrecipe.store.remote import RemotePath

MAX_LISTED = 12
# An output layer's weight, which a model with tied embeddings does not store.
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
# Row blocks of about 1 Mi elements (4 MiB in float32): the blocks of one tensor across a few
# inputs stay in the last-level cache between the steps that use them. Task arithmetic of 8
# fine-tunes (220M parameters, 2-core benchmark machine) ran 1.9-2.2 s with these blocks and
# 2.4-2.6 s with 4 Mi-element ones; 256 Ki-element blocks cost more in per-block overhead.
CHUNK_ELEMENTS = 1 << 20
# Row blocks in flight on each side of the compute of a row-wise stream: read ahead, written
# behind (whole-tensor streams keep one on each side).
READ_AHEAD = 3
# A whole tensor is read ahead of the compute only while its copies from every input take at
# most this much: TIES over 8 fine-tunes of a 220M model held 2.7 GB at peak reading the
# embedding (9 × 131 MB in float32) ahead of the one before it.
PREFETCH_BYTES = 256 << 20


def rowwise(steps: Iterable[CompiledStep]) -> bool:
    """True when every step is row-wise (its result for a row range depends only on the same
    rows of its inputs): the stream then goes in row blocks of bounded size."""
    return all(s.spec.by_rows() for s in steps)


def in_flight(rowwise: bool) -> int:
    """Blocks a stream reads ahead of its compute, and writes behind it."""
    return READ_AHEAD if rowwise else 1


def rows_per_block(shape: tuple[int, ...], chunk: int = CHUNK_ELEMENTS) -> int | None:
    """Rows per block when a row-wise stream splits a tensor of this shape into blocks of
    about ``chunk`` elements (at least one row), or None when it takes the tensor whole."""
    numel = math.prod(shape)
    if len(shape) < 1 or numel <= chunk or shape[0] <= 1:
        return None
    return max(1, chunk // max(numel // shape[0], 1))


@dataclass
class ModelHandle:
    """An opened model input: one checkpoint, or one per member for a saved ``vectors`` set."""

    name: str
    kind: str                         # checkpoint | vector | vectors
    path: Path | RemotePath
    parts: dict[str, Checkpoint]      # "" for checkpoint / vector; member names for vectors

    def files(self) -> list[Path]:
        """The files this input's content hash covers (as the lock's, exec/lockfile.py
        hashed_files): its weight files (an adapter's config too), and a set's vectors.json
        (its members' order is the set's)."""
        index = [self.path / VECTORS_INDEX] if self.kind == VECTORS else []
        return [f for ck in self.parts.values() for f in ck.files] + index

    def close(self) -> None:
        """Close every open file."""
        for ck in self.parts.values():
            ck.close()


@dataclass
class TensorPlan:
    """The tensors a run walks, in read order, and the opened inputs.

    Attributes:
        reference: The model whose tensor order, shapes and dtypes define the plan.
        tensors: Every tensor of the reference, in read order.
        models: Opened inputs by model name.
    """

    reference: str
    tensors: dict[str, TensorInfo]
    models: dict[str, ModelHandle]

    def close(self) -> None:
        """Close every input."""
        for m in self.models.values():
            m.close()

    @property
    def floating(self) -> list[str]:
        """Names of the floating tensors (the ones task vectors have)."""
        return [n for n, t in self.tensors.items() if t.is_floating]

    @functools.cached_property
    def layers(self) -> dict[str, int]:
        """Layers per layer stack of the reference model, for per-tensor layer gradients."""
        return layer_counts(self.tensors)


def needed_models(compiled: Compiled) -> list[str]:
    """Models the outputs depend on, in recipe order."""
    needed: set[str] = set()
    for _, res in compiled.outputs.values():
        needed.add(res.node)
    for step in compiled.steps.values():
        for refs in step.refs.values():
            needed.update(r.node for r in refs)
    # An adapter's deltas take its base's names and shapes (and saved modules its values).
    needed.update(lora_base(compiled.models, m) for m in list(needed)
                  if m in compiled.models and compiled.models[m].kind == "lora")
    return [m for m in compiled.models if m in needed]


def _open(compiled: Compiled, name: str) -> ModelHandle:
    spec = compiled.models[name]
    path = compiled.loaded.resolve(spec.path)
    vt = compiled.model_types[name]
    where = f"model {name!r} ({spec.path})"
    try:
        if vt.kind == VECTORS:
            parts = {m: open_checkpoint(path / f"{m}.safetensors") for m in vt.members or ()}
        elif spec.kind == "lora":
            base = compiled.models[lora_base(compiled.models, name)]
            parts = {"": LoraAdapter(path, open_checkpoint(compiled.loaded.resolve(base.path)))}
        else:
            parts = {"": open_checkpoint(path)}
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    except MissingPackage as exc:  # a URL whose scheme needs a package
        raise about(exc, where) from None
    for part in parts.values():  # a read that fails mid-run names the model too
        for ck in (part, getattr(part, "adapter", None)):
            if isinstance(ck, RemoteCheckpoint) and ck.label is None:
                ck.label = where
    handle = ModelHandle(name, vt.kind, path, parts)
    if spec.sha256:
        try:
            got = checkpoint_digest(handle.files())
        except (InputError, MissingPackage) as exc:
            handle.close()
            raise about(exc, where) from None
        if got.lower() != spec.sha256.lower():
            raise InputError(
                f"{where}: content hash {got} does not match the pinned sha256 {spec.sha256} "
                f"(the files changed since the recipe was pinned); check the model, or update "
                f"the pin with `tvrecipe hash {spec.path}`")
    return handle


def adapter_problems(compiled: Compiled) -> list[str]:
    """Each `kind: lora` model checked against its base's headers (module names, factor
    shapes, supported variants), located at its entry in the recipe; adapters or bases whose
    folders do not exist yet are left to `plan` and `run`."""
    problems = []
    for name, spec in compiled.models.items():
        if spec.kind != "lora":
            continue
        base = compiled.models.get(lora_base(compiled.models, name))
        path = compiled.loaded.resolve(spec.path)
        try:  # a URL that cannot be reached now is left to `plan` and `run` too
            if (base is None or not path.is_dir()
                    or not compiled.loaded.resolve(base.path).exists()):
                continue
        except TvrecipeError:
            continue
        try:
            LoraAdapter(path, open_checkpoint(compiled.loaded.resolve(base.path))).close()
        except InputError as exc:
            problems.append(str(compiled.loaded.source.problem(("models", name), str(exc))))
    return problems


def build_tensor_plan(compiled: Compiled) -> TensorPlan:
    """Open the inputs (headers only) and check that their tensors line up.

    Every floating tensor must exist in every input with the same shape; checkpoints must also
    agree on non-floating tensors. All mismatches are reported together.

    Raises:
        InputError: an input cannot be opened, or tensors are missing or differ in shape.
    """
    names = needed_models(compiled)
    models: dict[str, ModelHandle] = {}
    try:
        for name in names:
            models[name] = _open(compiled, name)
        if not models:
            raise InputError("the outputs use no model")
        reference = next((n for n in names if models[n].kind == CHECKPOINT), names[0])
        ref_tensors = next(iter(models[reference].parts.values())).tensors
        problems: list[str] = []
        heads = set()  # output layers present in some models only
        for name, handle in models.items():
            for member, ck in handle.parts.items():
                label = f"model {name!r}" + (f" member {member!r}" if member else "")
                for t, info in ref_tensors.items():
                    other = ck.tensors.get(t)
                    if other is None:
                        if info.is_floating or handle.kind == CHECKPOINT:
                            problems.append(f"tensor {t!r} is missing from {label} "
                                            f"(present in {reference!r})")
                    elif other.shape != info.shape:
                        problems.append(f"tensor {t!r} has shape {list(other.shape)} in {label} "
                                        f"but {list(info.shape)} in {reference!r}")
                    elif other.is_floating != info.is_floating:
                        problems.append(f"tensor {t!r} is {other.dtype} in {label} but "
                                        f"{info.dtype} in {reference!r}")
                extra = [t for t in ck.tensors if t not in ref_tensors]
                heads.update(t for t in ck.tensors.keys() ^ ref_tensors.keys() if _HEAD.search(t))
                for t in extra:
                    problems.append(f"tensor {t!r} is in {label} but not in {reference!r}")
        if problems:
            shown = problems[:MAX_LISTED]
            more = len(problems) - len(shown)
            tail = f"\n  ... and {more} more" if more else ""
            head = next((t for t in heads if any(repr(t) in p for p in problems)), None)
            why = (f"\n  ({head!r} in some models only: a model whose config ties its output "
                   "layer to its input embeddings (tie_word_embeddings) stores none, and "
                   "tvrecipe does not stand the embeddings in for it (mergekit does): save "
                   "the tied model with its output layer written out, or merge only tied "
                   "models)") if head else ""
            raise InputError(
                "the inputs' tensors do not line up:\n  " + "\n  ".join(shown) + tail + why +
                "\n  (merging needs the same tensors in every input: check that every model "
                "is a fine-tune of the same base)")
    except BaseException:
        for m in models.values():
            m.close()
        raise
    return TensorPlan(reference, dict(ref_tensors), models)
