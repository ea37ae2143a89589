"""The reference of ops, rendered from their registered definitions (``tvrecipe ops``, docs/ops.md)."""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tvrecipe.spec.models import ROWWISE, SAME_AS_INPUT, StepSpec
from tvrecipe.spec.registry import ops

_HEADER = """# Ops reference

Generated from the op definitions by `tvrecipe ops --markdown > docs/ops.md`; do not edit by
hand. `tvrecipe ops NAME` prints one op's entry; the README describes the recipe language
and notes on the methods, and [adding-an-op.md](adding-an-op.md) how an op is defined.

Kinds: `checkpoint` (full weights), `vector` (one task vector), `vectors` (a named set),
`decomposition` (`.shared` and `.unique` sets). Streaming: `rows` ops go through large
tensors in row blocks of bounded size; `tensor` ops take each tensor whole; a whole-model
pass runs once over every tensor before the per-tensor work.
"""


def _kinds(kinds: frozenset[str]) -> str:
    return " or ".join(sorted(kinds))


def takes_gives(cls: type[StepSpec]) -> str:
    """``field: kinds, ... → result`` of an op."""
    takes = ", ".join(f"{f}: {_kinds(k)}" for f, k in cls.accepts.items())
    gives = "same kind as its input" if cls.returns == SAME_AS_INPUT else cls.returns
    return f"{takes} → {gives}"


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return "`" + json.dumps(value, ensure_ascii=False) + "`"


def _choices(annotation: Any) -> list[Any]:
    """The values a ``Literal`` field (optional or not) allows; [] for any other (a union
    with a number, such as ``k: int | 'auto'``, says its words in its description)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        branches = [a for a in get_args(annotation) if a is not type(None)]
        if all(get_origin(a) is Literal for a in branches):
            return [v for a in branches for v in get_args(a)]
    return []


def _facts(cls: type[StepSpec]) -> list[str]:
    facts = [f"streams by {'rows' if cls.execution == ROWWISE else 'tensor'}"]
    if cls.whole_model:
        facts.append("whole-model pass first")
    facts.append("cached" if cls.cached else "not cached (cheaper to recompute than to read)")
    if cls.seeded:
        facts.append("seeded: its key includes the recipe seed and the step name")
    facts.append(f"version {cls.version}")
    return facts


def entry(cls: type[StepSpec]) -> str:
    """The Markdown reference of one op."""
    name = cls.op_name()
    lines = [f"## `{name}`", "", cls.summary(), "",
             f"- takes → gives: {takes_gives(cls)}",
             f"- engine: {', '.join(_facts(cls))}"]
    if cls.kernel:
        lines.append(f"- kernel: `{cls.kernel.replace(':', '.')}`")
    if cls.example:
        lines.append(f"- example: `{cls.example}`")
    lines += ["", "| field | default | description |", "|---|---|---|"]
    for field, info in cls.model_fields.items():
        if field == "op":
            continue
        desc: Any = info.description or ""
        if field in cls.accepts:
            desc = f"{desc} Takes {_kinds(cls.accepts[field])}.".strip()
        choices = [f"`{c}`" for c in _choices(info.annotation)]
        if choices:
            desc = (f"{desc} " + (f"One of {', '.join(choices)}." if len(choices) > 1
                                  else f"Only {choices[0]}.")).strip()
        desc = desc.replace("|", "\\|")  # a table cell
        lines.append(f"| `{field}` | {_default(info)} | {desc} |")
    return "\n".join(lines) + "\n"


def reference() -> str:
    """The Markdown reference of every registered op (the text of docs/ops.md)."""
    parts = [_HEADER, "| op | takes → gives | summary |", "|---|---|---|"]
    parts += [f"| [`{n}`](#{n}) | {takes_gives(c)} | {c.summary()} |" for n, c in ops().items()]
    return "\n".join(parts) + "\n\n" + "\n".join(entry(c) for c in ops().values())


def listing() -> str:
    """Two lines per op, by name, for the terminal."""
    width = max(len(n) for n in ops())
    return "\n".join(f"{n:<{width}}  {takes_gives(c)}\n{'':<{width}}  {c.summary()}"
                     for n, c in sorted(ops().items()))
