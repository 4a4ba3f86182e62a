"""Exact deduplication (a global stage): identical image bytes or pixels, normalised caption, URL.

``by: [pixels]`` compares ``pixel_sha256`` (the decoded RGB pixels and size, from
``use: image_hash``), so a lossless re-encode of the same pixels is caught where the
bytes' ``sha256`` differs. The entry brings its own ``image_hash`` stage (named
``<name>_hash``) unless ``hash_images: false`` says an earlier stage already added it.

Example::

    - use: dedup_exact
      by: [image, pixels, caption]
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import rows
from curate.errors import CurateError
from curate.stages.base import GlobalStage, StageConfig, register
from curate.stages.image_hash import PIXEL_SHA256, hash_stage_for

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")
#: The column each ``by`` level compares.
LEVEL_COLUMNS = {"image": rows.SHA256, "pixels": PIXEL_SHA256, "caption": rows.CAPTION, "url": rows.URL}


def normalise_caption(text: str | None) -> str | None:
    """Case-fold, strip accents-compatible forms, punctuation and extra spaces."""
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()
    return text or None


class DedupExactConfig(StageConfig):
    use: Literal["dedup_exact"] = "dedup_exact"
    by: list[Literal["image", "pixels", "caption", "url"]] = Field(
        default_factory=lambda: ["image"],
        description="What must be identical: image (sha256 of the bytes), pixels (sha256 of the decoded "
        "pixels, from image_hash), caption (normalised), url. Several entries are applied one after the other.",
    )
    hash_images: bool = Field(
        True, description="With `pixels`: add an image_hash stage named `<name>_hash` before this one. "
        "Set false when an earlier image_hash (or dedup_phash) already added pixel_sha256.")


@register
class DedupExact(GlobalStage):
    """Keep one sample per group of identical values; the others get ``duplicate_of``.

    The representative is the smallest key, so the result does not depend on the
    number of shards or workers. Reasons: ``duplicate:exact_image``,
    ``duplicate:exact_pixels``, ``duplicate:exact_caption``, ``duplicate:exact_url``.
    """

    name = "dedup_exact"
    Config = DedupExactConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {"duplicate_of": pa.string()}

    @classmethod
    def expand(cls, config: DedupExactConfig) -> list[StageConfig]:
        if "pixels" in config.by and config.hash_images:
            return [hash_stage_for(config), config]
        return [config]

    def input_columns(self) -> list[str]:
        return [LEVEL_COLUMNS[o] for o in self.config.by]  # type: ignore[attr-defined]

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        keys = table[rows.KEY].to_pylist()
        alive = [True] * len(keys)
        reason: list[str | None] = [None] * len(keys)
        dup_of: list[str | None] = [None] * len(keys)
        info: dict[str, Any] = {}
        order = pc.sort_indices(table[rows.KEY]).to_pylist()
        for level in self.config.by:  # type: ignore[attr-defined]
            col = LEVEL_COLUMNS[level]
            if col not in table.column_names:
                hint = (" Add `- use: image_hash` before this stage, or leave `hash_images: true`"
                        if level == "pixels" else "")
                raise CurateError(f"{self.stage_name}: `by: {level}` needs column {col!r}, which no earlier "
                                  f"stage produced.{hint}")
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
