"""The kinds of value a model or step produces, and the type a reference resolves to."""

from __future__ import annotations

from dataclasses import dataclass

CHECKPOINT, VECTOR, VECTORS, DECOMPOSITION = "checkpoint", "vector", "vectors", "decomposition"
KINDS = (CHECKPOINT, VECTOR, VECTORS, DECOMPOSITION)
# What most multi-input task-vector ops take: single vectors and whole sets.
TASK_VECTORS = frozenset({VECTOR, VECTORS})


@dataclass(frozen=True)
class ValueType:
    """The kind of a value, and its member names when it is a set (None: known only at run time)."""

    kind: str
    members: tuple[str, ...] | None = None
