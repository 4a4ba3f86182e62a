"""Caption near-duplicate dedup with MinHash LSH (a global stage): ``use: dedup_minhash``.

Captions that differ by small edits — casing, punctuation, a typo, a word added
or dropped — are clustered with MinHash LSH (:mod:`curate.dedup.minhash`:
datasketch 2.x signatures computed in batch, band buckets built by a hash
shuffle on Ray, every candidate pair verified by its estimated Jaccard). Rows are
then taken in the ``keep`` rule's order (:mod:`curate.dedup.clusters`; by key when
none): a row that matches a row already kept is dropped as its copy, any other row
is kept. Clusters do not chain: A ~ B ~ C drops B only, when A and C differ.

Example::

    - use: clip_score            # keeps clip_image_emb for match: pair
      keep_embeddings: true
    - use: dedup_minhash
      threshold: 0.8
      keep: [-clip_score]        # keep the best-scoring sample of each cluster
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import rows
from curate.dedup.clusters import KEEP_FIELD, decide_clusters, keep_columns, preference_order
from curate.dedup.minhash import MinHashParams
from curate.dedup.minhash_lsh import PairStats, near_duplicate_pairs
from curate.stages.base import GlobalStage, StageConfig
from curate.stages.registry import register

CLIP_EMB = "clip_image_emb"  # float16 vectors kept by clip_score
PHASH = "phash"  # int64 pHash bits from image_hash

#: Cosine of CLIP image embeddings above which two images count as the same picture: resized,
#: re-encoded or lightly cropped copies score ≥ 0.95 with ViT-B/32-class models, while distinct
#: photos of one subject (two different dogs on a beach) mostly score 0.7–0.9.
DEFAULT_IMAGE_MIN_COSINE = 0.9
#: pHash bits (of 64) two images may differ in: imagededup's default ``max_distance_threshold``
#: for pHash, which catches resized and re-encoded copies and few unrelated images.
DEFAULT_IMAGE_MAX_HAMMING = 10
#: Threshold 0.8 is datasketch's and text-dedup's usual choice; on 5-gram shingles of a 10-20 word
#: caption it is about one word changed or added, while 0.7 starts to join captions that
#: share a template ("a photo of a red car" / "a photo of a blue car").
DEFAULT_THRESHOLD = 0.8


class DedupMinhashConfig(StageConfig):
    use: Literal["dedup_minhash"] = "dedup_minhash"
    threshold: float = Field(DEFAULT_THRESHOLD, gt=0.0, lt=1.0,
                             description="Estimated Jaccard of the captions' shingle sets at or above which "
                             "two captions are near-duplicates; bands × rows are chosen from it.")
    num_perm: int = Field(128, ge=2, le=1024, description="MinHash permutations per signature.")
    seed: int = Field(1, ge=0, description="Seed of the permutations (datasketch's default: 1).")
    shingle: Literal["char", "word"] = Field(
        "char", description="char: character n-grams of the normalised caption (robust to typos and "
        "short captions); word: all word 1..ngram-grams.")
    ngram: int = Field(5, ge=1, le=64, description="char: characters per shingle (a caption shorter than "
                       "this is one shingle, its whole text); word: the longest word n-gram.")
    match: Literal["caption", "pair"] = Field(
        "pair", description="pair: near-duplicate captions count only when the images are near-duplicates "
        "too; caption: the caption alone decides.")
    image_similarity: Literal["auto", "clip", "phash"] = Field(
        "auto", description="match: pair compares images by clip (cosine of clip_image_emb) or phash "
        "(Hamming distance of image_hash's phash); auto: clip when present, else phash.")
    image_min_cosine: float = Field(DEFAULT_IMAGE_MIN_COSINE, ge=-1.0, le=1.0)
    image_max_hamming: int = Field(DEFAULT_IMAGE_MAX_HAMMING, ge=0, le=64)
    verify_sigmas: float = Field(2.0, ge=0.0, le=6.0, description="Candidate pairs must reach an estimated "
                                 "Jaccard of threshold - verify_sigmas × its standard error (0: the threshold "
                                 "itself, which rejects half of the pairs right at the threshold).")
    verify: bool = Field(True, description="Check each candidate pair's estimated Jaccard; false keeps every "
                         "pair sharing a band bucket, as datasketch's MinHashLSH query does.")
    keep: list[str] = KEEP_FIELD


@register
class DedupMinhash(GlobalStage[DedupMinhashConfig]):
    """Drop captions that nearly repeat another's; ``duplicate_of`` names the kept sample.

    Why ``match: pair`` is the default: on web data many *distinct* images share one
    caption ("image", "stock photo of a dog", a product name); dropping them by caption
    alone throws away good images. With ``pair`` a near-duplicate caption is a duplicate
    only when the two images are near-duplicates too (CLIP embedding cosine ≥
    ``image_min_cosine``, else pHash Hamming ≤ ``image_max_hamming``); a row whose image
    feature is missing is then nobody's duplicate. ``match: caption`` drops on the
    caption alone (text-only corpora, or when captions will be regenerated anyway).

    Null and empty captions are never duplicates of each other. A caption shorter
    than one char shingle is a single shingle (its whole normalised text), so it
    matches only the same short caption — which is what exact dedup would drop too.

    Reasons: ``duplicate:near_caption`` (match: caption), ``duplicate:near_pair`` (match: pair).
    """

    name = "dedup_minhash"
    Config = DedupMinhashConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {"duplicate_of": pa.string()}

    def params(self) -> MinHashParams:
        c = self.config
        return MinHashParams(threshold=c.threshold, num_perm=c.num_perm, seed=c.seed, shingle=c.shingle,
                             ngram=c.ngram, verify_sigmas=c.verify_sigmas, verify=c.verify)

    def check(self) -> None:
        self.params().band_rows()  # fails early on impossible settings

    def input_columns(self) -> list[str]:
        cols = [rows.CAPTION, *keep_columns(self.config.keep)]
        if self.config.match == "pair":
            cols += {"auto": [CLIP_EMB, PHASH], "clip": [CLIP_EMB], "phash": [PHASH]}[self.config.image_similarity]
        return cols

    def _image_column(self, table: pa.Table) -> str:
        c = self.config
        have = [col for col in ([CLIP_EMB, PHASH] if c.image_similarity == "auto"
                                else [CLIP_EMB if c.image_similarity == "clip" else PHASH])
                if col in table.column_names]
        if have:
            return have[0]
        wanted = {"auto": f"{CLIP_EMB} or {PHASH}", "clip": CLIP_EMB, "phash": PHASH}[c.image_similarity]
        raise ValueError(
            f"{self.stage_name}: match: pair compares images by {wanted}, which no earlier stage produced. "
            f"Add `use: clip_score` with keep_embeddings: true (for {CLIP_EMB}) or `use: image_hash` "
            f"(for {PHASH}, as dedup_phash uses) before this stage, or set match: caption")

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        c = self.config
        if rows.CAPTION not in table.column_names:
            raise ValueError(f"{self.stage_name}: needs column 'caption'; set source.caption_col")
        image_col = self._image_column(table) if c.match == "pair" else None
        # Work in key order so the pairs, hence the clusters, do not depend on shard or worker counts.
        order = pc.sort_indices(table[rows.KEY]).to_numpy()
        needed = dict.fromkeys([rows.KEY, rows.CAPTION, *keep_columns(c.keep), *([image_col] if image_col else [])])
        table = table.select([col for col in needed if col in table.column_names]).take(pa.array(order))
        stats = PairStats()
        left, right = near_duplicate_pairs(table[rows.CAPTION], self.params(), stats=stats)
        info: dict[str, Any] = {"bands": stats.bands, "rows_per_band": stats.rows,
                                "verify_threshold": round(self.params().verify_threshold(), 4),
                                "candidate_pairs": stats.candidate_pairs, "compared_pairs": stats.compared_pairs,
                                "caption_pairs": stats.verified_pairs}
        if image_col is not None:
            ok = _images_match(table[image_col], left, right, image_col, c)
            info["image_similarity"] = "clip" if image_col == CLIP_EMB else "phash"
            info["image_rejected_pairs"] = int((~ok).sum())
            left, right = left[ok], right[ok]
        info["pairs"] = int(len(left))
        preferred = preference_order(table, c.keep)  # one sort serves the clusters and their kept rows
        from curate.dedup.minhash_kernels import leader_labels  # numba: imported when a stage runs

        labels = leader_labels(table.num_rows, left, right, preferred)
        reason = "duplicate:near_caption" if c.match == "caption" else "duplicate:near_pair"
        decisions, cluster_info = decide_clusters(table, labels, reason=reason, keep=c.keep, order=preferred)
        info.update(cluster_info)
        return decisions, info


def _images_match(column: pa.ChunkedArray, left: np.ndarray, right: np.ndarray, name: str,
                  cfg: DedupMinhashConfig) -> np.ndarray:
    """Whether each pair's images are near-duplicates; a missing image feature never matches."""
    if len(left) == 0:
        return np.zeros(0, dtype=bool)
    col = column.combine_chunks()
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    if name == PHASH:
        h = col.fill_null(0).to_numpy().view(np.uint64)
        dist = np.bitwise_count(h[left] ^ h[right])
        return valid[left] & valid[right] & (dist <= cfg.image_max_hamming)
    # clip_image_emb: fixed-size (or variable) list of floats; normalise then dot per pair
    flat = pc.list_flatten(col)  # null rows contribute no values
    dim = len(flat) // max(int(valid.sum()), 1)
    emb = np.zeros((len(col), dim), dtype=np.float32)
    emb[valid] = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb /= np.where(norm > 0, norm, 1.0)
    cos = np.einsum("ij,ij->i", emb[left], emb[right])
    return valid[left] & valid[right] & (cos >= cfg.image_min_cosine)
