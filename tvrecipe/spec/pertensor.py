"""Per-tensor parameter values: a number, a layer gradient or match rules, as in mergekit."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

# Text an op field's description can end with, so the schema tells what the field accepts.
PER_TENSOR_HELP = (
    "A number; a layer gradient `[first, ..., last]` (at least 2 numbers, interpolated "
    "piecewise-linearly from the first layer to the last); or rules `[{match: PATTERN, value: "
    "NUMBER | GRADIENT}, ..., {value: DEFAULT}]` where the first rule whose pattern matches the "
    "tensor name wins.")

GLOB_CHARS = frozenset("*?[")

# The layer stacks of mergekit's architecture files (`model.layers.${layer_index}.`,
# `transformer.h.`, `encoder.layer.`, `visual.blocks.`, `decoder.block.`, ...): the first
# `<stack>.<N>` component of a name is its layer.
_LAYER_RE = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")

# Union branch tags: load.py drops loc parts named like pydantic's own branch names, so an error
# inside a rule list is reported at `weights[1].value`, not `weights.rules[1].value`.
_NUMBER, _GRADIENT, _RULES = "float", "list[float]", "list[Rule]"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rule(value: Any) -> bool:
    return isinstance(value, (Mapping, Rule))


def _shape(value: Any) -> str:
    """The union branch for raw or validated input (the discriminator)."""
    if isinstance(value, (list, tuple)):
        return _RULES if any(_is_rule(v) for v in value) else _GRADIENT
    # Anything else goes to the number branch, whose error ("Input should be a valid number")
    # is the right one for a string or null.
    return _NUMBER


# The shape checks raise ValueError (not TypeError, as ruff's TRY004 asks): pydantic turns only
# ValueError and AssertionError into validation errors.


def _check_scalar_or_gradient(value: Any) -> Any:
    """Shape errors with messages that say what to write instead."""
    if isinstance(value, bool):
        # pydantic would read true as 1.0: a boolean weight is almost surely a mistake.
        raise ValueError(f"expected a number, got {str(value).lower()}")  # noqa: TRY004
    if isinstance(value, Mapping):
        raise ValueError(  # noqa: TRY004
            "a rule's value is a number or a layer gradient, not a mapping (rules do not nest)")
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, Mapping) for v in value):
            raise ValueError("a rule's value is a number or a layer gradient, not rules "
                             "(rules do not nest)")
        if any(isinstance(v, (bool, list, tuple)) for v in value):
            raise ValueError(f"expected numbers, got {_yaml(value)}")
        if not value:
            raise ValueError("a layer gradient needs at least 2 values, got []")
        if len(value) == 1:
            raise ValueError(f"a layer gradient needs at least 2 values, got {_yaml(value)}: "
                             f"write {_yaml(value[0])} for a constant")
    return value


def _check_per_tensor(value: Any) -> Any:
    """Shape errors of a whole per-tensor value, before pydantic's per-branch errors."""
    if isinstance(value, Mapping):
        raise ValueError("a rule must be inside a list: "  # noqa: TRY004
                         "[{match: PATTERN, value: V}, {value: DEFAULT}]")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty list: write a number, a layer gradient [first, ..., last] "
                             "or rules [{match: PATTERN, value: V}, ...]")
        rules = [_is_rule(v) for v in value]
        if any(rules):
            if not all(rules):
                raise ValueError("a list mixes numbers and rules: write either a layer gradient "
                                 "[first, ..., last] or rules [{match: PATTERN, value: V}, ...]")
            return value
    return _check_scalar_or_gradient(value)


def _number(**bounds: float | None) -> Any:
    return Annotated[float, Field(allow_inf_nan=False,
                                  **{k: v for k, v in bounds.items() if v is not None})]


def _scalar_or_gradient(number: Any) -> Any:
    scalar = Annotated[number, Tag(_NUMBER)]
    gradient = Annotated[list[number], Field(min_length=2), Tag(_GRADIENT)]
    return Annotated[scalar | gradient, Discriminator(_shape),
                     BeforeValidator(_check_scalar_or_gradient)]


ScalarOrGradient = _scalar_or_gradient(_number())


def _rule_schema_extra(schema: dict[str, Any]) -> None:
    props = schema.setdefault("properties", {})
    props["filter"] = {"type": "string", "minLength": 1,
                       "description": "Alias of `match` (mergekit's spelling)."}
    schema["not"] = {"required": ["match", "filter"]}


