"""The recipe JSON schema: generated, committed in step with the models, and self-documenting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tvrecipe.spec.registry import ops

STEP_CLASSES = ops()

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "schemas" / "recipe.schema.json"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def step_union(schema: dict) -> dict:
    (union,) = schema["properties"]["steps"]["patternProperties"].values()
    return union


def deref(schema: dict, ref: str) -> dict:
    assert ref.startswith("#/$defs/"), ref
    return schema["$defs"][ref.removeprefix("#/$defs/")]


def test_committed_schema_is_up_to_date(cli):
    generated = cli.ok("schema").stdout
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    assert committed == generated, (
        "schemas/recipe.schema.json is stale: run `tvrecipe schema > schemas/recipe.schema.json`")


def test_schema_is_a_json_schema_document(schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "tvrecipe recipe"
    assert set(schema["required"]) == {"tvrecipe", "models", "outputs"}
    assert schema["additionalProperties"] is False


def test_step_union_lists_every_op(schema):
    union = step_union(schema)
    assert union["discriminator"]["propertyName"] == "op"
    mapping = union["discriminator"]["mapping"]
    assert set(mapping) == set(STEP_CLASSES)
    assert {branch["$ref"] for branch in union["oneOf"]} == set(mapping.values())
    for op, ref in mapping.items():
        step = deref(schema, ref)
        assert step["properties"]["op"]["const"] == op
        assert "op" in step["required"]
        # extra="forbid": a misspelt field is an error, in editors too.
        assert step["additionalProperties"] is False, op
        assert ref.removeprefix("#/$defs/") == STEP_CLASSES[op].__name__


def _fields(schema: dict):
    """(owner, field name, property schema) of every field of the recipe and its parts."""
    for name, prop in schema["properties"].items():
        yield "Recipe", name, prop
    for owner, definition in schema["$defs"].items():
        for name, prop in definition.get("properties", {}).items():
            yield owner, name, prop


def _described(schema: dict, prop: dict) -> bool:
    if prop.get("description"):
        return True
    # A field whose text equals its model's docstring is a bare $ref to a described model.
    ref = prop.get("$ref")
    return bool(ref and deref(schema, ref).get("description"))


def test_every_field_has_a_description(schema):
    missing = [f"{owner}.{name}" for owner, name, prop in _fields(schema)
               if name != "op" and not _described(schema, prop)]
    assert not missing, f"fields without a description: {', '.join(missing)}"
    undocumented = [name for name, d in schema["$defs"].items() if not d.get("description")]
    assert not undocumented, f"models without a description: {', '.join(undocumented)}"


def test_op_fields_have_a_description(schema):
    missing = [owner for owner, name, prop in _fields(schema)
               if name == "op" and not _described(schema, prop)]
    assert not missing, f"op without a description in: {', '.join(missing)}"


def _recipes() -> list[Path]:
    return [*sorted((REPO / "recipes").glob("*.yaml")), REPO / "examples/quickstart/recipe.yaml"]


def test_recipes_validate_against_the_schema(schema):
    # Model paths written in their long form; the short form is test_model_path_shorthand.
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema)
    for recipe in _recipes():
        data = yaml.safe_load(recipe.read_text())
        data["models"] = {k: {"path": v} if isinstance(v, str) else v
                          for k, v in data["models"].items()}
        errors = [e.message for e in validator.iter_errors(data)]
        assert not errors, f"{recipe.name}: {errors}"
    bad = yaml.safe_load((REPO / "recipes" / "invalid" / "many_mistakes.yaml").read_text())
    errors = list(validator.iter_errors(bad))
    # A model may be a string or a mapping (anyOf): the mapping's own error is in the context.
    messages = [e.message for e in errors] + [c.message for e in errors for c in e.context]
    assert "Additional properties are not allowed ('kidn' was unexpected)" in messages
    assert len(errors) >= 3  # the misspelt op and the apply without delta, too


def test_model_path_shorthand_validates_against_the_schema(schema):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema)
    for recipe in _recipes():
        data = yaml.safe_load(recipe.read_text())
        errors = [e.message for e in validator.iter_errors(data)]
        assert not errors, f"{recipe.name}: {errors}"


def test_names_the_validator_refuses_the_schema_refuses(schema):
    """Model, step and output names (and an extract's finetuned keys) are names: an editor
    marks `9code` or `co.de` as validate does."""
    from tvrecipe.spec.models import NAME_PATTERN
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema)
    good = {"tvrecipe": 1, "models": {"base": "./b", "code": "./c"},
            "steps": {"tv": {"op": "extract", "base": "base", "finetuned": {"code": "code"}}},
            "outputs": {"tv": {"from": "tv", "path": "./o"}}}
    assert [e.message for e in validator.iter_errors(good)] == []
    for where in ("models", "steps", "outputs"):
        for name in ("9code", "co.de"):
            bad = json.loads(json.dumps(good))
            bad[where][name] = bad[where].pop(next(iter(bad[where])))
            assert [e.message for e in validator.iter_errors(bad)] == [
                f"'{name}' does not match any of the regexes: {NAME_PATTERN!r}"]


def _schema_and_validate_agree(schema: dict, cli, data: dict, ok: bool) -> None:
    """The schema accepts ``data`` exactly when `tvrecipe validate` does (``ok``)."""
    jsonschema = pytest.importorskip("jsonschema")
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(data)]
    assert (errors == []) == ok, errors
    cli.write("r.yaml", yaml.safe_dump(data))
    res = cli("validate", "r.yaml")
    assert (res.exit_code == 0) == ok, res.stderr


def _two_tasks(step: dict) -> dict:
    """A recipe of two task vectors and one step ``m`` over them, written out."""
    return {"tvrecipe": 1, "models": {"base": "./b", "a": "./a", "c": "./c"},
            "steps": {"tv": {"op": "extract", "base": "base", "finetuned": ["a", "c"]},
                      "m": {"inputs": "tv", **step}},
            "outputs": {"m": {"from": "m", "path": "./o"}}}


@pytest.mark.parametrize(("where", "value", "ok"), [
    ("k", 2, True), ("k", "auto", True), ("k", 0, False), ("k", 4097, False),
    ("shard_size", "2GB", True), ("shard_size", " 1.5GiB ", True), ("shard_size", 4096, True),
    ("shard_size", 0, False), ("shard_size", "2 bananas", False), ("shard_size", "-1GB", False),
])
def test_sizes_and_k_the_validator_refuses_the_schema_refuses(schema, cli, where, value, ok):
    """cluster_basis's k and an output's shard_size: an editor marks what validate refuses
    (the schema bounds the numbers and patterns the texts of their unions)."""
    data = _two_tasks({"op": "cluster_basis"})
    if where == "k":
        data["steps"]["m"]["k"] = value
    else:  # (on a vector: a set's members are not sharded, and validate says so)
        data["outputs"]["m"].update({"from": "tv.a", "shard_size": value})
    _schema_and_validate_agree(schema, cli, data, ok)


@pytest.mark.parametrize(("fields", "ok"), [
    ({"format": "peft", "rank": 8}, True),
    ({"format": "peft", "rank": {"energy": 0.9}, "base_model": "org/m"}, True),
    ({"format": "peft", "rank": 8, "full_tensors": "save", "base": "base"}, True),
    ({"rank": None}, True),
    ({"format": "peft"}, False),  # no rank
    ({"rank": 8}, False),  # rank on a safetensors output
    ({"format": "safetensors", "base_model": "org/m"}, False),
    ({"full_tensors": "save", "base": "base"}, False),
    ({"format": "peft", "rank": 8, "full_tensors": "save"}, False),  # save without base
])
def test_peft_fields_the_validator_refuses_the_schema_refuses(schema, cli, fields, ok):
    data = {"tvrecipe": 1, "models": {"base": "./b", "a": "./a"},
            "steps": {"tv": {"op": "extract", "base": "base", "finetuned": "a"}},
            "outputs": {"tv": {"from": "tv", "path": "./o", **fields}}}
    _schema_and_validate_agree(schema, cli, data, ok)


@pytest.mark.parametrize(("value", "ok"), [
    (0.5, True), ([0.2, 0.8], True), (1.5, False), (0, False), ([0.2, 1.2], False),
])
def test_rule_values_out_of_the_fields_range_the_schema_refuses(schema, cli, value, ok):
    """A per-tensor rule's value is bounded as its field is (ties' density in (0, 1])."""
    rules = [{"match": "mlp", "value": value}, {"value": 0.3}]
    _schema_and_validate_agree(schema, cli, _two_tasks({"op": "ties", "density": rules}), ok)
