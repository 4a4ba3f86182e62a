"""``stats.json`` as a pydantic model: what ``curate stats`` computes and ``report.html`` draws.

Its JSON Schema is generated into ``schemas/stats.schema.json`` by ``curate schema``.
Every count here is computed from the ledger (one row per input row), so the
funnel always adds up: input rows = kept + the sum of every drop reason.
"Before/after" views pair each distribution over *all* rows that have a value
with the same distribution over the *kept* rows only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Summary(_Model):
    """Count and quantiles of the finite values of one column over one set of rows."""

    count: int = Field(description="Rows with a finite value.")
    nulls: int = Field(description="Rows without a value (null, NaN or infinite).")
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    quantiles: dict[str, float] = Field(default_factory=dict, description="`p01`…`p99` → value.")


class Histogram(_Model):
    """Counts per bin over the same edges for all rows and for kept rows (so they overlay)."""

    edges: list[float] = Field(description="Bin edges, len(counts) + 1; the last bin includes its right edge.")
    all: list[int]
    kept: list[int]


class Distribution(_Model):
    column: str
    all: Summary
    kept: Summary
    histogram: Histogram


class FunnelStep(_Model):
    """One stage in recipe order: the rows that reached it, what it kept, what it dropped and why."""

    name: str
    use: str
    kind: str
    rows_in: int
    kept: int
    dropped: dict[str, int] = Field(default_factory=dict, description="Reason → rows, largest first.")


class RowCounts(_Model):
    input: int
    kept: int
    dropped: int


class SourceCount(_Model):
    """Rows of one value of the input's ``source`` column (a mixture's components)."""

    source: str
    rows: int
    kept: int
    tokens: int | None = Field(None, description="Sum of num_tokens over all rows (when the column exists).")
    kept_tokens: int | None = None


class Tokens(_Model):
    column: str
    total: int = Field(description="Sum over every row that has a value.")
    kept: int


class CategoryCount(_Model):
    value: str
    rows: int
    kept: int


class Languages(_Model):
    column: str
    counts: list[CategoryCount] = Field(description="Most frequent first; the tail folded into `other`.")


class ImageSizes(_Model):
    width_column: str
    height_column: str
    width: Distribution
    height: Distribution
    aspect_ratio: Distribution = Field(description="width / height (> 1 is landscape).")


class DuplicateClusters(_Model):
    """Cluster-size histogram of one dedup level, from the global stage's info in the manifest."""

    stage: str
    level: str | None = None
    cluster_sizes: dict[str, int] = Field(description="Cluster size → number of clusters (sizes ≥ 2).")
    clusters: int
    rows_in_clusters: int
    removed: int = Field(description="Rows beyond the one kept per cluster: sum of (size - 1) × clusters.")


class Packing(_Model):
    efficiency: float = Field(description="Filled tokens / capacity, over every packed sequence.")
    sequences: int | None = None
    filled_tokens: int | None = None
    capacity_tokens: int | None = None
    found_in: str = Field(description="Where the numbers were read: `_done markers` or `manifest`.")


class ShardFiles(_Model):
    format: str
    files: int
    samples: int
    bytes: int


class Example(_Model):
    key: str
    url: str | None = None
    caption: str | None = None
    stage: str | None = None
    reason: str | None = None


class GalleryRow(_Model):
    """One sampled row: what the report shows under its thumbnail, as escaped text."""

    key: str
    caption: str | None = None
    url: str | None = None
    fields: dict[str, float | int | bool | str | None] = Field(
        default_factory=dict, description="The dropping stage's columns of this row (scores, statuses).")
    thumbnail: bool = Field(description="A 96 px JPEG of the row is in _work/samples.parquet; false: text only "
                            "(no image bytes: dropped by the download itself, or undecodable).")


class GalleryEntry(GalleryRow):
    duplicate_of: str | None = Field(None, description="A dedup stage's drop: the kept row's key.")
    original: GalleryRow | None = Field(None, description="A dedup stage's drop: the kept row it copies.")


class GalleryGroup(_Model):
    """The sampled rows of one (stage, reason), or of the kept rows (stage and reason null)."""

    stage: str | None
    reason: str | None
    rows: int = Field(description="Rows with this fate in the whole run.")
    entries: list[GalleryEntry] = Field(description="Smallest seeded key hashes first (a bottom-k sample).")


class UnreadableShard(_Model):
    """An input shard the run could not read (the manifest's ``source_errors``): its rows are in no count."""

    shard: int
    path: str = Field(description="The input file (or files) of the shard.")
    error: str = Field(description="Why it could not be read.")
    rows_read: int = Field(description="Rows read before the error; none of them is committed or counted.")


class Stats(_Model):
    """Everything ``curate stats OUTPUT`` knows about a run, as written to ``OUTPUT/stats.json``."""

    curate_version: str
    output: str
    complete: bool = Field(description="The manifest says every input shard was finished.")
    rows: RowCounts
    funnel: list[FunnelStep] = Field(description="`source` (unreadable input) first when it dropped rows, "
                                     "then the recipe's stages in order.")
    sources: list[SourceCount] | None = None
    tokens: Tokens | None = None
    scores: list[Distribution] = Field(default_factory=list, description="Every numeric score column.")
    caption_chars: Distribution | None = None
    caption_words: Distribution | None = None
    languages: Languages | None = None
    image_sizes: ImageSizes | None = None
    duplicates: list[DuplicateClusters] = Field(default_factory=list)
    packing: Packing | None = None
    shards: list[ShardFiles] = Field(default_factory=list)
    embeddings: dict[str, int] = Field(default_factory=dict, description="Embedding column → dimension, "
                                       "from the Parquet shards' schema.")
    examples: list[Example] = Field(default_factory=list, description="A few rows per drop reason and kept, "
                                    "smallest keys first.")
    gallery: list[GalleryGroup] = Field(default_factory=list, description="A seeded sample of rows per drop "
                                        "reason and of the kept rows, with thumbnails (write.thumbnails).")
    source_errors: list[UnreadableShard] = Field(default_factory=list, description="Input shards that could "
                                                 "not be read (from the manifest); the run is incomplete until "
                                                 "a re-run reads them.")
    checks: dict[str, bool] = Field(default_factory=dict, description="Cross-checks between ledger, "
                                    "manifest and shards; all true for a healthy run.")
    seconds: float = Field(description="Time spent computing these statistics.")

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