class Rule(BaseModel):
    """One per-tensor rule: tensors whose name matches `match` take `value`."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False,
        json_schema_extra=_rule_schema_extra)

    match: str | None = Field(
        None, min_length=1,
        description="Which tensors the rule covers. A pattern with `*`, `?` or `[` is a glob "
                    "matched against the whole tensor name (`*.self_attn.*`); any other text "
                    "matches names that contain it (`mlp`, as mergekit's `filter`). Without "
                    "`match` the rule is the default and must come last. `filter` is an alias.")
    value: ScalarOrGradient = Field(
        description="A number, or a layer gradient `[first, ..., last]` of at least 2 numbers.")

    @model_validator(mode="before")
    @classmethod
    def _filter_alias(cls, data: Any) -> Any:
        # mergekit spells the pattern `filter`; one canonical key keeps cache keys stable.
        if isinstance(data, Mapping) and "filter" in data:
            if "match" in data:
                raise ValueError("give 'match' or its alias 'filter', not both")
            data = {("match" if k == "filter" else k): v for k, v in data.items()}
        return data

    @property
    def is_default(self) -> bool:
        """Whether the rule matches every tensor (no pattern, or mergekit's catch-all `*`)."""
        return self.match is None or self.match == "*"


def _check_rule_order(rules: list[Rule]) -> list[Rule]:
    for i, rule in enumerate(rules[:-1]):
        if rule.is_default:
            which = "(no 'match')" if rule.match is None else "(match '*')"
            raise ValueError(f"rule [{i + 1}] comes after the default rule [{i}] {which} and "
                             "would never apply: put the default rule last")
    return rules


def _bounds_checker(bounds: dict[str, float]) -> Any:
    tests = {"gt": (lambda x, b: x > b, "greater than"),
             "ge": (lambda x, b: x >= b, "greater than or equal to"),
             "lt": (lambda x, b: x < b, "less than"),
             "le": (lambda x, b: x <= b, "less than or equal to")}

    def check(rules: list[Rule]) -> list[Rule]:
        # A rule's value is typed without bounds (one Rule model for every field), so the
        # field's bounds are checked here. Interpolation stays between the given values, so
        # checking the given values bounds every resolved value.
        for i, rule in enumerate(rules):
            for x in _points(rule.value):
                for name, bound in bounds.items():
                    ok, text = tests[name]
                    if not ok(x, bound):
                        raise ValueError(f"rule [{i}] value {_fmt(x)} must be {text} "
                                         f"{_fmt(bound)}")
        return rules

    return check


_JSON_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum",
                "le": "maximum"}


def _bounded_rules_schema(bounds: dict[str, float]) -> Any:
    """The JSON schema of a bounded field's rule list: each rule's value (a number or each
    number of a gradient) within the field's bounds, as the validator checks them."""
    number = {"type": "number", **{_JSON_BOUNDS[k]: v for k, v in bounds.items()}}
    value = {"oneOf": [number, {"type": "array", "items": number, "minItems": 2}]}

    def extra(schema: dict[str, Any]) -> None:
        schema["items"] = {"allOf": [schema["items"], {"properties": {"value": value}}]}

    return extra


@functools.cache
def per_tensor(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
               le: float | None = None) -> Any:
    """The annotation of a per-tensor numeric field, with optional bounds on every value.

    Args:
        gt: Every number must be greater than this.
        ge: Every number must be greater than or equal to this.
        lt: Every number must be less than this.
        le: Every number must be less than or equal to this.

    Returns:
        An ``Annotated`` type: number | gradient (list of >= 2 numbers) | rule list.
    """
    bounds = {k: v for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le}.items() if v is not None}
    number = _number(**bounds)
    rules: Any = Annotated[list[Rule], Field(min_length=1), AfterValidator(_check_rule_order)]
    if bounds:
        rules = Annotated[rules, AfterValidator(_bounds_checker(bounds)),
                          Field(json_schema_extra=_bounded_rules_schema(bounds))]
    scalar = Annotated[number, Tag(_NUMBER)]
    gradient = Annotated[list[number], Field(min_length=2), Tag(_GRADIENT)]
    return Annotated[scalar | gradient | Annotated[rules, Tag(_RULES)], Discriminator(_shape),
                     BeforeValidator(_check_per_tensor)]


PerTensor = per_tensor()


# --- resolution ---------------------------------------------------------------------------------


