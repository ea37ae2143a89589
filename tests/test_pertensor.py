"""Per-tensor parameter values: validation, resolution against hand-computed math, and mergekit."""

from __future__ import annotations

import inspect
import json
import random
import subprocess
import sys

import pytest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from tvrecipe.spec.pertensor import (
    PerTensor,
    Rule,
    count_layers,
    describe,
    interpolate,
    is_scalar,
    layer_counts,
    layer_index,
    layer_position,
    matches,
    per_tensor,
    representative_tensors,
    unmatched_rules,
    unmatched_tensors,
    value_at,
)

Q = "model.layers.{}.self_attn.q_proj.weight"
K = "model.layers.{}.self_attn.k_proj.weight"
DOWN = "model.layers.{}.mlp.down_proj.weight"
NORM = "model.layers.{}.input_layernorm.weight"
EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def llama(n: int) -> list[str]:
    """Tensor names of an n-layer Llama-like checkpoint, in file order."""
    return [EMBED, *(t.format(i) for i in range(n) for t in (Q, K, DOWN, NORM)), FINAL_NORM, HEAD]


class Step(BaseModel):
    """An op model as the recipe models declare per-tensor fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    weight: PerTensor = Field(1.0, description="A weight.")
    density: per_tensor(gt=0.0, le=1.0) = Field(0.2, description="A density.")
    maybe: PerTensor | None = Field(None, description="Optional.")


def parse(value) -> object:
    return Step(weight=value).weight


def errors(**fields) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as info:
        Step(**fields)
    return [(e["loc"], e["msg"]) for e in info.value.errors(include_url=False)]


def user_loc(loc: tuple) -> tuple:
    """A loc as load.py shows it: without union branch names (``float``, ``list[...]``)."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p == "float")))


# --- gradients: hand-computed values -------------------------------------------------------------


def test_two_point_gradient_over_five_layers():
    got = [value_at([0, 1], Q.format(i), 5) for i in range(5)]
    assert got == [0.0, 0.25, 0.5, 0.75, 1.0]  # exact in binary floating point


def test_five_point_gradient_hits_its_points_over_five_layers():
    points = [0, 0.5, 0.3, 0.7, 1]
    assert [value_at(points, DOWN.format(i), 5) for i in range(5)] == [0.0, 0.5, 0.3, 0.7, 1.0]


def test_five_point_gradient_is_piecewise_linear_between_points():
    # 9 layers: t = i/8, so layer i sits at i/2 along the 4 segments; odd layers are midpoints.
    points = [0, 0.5, 0.3, 0.7, 1]
    want = [0, 0.25, 0.5, 0.4, 0.3, 0.5, 0.7, 0.85, 1]
    got = [value_at(points, Q.format(i), 9) for i in range(9)]
    assert got == pytest.approx(want, abs=1e-15)


def test_gradient_with_fewer_points_than_layers():
    # 4 layers over [0, 10, 20]: t = 0, 1/3, 2/3, 1 -> 0, 20/3, 40/3, 20.
    got = [value_at([0, 10, 20], Q.format(i), 4) for i in range(4)]
    assert got == pytest.approx([0, 20 / 3, 40 / 3, 20], abs=1e-12)


def test_interpolate_endpoints_and_midpoints():
    assert interpolate([2.0, 4.0], 0.0) == 2.0
    assert interpolate([2.0, 4.0], 1.0) == 4.0
    assert interpolate([2.0, 4.0, 0.0], 0.75) == 2.0
    assert interpolate([-1.0, 1.0], 0.5) == 0.0


def test_non_layer_tensors_take_the_first_value_as_in_mergekit():
    # mergekit plans embeddings, the final norm and lm_head with t = 0: the gradient's *first*
    # value, lm_head included (not the last).
    for name in (EMBED, FINAL_NORM, HEAD, "model.visual.merger.mlp.0.weight"):
        assert layer_position(name, 32) == 0.0
        assert value_at([0.2, 0.5, 0.9], name, 32) == 0.2


def test_a_one_layer_model_uses_t_1():
    # mergekit's plan_slice: t = 1 when a slice has one layer.
    assert layer_position(Q.format(0), 1) == 1.0
    assert value_at([0.2, 0.9], Q.format(0), 1) == 0.9


