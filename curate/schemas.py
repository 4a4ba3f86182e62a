"""JSON Schemas of the public file formats, generated from the pydantic models."""

from __future__ import annotations

from typing import Any


def all_schemas() -> dict[str, dict[str, Any]]:
    from curate.manifest import LedgerRow, Manifest
    from curate.mix import Mixture
    from curate.recipe import recipe_json_schema
    from curate.stats.model import Stats

    return {
        "recipe.schema.json": recipe_json_schema(),
        "manifest.schema.json": Manifest.model_json_schema(),
        "ledger-row.schema.json": LedgerRow.model_json_schema(),
        "mixture.schema.json": Mixture.model_json_schema(),
        "stats.schema.json": Stats.model_json_schema(),
    }
