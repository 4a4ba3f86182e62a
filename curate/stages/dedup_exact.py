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

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import rows
from curate.errors import CurateError
from curate.stages.base import GlobalStage, StageConfig
from curate.stages.image_hash import PIXEL_SHA256, hash_stage_for
from curate.stages.registry import register
from curate.text import normalise_caption

__all__ = ["DedupExact", "DedupExactConfig", "normalise_caption"]  # normalise_caption: re-exported (curate/demo/world.py imports it from here)
#: The column each ``by`` level compares.
LEVEL_COLUMNS = {"image": rows.SHA256, "pixels": PIXEL_SHA256, "caption": rows.CAPTION, "url": rows.URL}


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
class DedupExact(GlobalStage[DedupExactConfig]):
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
        return [LEVEL_COLUMNS[o] for o in self.config.by]

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        """Vectorised: a level's values are dictionary-encoded and each code's first row in key
        order is its representative; no Python object per row (the global phase sees every row)."""
        n = table.num_rows
        keys = table[rows.KEY].combine_chunks().cast(pa.string())
        order = pc.sort_indices(keys).to_numpy()
        alive = np.ones(n, dtype=bool)
        reason = np.full(n, -1, dtype=np.int64)  # index into `levels`, -1: kept
        rep = np.arange(n, dtype=np.int64)
        info: dict[str, Any] = {}
        levels = list(self.config.by)
        for li, level in enumerate(levels):
            col = LEVEL_COLUMNS[level]
            if col not in table.column_names:
                hint = (" Add `- use: image_hash` before this stage, or leave `hash_images: true`"
                        if level == "pixels" else "")
                raise CurateError(f"{self.stage_name}: `by: {level}` needs column {col!r}, which no earlier "
                                  f"stage produced.{hint}")
            values = table[col].combine_chunks()
            if level == "caption":
                values = _normalised(values)
            codes = pc.fill_null(pc.dictionary_encode(values).indices, -1).to_numpy()
            valid = values.is_valid().to_numpy(zero_copy_only=False)
            rows_in_order = order[alive[order] & valid[order]]
            c = codes[rows_in_order]
            _, first, inverse, sizes = np.unique(c, return_index=True, return_inverse=True, return_counts=True)
            level_rep = rows_in_order[first][inverse]
            dup = rows_in_order[level_rep != rows_in_order]
            alive[dup] = False
            reason[dup] = li
            rep[dup] = level_rep[level_rep != rows_in_order]
            hist_sizes, hist_counts = np.unique(sizes[sizes > 1], return_counts=True)
            info[level] = {"dropped": int(len(dup)),
                           "cluster_sizes": {str(int(k)): int(v) for k, v in zip(hist_sizes, hist_counts, strict=True)}}
        is_dup = pa.array(reason >= 0)
        names = pa.array([f"duplicate:exact_{lv}" for lv in levels], pa.string())
        decisions = pa.table(
            {
                rows.KEY: keys,
                rows.REASON: names.take(pa.array(reason, mask=reason < 0)),
                "duplicate_of": pc.if_else(is_dup, keys.take(pa.array(rep)), pa.nulls(n, pa.string())),
            }
        )
        return decisions, info


#: Captions normalised per step (their Python strs live only for one step).
NORMALISE_CHUNK_ROWS = 65_536


def _normalised(values: pa.Array) -> pa.Array:
    chunks = [pa.array([normalise_caption(v) for v in values.slice(s, NORMALISE_CHUNK_ROWS).to_pylist()], pa.string())
              for s in range(0, len(values), NORMALISE_CHUNK_ROWS)]
    return pa.chunked_array(chunks, pa.string()).combine_chunks() if chunks else pa.array([], pa.string())