def test_a_number_is_the_same_everywhere():
    for name in llama(3):
        assert value_at(0.3, name, 3) == 0.3
    assert value_at(2, Q.format(40), 3) == 2.0  # no position needed
    assert isinstance(value_at(2, Q.format(0), 3), float)


def test_layer_outside_the_count_is_an_error():
    with pytest.raises(ValueError, match="layer 5 is outside 5 layers"):
        value_at([0, 1], Q.format(5), 5)


# --- layer indices ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "index"), [
    ("model.layers.7.self_attn.q_proj.weight", 7),
    ("transformer.h.11.attn.c_attn.weight", 11),        # gpt2
    ("h.0.mlp.c_fc.weight", 0),                         # gpt2 without its prefix
    ("bert.encoder.layer.2.output.dense.weight", 2),    # bert
    ("gpt_neox.layers.3.mlp.dense_4h_to_h.weight", 3),
    ("model.visual.blocks.4.attn.qkv.weight", 4),
    ("decoder.block.5.layer.1.EncDecAttention.q.weight", 5),  # t5: the first stack wins
    ("model.layers.3.block_sparse_moe.experts.7.w1.weight", 3),  # not the expert index
    ("model.layers.12", 12),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("visual.merger.mlp.0.weight", None),  # a pre/post weight in mergekit's qwen2.5-vl
    ("model.layers_norm.3.weight", None),
])
def test_layer_index(name, index):
    assert layer_index(name) == index


def test_count_layers_is_max_index_plus_one():
    assert count_layers(llama(7)) == 7
    assert count_layers(reversed(llama(7))) == 7
    assert count_layers([EMBED, HEAD]) == 0
    assert count_layers(["model.layers.0.a", "model.layers.9.a"]) == 10


def test_stacks_count_separately_as_mergekit_modules():
    names = [*(f"model.visual.blocks.{i}.attn.qkv.weight" for i in range(3)),
             *(f"model.language_model.layers.{i}.mlp.up_proj.weight" for i in range(5))]
    counts = layer_counts(names)
    assert counts == {"model.visual.blocks": 3, "model.language_model.layers": 5}
    assert count_layers(names) == 5
    assert value_at([0, 1], "model.visual.blocks.1.attn.qkv.weight", counts) == 0.5
    assert value_at([0, 1], "model.language_model.layers.1.mlp.up_proj.weight", counts) == 0.25
    with pytest.raises(ValueError, match="no layer count for stack 'encoder.layer'"):
        value_at([0, 1], "encoder.layer.0.x", counts)


# --- rules --------------------------------------------------------------------------------------


def test_substring_and_glob_patterns():
    q = Q.format(3)
    assert matches("self_attn", q)                      # substring, as mergekit's filter
    assert matches("*.self_attn.*", q)                  # glob over the whole name
    assert not matches("self_attn*", q)                 # a glob is anchored at both ends
    assert matches("*self_attn*", q)
    assert matches("model.layers.[0-3].*", q)
    assert not matches("model.layers.[4-9].*", q)
    assert matches("model.layers.?.self_attn.q_proj.weight", q)
    assert not matches("model.layers.?.self_attn.q_proj.weight", Q.format(13))
    assert not matches("Self_Attn", q)                  # case-sensitive, as mergekit's `in`
    assert matches("layers.3.", q) and not matches("layers.3.", Q.format(13))


def test_first_matching_rule_wins():
    rules = parse([{"match": "self_attn", "value": 1}, {"match": "q_proj", "value": 2},
                   {"match": "*.mlp.*", "value": [0, 1]}, {"value": 9}])
    assert value_at(rules, Q.format(0), 3) == 1.0  # q_proj is in self_attn: rule 0 first
    assert value_at(rules, K.format(0), 3) == 1.0
    assert [value_at(rules, DOWN.format(i), 3) for i in range(3)] == [0.0, 0.5, 1.0]
    assert value_at(rules, NORM.format(1), 3) == 9.0
    assert value_at(rules, HEAD, 3) == 9.0


def test_rule_gradients_use_the_layer_position():
    rules = parse([{"match": "*.self_attn.*", "value": [0.2, 0.8]}, {"value": 0.5}])
    got = [value_at(rules, Q.format(i), 4) for i in range(4)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=1e-15)
    assert value_at(rules, DOWN.format(2), 4) == 0.5
    # a gradient rule on a non-layer tensor: t = 0
    assert value_at(parse([{"match": "lm_head", "value": [0.1, 0.9]}]), HEAD, 4) == 0.1


