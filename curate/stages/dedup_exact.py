"""Exact deduplication (a global stage): identical image bytes, normalised caption or URL."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import rows
from curate.stages.base import GlobalStage, StageConfig, register

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalise_caption(text: str | None) -> str | None:
    """Case-fold, strip accents-compatible forms, punctuation and extra spaces."""
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()
    return text or None


class DedupExactConfig(StageConfig):
    use: Literal["dedup_exact"] = "dedup_exact"
    by: list[Literal["image", "caption", "url"]] = Field(
        default_factory=lambda: ["image"],
        description="What must be identical: image (sha256 of the bytes), caption (normalised), url. "
        "Several entries are applied one after the other.",
    )


@register
class DedupExact(GlobalStage):
    """Keep one sample per group of identical values; the others get ``duplicate_of``.

    The representative is the smallest key, so the result does not depend on the
    number of shards or workers. Reasons: ``duplicate:exact_image``,
    ``duplicate:exact_caption``, ``duplicate:exact_url``.
    """

    name = "dedup_exact"
    Config = DedupExactConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {"duplicate_of": pa.string()}

    def input_columns(self) -> list[str]:
        cols = {"image": rows.SHA256, "caption": rows.CAPTION, "url": rows.URL}
        return [cols[o] for o in self.config.by]  # type: ignore[attr-defined]

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        keys = table[rows.KEY].to_pylist()
        alive = [True] * len(keys)
        reason: list[str | None] = [None] * len(keys)
        dup_of: list[str | None] = [None] * len(keys)
        info: dict[str, Any] = {}
        order = pc.sort_indices(table[rows.KEY]).to_pylist()
        for level in self.config.by:  # type: ignore[attr-defined]
            col = {"image": rows.SHA256, "caption": rows.CAPTION, "url": rows.URL}[level]
            if col not in table.column_names:
                raise ValueError(f"{self.stage_name}: `by: {level}` needs column {col!r}, which no earlier stage produced")
            values = table[col].to_pylist()
            if level == "caption":
                values = [normalise_caption(v) for v in values]
            first: dict[Any, str] = {}
            sizes: dict[Any, int] = {}
            dropped = 0
            for i in order:
                v = values[i]
                if not alive[i] or v is None:
                    continue
                sizes[v] = sizes.get(v, 0) + 1
                if v in first:
                    alive[i] = False
                    reason[i] = f"duplicate:exact_{level}"
                    dup_of[i] = first[v]
                    dropped += 1
                else:
                    first[v] = keys[i]
            hist: dict[str, int] = {}
            for s in sizes.values():
                if s > 1:
                    hist[str(s)] = hist.get(str(s), 0) + 1
            info[level] = {"dropped": dropped, "cluster_sizes": hist}
        decisions = pa.table(
            {
                rows.KEY: pa.array(keys, pa.string()),
                rows.REASON: pa.array(reason, pa.string()),
                "duplicate_of": pa.array(dup_of, pa.string()),
            }
        )
        return decisions, info
