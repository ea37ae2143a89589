"""The recipe JSON schema, generated from the Pydantic models (for editors and docs)."""

from __future__ import annotations

import json

from tvrecipe.spec.registry import recipe_model

SCHEMA_ID = "https://tvrecipe.dev/schemas/recipe.schema.json"


def recipe_schema() -> dict:
    """The JSON schema of a recipe file."""
    schema = recipe_model().model_json_schema(by_alias=True)
    _closed_names(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def _closed_names(node: object) -> None:
    """A mapping whose keys are names (models, steps, outputs, an extract's finetuned) takes no
    other key, as ``validate`` refuses one (``9code``, ``co.de``): JSON schema lets a key
    that matches no ``patternProperties`` through unless told."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _closed_names(value)
    elif isinstance(node, list):
        for value in node:
            _closed_names(value)


def recipe_schema_json() -> str:
    """The schema as the exact text of ``schemas/recipe.schema.json``."""
    return json.dumps(recipe_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