def test_no_match_without_default_falls_back_or_fails():
    rules = parse([{"match": "mlp", "value": 0.7}])
    assert value_at(rules, DOWN.format(0), 2) == 0.7
    # mergekit: evaluate_setting returns None and the method's default applies
    assert value_at(rules, Q.format(0), 2, default=0.25) == 0.25
    with pytest.raises(LookupError, match="no rule matches 'lm_head.weight'"):
        value_at(rules, HEAD, 2)


def test_catch_all_star_is_a_default():
    rules = parse([{"match": "mlp", "value": 0.7}, {"match": "*", "value": 0.1}])
    assert value_at(rules, HEAD, 2) == 0.1
    assert unmatched_tensors(rules, llama(2)) == []


def test_filter_is_an_alias_of_match():
    spelled = [{"filter": "mlp", "value": 0.5}, {"value": 1}]
    rules = parse(spelled)
    assert rules[0].match == "mlp"
    dumped = Step(weight=spelled).model_dump(mode="json")["weight"]
    assert dumped == [{"match": "mlp", "value": 0.5}, {"match": None, "value": 1.0}]
    assert Step(weight=spelled) == Step(weight=[{"match": "mlp", "value": 0.5}, {"value": 1.0}])


def test_dumped_values_resolve_like_validated_ones():
    raw = [{"match": "*.self_attn.*", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.5},
           {"value": [1, 2, 3]}]
    step = Step(weight=raw)
    # Kernels get params() = model_dump(mode="json"): rules arrive as plain dicts.
    dumped = json.loads(json.dumps(step.model_dump(mode="json")))["weight"]
    for name in llama(5):
        assert value_at(dumped, name, 5) == value_at(step.weight, name, 5)


def test_canonical_json_is_stable_across_spellings():
    a = Step(weight=[{"filter": "mlp", "value": 1}, {"value": [0, 1]}], density="1e-1")
    b = Step(weight=[{"match": "mlp", "value": 1.0}, {"match": None, "value": [0.0, 1.0]}],
             density=0.1)
    dump = a.model_dump(mode="json")
    assert dump == b.model_dump(mode="json")
    assert json.dumps(dump, sort_keys=True) == json.dumps(b.model_dump(mode="json"), sort_keys=True)
    assert Step.model_validate(dump) == a  # a dump validates back to the same step


def test_numeric_strings_from_yaml_are_numbers():
    # PyYAML reads `1e-3` (no dot) as a string; mergekit 0.1.5 reads it as a number too.
    assert parse("1e-3") == 0.001
    assert parse(["1e-3", 1]) == [0.001, 1.0]
    assert parse([{"match": "mlp", "value": "2e-1"}])[0].value == 0.2


def test_rule_instances_and_optional_fields_validate():
    step = Step(weight=[Rule(match="mlp", value=0.5), {"value": 1}], maybe=[0, 1])
    assert step.weight[0] == Rule(match="mlp", value=0.5)
    assert step.maybe == [0.0, 1.0]
    assert Step().maybe is None
    assert Step(maybe=None).maybe is None


