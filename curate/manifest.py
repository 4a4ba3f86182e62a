"""The output's contract: ``manifest.json`` and the ledger row, as pydantic models.

Their JSON Schemas are generated into ``schemas/`` by ``curate schema``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ShardEntry(BaseModel):
    path: str = Field(description="Relative to the output root.")
    format: Literal["webdataset", "parquet"]
    num_samples: int


class StageCounters(BaseModel):
    name: str
    use: str
    kind: Literal["source", "map", "global"]
    rows_in: int = Field(description="Rows still kept when they reached the stage.")
    kept: int
    dropped: dict[str, int] = Field(default_factory=dict, description="Reason → rows.")
    seconds: float = Field(description="Summed worker seconds spent in the stage.")
    info: dict[str, Any] = Field(default_factory=dict, description="Global stages: thresholds, cluster sizes.")


class Counts(BaseModel):
    input: int
    kept: int
    dropped: dict[str, dict[str, int]] = Field(default_factory=dict, description="Stage → reason → rows.")


class SourceErrorEntry(BaseModel):
    shard: int
    path: str = Field(description="The input file (or files) of the shard.")
    error: str = Field(description="Why it could not be read.")
    rows_read: int = Field(description="Rows read before the error; none of them is committed.")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    curate_version: str
    recipe: dict[str, Any] = Field(description="The resolved recipe.")
    recipe_fingerprint: str
    complete: bool
    shards: list[ShardEntry]
    ledger: list[str] = Field(description="Ledger Parquet files, relative to the output root.")
    counts: Counts
    stages: list[StageCounters]
    stats: dict[str, str] = Field(default_factory=dict, description="Name → path of statistics files.")
    packing: dict[str, Any] | None = Field(None, description="Packed sequences: totals, efficiency, files.")
    source_errors: list[SourceErrorEntry] = Field(default_factory=list, description=(
        "Input shards that could not be read in the last run; `complete` stays false until a re-run reads them."))
    elapsed_seconds: float
    timings: dict[str, Any] = Field(default_factory=dict, description=(
        "Where the wall-clock time went, in seconds: process_start_to_run, ray_start, first_row (process "
        "start to the first row out of the first stage: the first image downloaded), first_part (to the first "
        "batch back at the driver), phases, globals, finalize, total (process start to this manifest)."))


class LedgerRow(BaseModel):
    """One row of the ledger: one per input row, kept or dropped. Stage scores are extra columns."""

    model_config = ConfigDict(extra="allow")
    key: str
    url: str | None
    caption: str | None
    status: Literal["kept", "dropped"]
    dropped_by: str | None = Field(description="Stage name that dropped the row (`source` for unreadable input).")
    reason: str | None = Field(description="Why it was dropped; null when kept.")