def matches(pattern: str, tensor: str) -> bool:
    """Whether a rule pattern covers a tensor name.

    Args:
        pattern: A glob (contains ``*``, ``?`` or ``[``; matched against the whole name,
            case-sensitively) or a plain substring (mergekit's ``filter in tensor_name``).
        tensor: The tensor's name.
    """
    if GLOB_CHARS.intersection(pattern):
        # Tensor names never contain *?[, so mergekit's substring test of such a filter matches
        # nothing but its catch-all "*": reading them as globs loses no mergekit meaning.
        return fnmatch.fnmatchcase(tensor, pattern)
    return pattern in tensor


def layer_stack(tensor: str) -> tuple[str, int] | None:
    """The layer stack and index of a tensor: ``("model.layers", 3)``, or None outside layers."""
    m = _LAYER_RE.search(tensor)
    if m is None:
        return None
    return tensor[:m.start(2) - 1], int(m.group(2))


def layer_index(tensor: str) -> int | None:
    """The layer index of a tensor from its name, or None for a non-layer tensor.

    The first ``layers.N``, ``layer.N``, ``h.N``, ``blocks.N`` or ``block.N`` component counts
    (the stacks of mergekit's architecture files), so an expert index after it
    (``layers.3.mlp.experts.7``) is not taken for the layer.
    """
    found = layer_stack(tensor)
    return None if found is None else found[1]


def layer_counts(tensor_names: Iterable[str]) -> dict[str, int]:
    """Layers per stack (max index + 1), e.g. ``{"model.layers": 32}``.

    A vision tower and a language model are separate stacks, as they are separate modules with
    their own layer count in mergekit.
    """
    counts: dict[str, int] = {}
    for name in tensor_names:
        found = layer_stack(name)
        if found is not None:
            stack, index = found
            counts[stack] = max(counts.get(stack, 0), index + 1)
    return counts


def count_layers(tensor_names: Iterable[str]) -> int:
    """The number of layers (max index + 1 over all stacks; 0 without layer tensors).

    mergekit takes it from the model config (``num_hidden_layers`` or the architecture's
    ``num_layers_config_key``); from the tensor names of a complete checkpoint it is the same.
    Count over the full base checkpoint, not a sparse vector that may lack the last layers.
    """
    return max(layer_counts(tensor_names).values(), default=0)


def layer_position(tensor: str, n_layers: int | Mapping[str, int]) -> float:
    """The gradient position ``t`` in [0, 1] of a tensor, as mergekit's planner computes it.

    Args:
        tensor: The tensor's name.
        n_layers: The number of layers, or layers per stack (``layer_counts``).

    Returns:
        ``index / (n_layers - 1)`` for a layer tensor (1.0 when there is one layer); 0.0 for a
        tensor outside the layers (embeddings, final norm, lm_head: mergekit plans them with
        ``t = 0``, so they take a gradient's first value).

    Raises:
        ValueError: The layer index is outside ``n_layers`` or its stack is not counted.
    """
    found = layer_stack(tensor)
    if found is None:
        return 0.0
    stack, index = found
    if isinstance(n_layers, Mapping):
        if stack not in n_layers:
            raise ValueError(f"{tensor}: no layer count for stack {stack!r}")
        count = n_layers[stack]
    else:
        count = n_layers
    if not 0 <= index < count:
        raise ValueError(f"{tensor}: layer {index} is outside {count} layers")
    if count == 1:
        return 1.0  # mergekit's plan_slice: a one-layer slice uses t = 1
    return index / (count - 1)


def interpolate(points: Sequence[float], t: float) -> float:
    """A gradient's value at ``t`` in [0, 1], computed exactly as mergekit (same float ops).

    The points sit at ``t = i / (len(points) - 1)``; between two, the value is linear.
    """
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * points[i0] + frac * points[i1])


def _rule_parts(rule: Any) -> tuple[str | None, Any]:
    if isinstance(rule, Rule):
        return rule.match, rule.value
    if isinstance(rule, Mapping):
        # A rule from model_dump(mode="json"), as step params reach the kernels.
        return rule.get("match", rule.get("filter")), rule["value"]
    raise TypeError(f"not a rule: {rule!r}")


def is_rules(value: Any) -> bool:
    """Whether a per-tensor value is a rule list (validated or in its plain JSON form)."""
    return isinstance(value, (list, tuple)) and bool(value) and _is_rule(value[0])