# --- validation errors --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "loc", "message"), [
    ([], ("weight",), ("Value error, an empty list: write a number, a layer gradient "
                      "[first, ..., last] or rules [{match: PATTERN, value: V}, ...]")),
    ([0.5], ("weight",), ("Value error, a layer gradient needs at least 2 values, got [0.5]: "
                         "write 0.5 for a constant")),
    ([{"value": 1}, {"match": "mlp", "value": 2}], ("weight",),
     ("Value error, rule [1] comes after the default rule [0] (no 'match') and would never apply: "
      "put the default rule last")),
    ([{"match": "a", "value": 1}, {"match": "*", "value": 1}, {"filter": "b", "value": 2}],
     ("weight",), ("Value error, rule [2] comes after the default rule [1] (match '*') and would "
                  "never apply: put the default rule last")),
    (float("nan"), ("weight",), "Input should be a finite number"),
    ("nan", ("weight",), "Input should be a finite number"),
    ([0, float("inf")], ("weight", 1), "Input should be a finite number"),
    ([{"value": [0, float("nan")]}], ("weight", 0, "value", 1), "Input should be a finite number"),
    (True, ("weight",), "Value error, expected a number, got true"),
    ([0, False], ("weight",), "Value error, expected numbers, got [0, False]"),
    ([[1, 2]], ("weight",), "Value error, expected numbers, got [[1, 2]]"),  # (no "constant")
    ([[]], ("weight",), "Value error, expected numbers, got [[]]"),
    ([0.5, {"value": 1}], ("weight",), ("Value error, a list mixes numbers and rules: write either "
                                       "a layer gradient [first, ..., last] or rules "
                                       "[{match: PATTERN, value: V}, ...]")),
    ({"match": "mlp", "value": 1}, ("weight",), ("Value error, a rule must be inside a list: "
                                                "[{match: PATTERN, value: V}, {value: DEFAULT}]")),
    ([{"match": "a", "value": [1]}], ("weight", 0, "value"),
     "Value error, a layer gradient needs at least 2 values, got [1]: write 1 for a constant"),
    ([{"match": "a", "value": [{"value": 1}]}], ("weight", 0, "value"),
     "Value error, a rule's value is a number or a layer gradient, not rules (rules do not nest)"),
    ([{"match": "a", "value": {"value": 1}}], ("weight", 0, "value"),
     ("Value error, a rule's value is a number or a layer gradient, not a mapping "
      "(rules do not nest)")),
    ([{"match": "a", "filter": "b", "value": 1}], ("weight", 0),
     "Value error, give 'match' or its alias 'filter', not both"),
    ([{"match": "", "value": 1}], ("weight", 0, "match"),
     "String should have at least 1 character"),
    ([{"match": "a"}], ("weight", 0, "value"), "Field required"),
    ([{"match": "a", "value": 1, "weight": 2}], ("weight", 0, "weight"),
     "Extra inputs are not permitted"),
    ("abc", ("weight",), "Input should be a valid number, unable to parse string as a number"),
])
def test_validation_errors(value, loc, message):
    (got,) = errors(weight=value)
    assert (user_loc(got[0]), got[1]) == (loc, message)


@pytest.mark.parametrize(("value", "loc", "message"), [
    (0, ("density",), "Input should be greater than 0"),
    ([0.5, 1.5], ("density", 1), "Input should be less than or equal to 1"),
    ([{"match": "mlp", "value": [0.5, 1.5]}], ("density",),
     "Value error, rule [0] value 1.5 must be less than or equal to 1"),
    ([{"match": "mlp", "value": 0.5}, {"value": -1}], ("density",),
     "Value error, rule [1] value -1 must be greater than 0"),
])
def test_bounds_apply_to_every_number(value, loc, message):
    (got,) = errors(density=value)
    assert (user_loc(got[0]), got[1]) == (loc, message)


def test_bounded_values_resolve_within_bounds():
    step = Step(density=[{"match": "mlp", "value": [0.1, 1]}, {"value": [1, 0.05, 0.5]}])
    names = llama(6)
    assert all(0 < value_at(step.density, n, 6) <= 1 for n in names)
    assert per_tensor(gt=0.0, le=1.0) is per_tensor(gt=0.0, le=1.0)  # one type, one schema


def test_errors_are_located_at_the_users_keys():
    # Branch names are the ones load.py already strips, so no invented key reaches the user.
    (got,) = errors(weight=[{"match": "a", "value": 1}, {"match": "b", "value": "x"}])
    assert user_loc(got[0]) == ("weight", 1, "value")
    assert all(p in {"float", "list[float]", "list[Rule]"}
               for p in got[0] if isinstance(p, str) and p not in {"weight", "value"})


# --- inspection ---------------------------------------------------------------------------------


def test_is_scalar_and_describe():
    assert is_scalar(0.5) and is_scalar(1)
    assert not is_scalar([0, 1]) and not is_scalar(parse([{"value": 1}])) and not is_scalar(True)
    assert describe(0.5) == "0.5"
    assert describe(parse([0, 0.5, 0.3, 0.7, 1])) == "[0, 0.5, 0.3, 0.7, 1] by layer"
    rules = parse([{"match": "*.self_attn.*", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.5},
                   {"value": 0.3}])
    want = "'*.self_attn.*': [0.2, 0.8]; 'mlp': 0.5; else: 0.3"
    assert describe(rules) == want
    assert describe(Step(weight=rules).model_dump(mode="json")["weight"]) == want
    assert describe(1 / 3) == "0.333333"


