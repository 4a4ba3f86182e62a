"""Perceptual-hash deduplication (``use: dedup_phash``, a global stage): resized and re-encoded copies.

Two images are duplicates when their 64-bit pHashes (``phash`` from
``image_hash``) differ in at most ``max_distance`` bits. Rows with the same
hash are one group; pairs of distinct hashes are found by multi-index hashing
with an exact guarantee (:func:`curate.dedup.phash.near_value_pairs`: bands
searched within radii whose sum covers the distance, pigeonhole, every
candidate verified by its popcount), run as Ray tasks when Ray is up. Pairs
join into clusters (connected components), and each cluster keeps one sample
by the ``keep`` rule (default: the smallest key); the others are dropped with
``duplicate:near_image`` and ``duplicate_of`` = the kept key.

What pHash is good for: exact copies, resized copies and JPEG re-encodes. It is
*not* a near-duplicate detector for crops, edits or re-shoots — imagededup
measured pHash near-duplicate recall of 0.016 on UKBench; use
``dedup_semantic`` (CLIP embeddings) for those.

The default ``max_distance: 10`` is imagededup's default for pHash. pHash
also collides on low-texture images (flat graphics, logos, near-blank pictures:
the grey DCT signs of one shape on a plain background hardly depend on its colour).
``min_cosine`` guards against that: a pair must then also have CLIP image embeddings
(``clip_image_emb``) at least that similar. On the demo world — such flat scenes —
pHash alone at 4 bits drops 136 distinct images for 45/50 resized copies; with
``min_cosine: 0.995`` it drops 2 for 48/50 (README, dedup section).

The cost of the search at distance 10 (benchmarks/phash.py, uniformly random
hashes, the hard case): about n^1.6 — 3 bands of 21-22 bits searched within 3, 3
and 2 bits at a million hashes, ~7 · 10⁻⁴ of all pairs verified. A lower
``max_distance`` is much cheaper (6: ~5× fewer candidates at a million).

The recipe entry brings its own ``image_hash`` stage, named ``<name>_hash``,
unless ``hash_images: false`` says an earlier stage already added ``phash``.

Example::

    - use: dedup_phash
      max_distance: 10
      min_cosine: 0.95       # optional: CLIP embeddings must agree too (needs clip_score before)
      keep: [-clip_score]
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.dedup.clusters import KEEP_FIELD, connected_components, decide_clusters, keep_columns
from curate.dedup.phash import (
    HASH_BITS,
    SearchStats,
    distinct_hashes,
    expand_pairs,
    near_value_pairs,
    pair_count,
)
from curate.dedup.semantic import EmbeddingError, embedding_matrix, normalise
from curate.errors import CurateError
from curate.stages.base import GlobalStage, StageConfig
from curate.stages.image_hash import PHASH, hash_stage_for
from curate.stages.registry import register

log = logging.getLogger(__name__)

REASON = "duplicate:near_image"
#: imagededup's default Hamming threshold for pHash (out of 64 bits).
DEFAULT_MAX_DISTANCE = 10


def _ray_up() -> bool:
    """Whether decide() runs under a started Ray (a run): then the search runs as Ray tasks."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


class DedupPhashConfig(StageConfig):
    use: Literal["dedup_phash"] = "dedup_phash"
    max_distance: int = Field(DEFAULT_MAX_DISTANCE, ge=0, le=HASH_BITS // 2,
                              description="Largest Hamming distance (bits of 64) between duplicate pHashes.")
    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Also require this cosine similarity of the embeddings in "
        "`embedding_column` (from clip_score): keeps low-texture images whose pHashes collide apart.")
    embedding_column: str = Field("clip_image_emb", description="Embeddings read when min_cosine is set.")
    keep: list[str] = KEEP_FIELD
    hash_images: bool = Field(True, description="Add an image_hash stage named `<name>_hash` before this one. "
                              "Set false when an earlier image_hash already added the phash column.")


