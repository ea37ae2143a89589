"""How a step's value maps to cache slots: one tensor stream per vector, member or part."""

from __future__ import annotations

from typing import Any

from tvrecipe.plan.graph import DECOMPOSITION, VECTOR, VECTORS


def is_decomposition(value: Any) -> bool:
    """True for a decomposition's per-tensor value: ``{"shared": {...}, "unique": {...}}``."""
    return (isinstance(value, dict) and set(value) == {"shared", "unique"}
            and all(isinstance(v, dict) for v in value.values()))


def slot_names(kind: str, members: tuple[str, ...] | None) -> list[str]:
    """Slot names of a value: ``""`` for a vector, members for a set, ``part.member`` else."""
    if kind == VECTOR:
        return [""]
    if kind == VECTORS:
        return list(members or ())
    if kind == DECOMPOSITION:
        return [f"{p}.{m}" for p in ("shared", "unique") for m in members or ()]
    raise ValueError(f"a {kind} is not cached")


def to_slots(value: Any) -> dict[str, Any]:
    """Flatten a value into its non-empty slots."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        return {"": value}
    if is_decomposition(value):
        return {f"{p}.{m}": t for p, d in value.items() for m, t in d.items() if t is not None}
    return {m: t for m, t in value.items() if t is not None}


def from_slots(slots: dict[str, Any], kind: str) -> Any:
    """Rebuild a value from its slots (the inverse of :func:`to_slots`)."""
    if kind == VECTOR:
        return slots.get("")
    if kind == VECTORS:
        return dict(slots)
    value: dict[str, dict[str, Any]] = {"shared": {}, "unique": {}}
    for slot, t in slots.items():
        part, member = slot.split(".", 1)
        value[part][member] = t
    return value