def _points(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def _resolve(value: Any, t: float) -> float:
    if isinstance(value, (list, tuple)):
        return interpolate([float(v) for v in value], t)
    if _is_number(value):
        return float(value)
    raise TypeError(f"not a number or a layer gradient: {value!r}")


def value_at(value: Any, tensor: str, n_layers: int | Mapping[str, int],
             default: float | None = None) -> float:
    """Resolve a per-tensor value for one tensor.

    Args:
        value: A validated ``PerTensor`` or its ``model_dump(mode="json")``.
        tensor: The tensor's name.
        n_layers: The number of layers (``count_layers``) or layers per stack (``layer_counts``).
        default: The value when no rule matches (mergekit falls back to the method's default).

    Returns:
        The value for ``tensor``.

    Raises:
        LookupError: No rule matches the tensor and ``default`` is None (mergekit: "Missing
            required parameter").
    """
    if not is_rules(value):
        # A plain number needs no position: a tensor outside the counted layers still works.
        if _is_number(value):
            return float(value)
        return _resolve(value, layer_position(tensor, n_layers))
    for rule in value:
        pattern, rule_value = _rule_parts(rule)
        if pattern is None or matches(pattern, tensor):
            if _is_number(rule_value):
                return float(rule_value)
            return _resolve(rule_value, layer_position(tensor, n_layers))
    if default is None:
        raise LookupError(f"no rule matches {tensor!r} and the rules have no default")
    return float(default)


# --- inspection ---------------------------------------------------------------------------------


def is_scalar(value: Any) -> bool:
    """Whether a per-tensor value is one number for every tensor (not a gradient or rules)."""
    return _is_number(value)


def _fmt(x: float) -> str:
    return f"{float(x):.6g}"


def _yaml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return _fmt(value) if _is_number(value) else repr(value)


def describe(value: Any) -> str:
    """A short text for ``plan``: ``0.5``, ``[0, 0.5, 1] by layer``, or the rules in order."""
    if not is_rules(value):
        return f"{_yaml(value)} by layer" if isinstance(value, (list, tuple)) else _yaml(value)
    parts = []
    for rule in value:
        pattern, rule_value = _rule_parts(rule)
        label = "else" if pattern is None else repr(pattern)
        parts.append(f"{label}: {_yaml(rule_value)}")
    return "; ".join(parts)


def unmatched_rules(value: Any, tensor_names: Iterable[str]) -> list[int]:
    """Indices of the rules whose pattern matches none of ``tensor_names`` (a likely typo).

    The default rule is never reported; a number or a gradient has no rules.
    """
    if not is_rules(value):
        return []
    names = list(tensor_names)
    out = []
    for i, rule in enumerate(value):
        pattern, _ = _rule_parts(rule)
        if pattern is not None and not any(matches(pattern, n) for n in names):
            out.append(i)
    return out


def unmatched_tensors(value: Any, tensor_names: Iterable[str]) -> list[str]:
    """The tensors no rule covers (they take the op's default), in the given order."""
    if not is_rules(value):
        return []
    patterns = [_rule_parts(rule)[0] for rule in value]
    if None in patterns:
        return []
    return [n for n in tensor_names if not any(matches(p, n) for p in patterns)]


_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn", "moe")
_EMBEDDING = ("embed", "wte", "wpe")
_HEAD = ("lm_head", "embed_out", "output")


def representative_tensors(tensor_names: Iterable[str]) -> list[str]:
    """A few tensors to show resolved values for in ``plan``, independent of the input order.

    Embeddings, then an attention and an MLP tensor of the first, middle and last layer of each
    layer stack, then the output head. A layer without such tensors shows its first tensor.
    """
    names = sorted(set(tensor_names))
    layers: dict[str, dict[int, list[str]]] = {}
    others = []
    for name in names:
        found = layer_stack(name)
        if found is None:
            others.append(name)
        else:
            layers.setdefault(found[0], {}).setdefault(found[1], []).append(name)
    picked: list[str] = []

    def first(candidates: Iterable[str], keys: tuple[str, ...]) -> str | None:
        # A weight of the block, not its norm (`post_attention_layernorm` names attention).
        found = [n for n in candidates if any(k in n for k in keys)]
        return next((n for n in found if "norm" not in n), found[0] if found else None)

    def add(name: str | None) -> None:
        if name is not None and name not in picked:
            picked.append(name)

    add(first(others, _EMBEDDING))
    for stack in sorted(layers):
        by_index = layers[stack]
        indices = sorted(by_index)
        for index in sorted({indices[0], indices[len(indices) // 2], indices[-1]}):
            in_layer = by_index[index]
            attention, mlp = first(in_layer, _ATTENTION), first(in_layer, _MLP)
            add(attention)
            add(mlp)
            if attention is None and mlp is None:
                add(in_layer[0])
    add(first([n for n in others if n not in picked], _HEAD))
    if not picked:
        picked = names[:3]
    return picked