def test_unmatched_rules_and_tensors():
    names = llama(2)
    rules = parse([{"match": "self_atn", "value": 1}, {"match": "mlp", "value": 2},
                   {"match": "*.q_proj", "value": 3}, {"match": "*.q_proj.*", "value": 4}])
    assert unmatched_rules(rules, names) == [0, 2]
    assert unmatched_tensors(rules, names) == [
        EMBED, K.format(0), NORM.format(0), K.format(1), NORM.format(1), FINAL_NORM, HEAD]
    with_default = parse([{"match": "nothing", "value": 1}, {"value": 2}])
    assert unmatched_rules(with_default, names) == [0]  # the default is never reported
    assert unmatched_tensors(with_default, names) == []
    assert unmatched_rules([0, 1], names) == [] and unmatched_tensors(0.5, names) == []


def test_representative_tensors_llama():
    names = llama(9)
    # sorted names: k_proj is the first attention tensor of a layer
    want = [EMBED, K.format(0), DOWN.format(0), K.format(4), DOWN.format(4), K.format(8),
            DOWN.format(8), HEAD]
    assert representative_tensors(names) == want
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert representative_tensors(shuffled) == want  # independent of the input order


def test_representative_tensors_other_layouts():
    gpt2 = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            *(f"transformer.h.{i}.{p}" for i in range(2)
              for p in ("attn.c_attn.weight", "mlp.c_fc.weight", "ln_1.weight"))]
    assert representative_tensors(gpt2) == [
        "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.mlp.c_fc.weight"]
    odd = ["a.layers.0.x", "a.layers.1.x", "b"]
    assert representative_tensors(odd) == ["a.layers.0.x", "a.layers.1.x"]
    assert representative_tensors(["c", "a", "b", "d"]) == ["a", "b", "c"]
    assert representative_tensors([]) == []


# --- schema, imports ----------------------------------------------------------------------------


def test_json_schema_documents_both_spellings():
    schema = Step.model_json_schema(by_alias=True)
    rule = schema["$defs"]["Rule"]
    assert rule["description"]
    assert set(rule["properties"]) == {"match", "filter", "value"}
    assert all(p["description"] for p in rule["properties"].values())
    assert rule["additionalProperties"] is False
    branches = schema["properties"]["weight"]["oneOf"]
    assert [b.get("type") for b in branches] == ["number", "array", "array"]
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"weight": [{"filter": "mlp", "value": [0, 1]}, {"value": 1}]})
    assert not validator.is_valid({"weight": [{"filter": "mlp", "match": "x", "value": 1}]})
    assert not validator.is_valid({"weight": [{"match": "x", "value": 1, "typo": 2}]})


def test_module_does_not_import_torch_or_numpy():
    code = ("import sys, tvrecipe.spec.pertensor; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- mergekit -----------------------------------------------------------------------------------


MERGEKIT_CASES = [
    0.4,
    [0, 1],
    [0, 0.5, 0.3, 0.7, 1],
    [1.0, -0.25, 0.1],
    [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.5}, {"value": 0.3}],
    [{"filter": "q_proj", "value": 1}, {"filter": "self_attn", "value": [0, 1, 0]}],
    [{"filter": "lm_head", "value": [0.1, 0.9]}, {"filter": "*", "value": [0.3, 0.6, 0.2]}],
]


@pytest.mark.parametrize("raw", MERGEKIT_CASES)
@pytest.mark.parametrize("n_layers", [1, 2, 5, 9, 32])
def test_matches_mergekit(raw, n_layers):
    config = pytest.importorskip("mergekit.config")
    setting = TypeAdapter(config.ParameterSetting).validate_python(raw)
    kwargs = ({"validate": TypeAdapter(float).validate_python}
              if "validate" in inspect.signature(config.evaluate_setting).parameters else {})
    ours = parse(raw)
    for name in llama(n_layers):
        # The t of mergekit's MergePlanner for a `models:` merge (one slice of all layers).
        index = layer_index(name)
        t = 0 if index is None else (index / (n_layers - 1) if n_layers > 1 else 1)
        want = config.evaluate_setting(name, setting, t, **kwargs)
        try:
            got = value_at(ours, name, n_layers)
        except LookupError:
            got = None
        assert got == want, name  # the same float operations: exact equality