@register
class DedupPhash(GlobalStage[DedupPhashConfig]):
    """Clusters of images within ``max_distance`` pHash bits; one kept per cluster."""

    name = "dedup_phash"
    Config = DedupPhashConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {"duplicate_of": pa.string()}

    @classmethod
    def expand(cls, config: DedupPhashConfig) -> list[StageConfig]:
        return [hash_stage_for(config), config] if config.hash_images else [config]

    def input_columns(self) -> list[str]:
        cfg = self.config
        emb = [cfg.embedding_column] if cfg.min_cosine is not None else []
        return [PHASH, *emb, *keep_columns(cfg.keep)]

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        cfg = self.config
        if PHASH not in table.column_names:
            raise CurateError(f"{self.stage_name}: needs column {PHASH!r}, which no earlier stage produced. "
                              "Add `- use: image_hash` before this stage, or leave `hash_images: true`")
        hashes = table[PHASH]
        present = pc.is_valid(hashes)
        valid = np.flatnonzero(present.to_numpy(zero_copy_only=False))
        # filter before to_numpy: with nulls numpy would get float64 and lose the low bits of the hashes
        values = np.asarray(hashes.filter(present).to_numpy(), dtype=np.int64)
        distinct, inverse = distinct_hashes(values)
        stats = SearchStats()
        vl, vr = near_value_pairs(distinct, cfg.max_distance, use_ray=_ray_up(), stats=stats)
        hash_pairs = pair_count(inverse, vl, vr)
        if cfg.min_cosine is not None:  # every row pair is checked against the embeddings
            left, right = expand_pairs(inverse, vl, vr)
            left, right = self._verify(table, valid[left], valid[right], cfg.min_cosine)
            pairs = len(left)
        else:  # rows of one hash join their first row; a pair of hashes joins those first rows
            first = np.full(len(distinct), len(valid), np.int64)
            np.minimum.at(first, inverse, np.arange(len(valid)))
            rest = np.flatnonzero(first[inverse] != np.arange(len(valid)))
            left = valid[np.concatenate([first[vl], first[inverse[rest]]])]
            right = valid[np.concatenate([first[vr], rest])]
            pairs = hash_pairs
        labels = connected_components(table.num_rows, left, right)
        decisions, info = decide_clusters(table, labels, reason=REASON, keep=cfg.keep)
        info.update({"max_distance": cfg.max_distance, "bands": len(stats.bands), "band_plan": stats.describe(),
                     "search_tasks": stats.tasks, "hashed": int(len(valid)), "distinct_hashes": int(len(distinct)),
                     "candidates": stats.candidates, "hash_pairs": hash_pairs, "pairs": int(pairs),
                     "min_cosine": cfg.min_cosine})
        log.info("%s: %d hashes (%d distinct), bands %s, %d candidate pairs, %d within %d bits, %d dropped",
                 self.stage_name, len(valid), len(distinct), stats.describe(), stats.candidates, hash_pairs,
                 cfg.max_distance, info["dropped"])
        return decisions, info

    def _verify(self, table: pa.Table, left: np.ndarray, right: np.ndarray,
                min_cosine: float) -> tuple[np.ndarray, np.ndarray]:
        """Keep the pairs whose embeddings are at least ``min_cosine`` similar (rows without one: no pair)."""
        col = self.config.embedding_column
        if col not in table.column_names:
            raise CurateError(f"{self.stage_name}: min_cosine needs column {col!r}, which no earlier stage "
                              "produced. Add `- use: clip_score` with `keep_embeddings: true` before this stage")
        try:
            valid, x = embedding_matrix(table[col], f"{self.stage_name}: column {col!r}")
        except EmbeddingError as e:
            raise CurateError(str(e)) from e
        pos = np.full(table.num_rows, -1, np.int64)
        pos[valid] = np.arange(len(valid))
        x = normalise(x)
        a, b = pos[left], pos[right]
        ok = (a >= 0) & (b >= 0)
        sim = np.full(len(left), -2.0, np.float32)
        sim[ok] = np.einsum("ij,ij->i", x[a[ok]], x[b[ok]])
        keep = sim >= np.float32(min_cosine)
        return left[keep], right[keep]
