"""The committed JSON Schemas match the pydantic models; outputs validate against them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from curate.schemas import all_schemas

ROOT = Path(__file__).resolve().parent.parent


def test_committed_schemas_match_the_models():
    for name, schema in all_schemas().items():
        committed = json.loads((ROOT / "schemas" / name).read_text())
        assert committed == json.loads(json.dumps(schema)), (
            f"schemas/{name} is out of date: run `curate schema` and commit the result")


def test_shipped_recipes_validate_against_the_recipe_schema():
    schema = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
