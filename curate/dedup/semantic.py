"""SemDeDup's candidate search: k-means over embeddings, then pairwise cosine inside each cluster.

Abbas et al. (SemDeDup, 2023) cluster CLIP image embeddings with k-means and
compare only samples of the same cluster, so the quadratic step runs on
clusters of ~n/k rows instead of the whole pool. :class:`SemanticPairs` does
exactly that, with three guarantees the pipeline needs:

- **deterministic**: rows are given in key order by the caller, k-means is seeded
  (one init), and every tie breaks by row index — the result does not depend on
  shards or workers;
- **bounded memory**: similarities are computed in row blocks of at most
  ``PAIR_BLOCK`` values, and a cluster larger than ``max_cluster_size`` is split
  by k-means again (then, if its points are too alike to split, in key order);
- **bounded k-means time**: k-means is fitted on at most ``KMEANS_SAMPLE`` rows;
  every row is then assigned to its nearest centroid.

Pairs whose vectors are *across* two clusters are not compared — the
approximation SemDeDup makes (near-duplicates are close, so they almost
always share a cluster; exact copies always do).

Example::

    >>> import numpy as np
    >>> x = np.eye(4, dtype=np.float32)[[0, 1, 2, 0]]  # row 3 repeats row 0
    >>> left, right, stats = SemanticPairs(epsilon=0.05, seed=0).pairs(x)
    >>> list(zip(left.tolist(), right.tolist()))
    [(0, 3)]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: Similarity block (float32 values) per matrix product: ~32 MB, whatever a cluster's size.
PAIR_BLOCK = 8_000_000
#: Rows k-means is fitted on: enough to place sqrt(n) centroids for pools of tens of millions,
#: while one fit stays within seconds to a few minutes on a driver CPU.
KMEANS_SAMPLE = 200_000
#: Lloyd iterations: SemDeDup's (faiss) setting is 100; centroids barely move after ~50 on CLIP space.
KMEANS_ITER = 100
#: Largest cluster compared as a whole: its pairwise step is max_cluster_size² dot products.
MAX_CLUSTER_SIZE = 20_000


class EmbeddingError(ValueError):
    """An embedding column that is not one vector of floats per row, all of one length."""


def default_clusters(n: int) -> int:
    """k = ⌈√n⌉: per row, k-means costs O(k·d) and the in-cluster comparison O(n/k·d); √n balances them."""
    return max(1, min(n, math.ceil(math.sqrt(n))))


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero and match nothing."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@dataclass
class SemanticStats:
    clusters: int = 0
    largest_cluster: int = 0
    split_clusters: int = 0
    compared_pairs: int = 0


@dataclass
class SemanticPairs:
    """Pairs of rows with cosine similarity ≥ 1 - ``epsilon`` inside k-means clusters."""

    epsilon: float
    n_clusters: int | None = None
    seed: int = 0
    max_cluster_size: int = MAX_CLUSTER_SIZE
    kmeans_sample: int = KMEANS_SAMPLE

    def pairs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, SemanticStats]:
        """(left, right, stats) for the rows of ``x`` (n × d, any float dtype, not yet normalised)."""
        x = normalise(x)
        n = x.shape[0]
        stats = SemanticStats()
        if n < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
        k = min(n, self.n_clusters or default_clusters(n))
        labels = self._kmeans(x, k, self.seed)
        clusters = [c for c in _members(labels) if c.size]
        final: list[np.ndarray] = []
        for members in clusters:
            parts = self._split(x, members) if members.size > self.max_cluster_size else [members]
            stats.split_clusters += len(parts) > 1
            final.extend(parts)
        stats.clusters = len(final)
        stats.largest_cluster = int(max(c.size for c in final))
        threshold = np.float32(1.0 - self.epsilon)
        lefts, rights = [], []
        for members in final:
            if members.size < 2:
                continue
            stats.compared_pairs += members.size * (members.size - 1) // 2
            for li, ri in _close_pairs(x, members, threshold):
                lefts.append(li)
                rights.append(ri)
        if not lefts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
        return np.concatenate(lefts), np.concatenate(rights), stats

    def _kmeans(self, x: np.ndarray, k: int, seed: int) -> np.ndarray:
        """Cluster label per row: fit on a seeded sample, assign every row to its nearest centroid."""
        from sklearn.cluster import KMeans

        n = x.shape[0]
        if k <= 1:
            return np.zeros(n, np.int64)
        fit = x
        if n > self.kmeans_sample:
            pick = np.sort(np.random.default_rng(seed).choice(n, self.kmeans_sample, replace=False))
            fit = x[pick]
        km = KMeans(n_clusters=k, n_init=1, max_iter=KMEANS_ITER, random_state=seed).fit(fit)
        return _nearest(x, normalise(km.cluster_centers_))

    def _split(self, x: np.ndarray, members: np.ndarray, depth: int = 0) -> list[np.ndarray]:
        """A too-large cluster as parts of at most ``max_cluster_size`` rows (k-means, then key order)."""
        cap = self.max_cluster_size
        if members.size <= cap:
            return [members]
        k = min(members.size, math.ceil(2 * members.size / cap))  # parts of ~cap/2 leave room for imbalance
        sub = self._kmeans(x[members], k, self.seed + depth + 1)
        groups = [members[g] for g in _members(sub) if g.size]
        if len(groups) == 1 or depth >= 8:  # points too alike for k-means to separate
            log.warning("a cluster of %d near-identical embeddings is compared in key-order chunks of %d",
                        members.size, cap)
            return [members[i:i + cap] for i in range(0, members.size, cap)]
        out: list[np.ndarray] = []
        for g in groups:
            out.extend(self._split(x, g, depth + 1))
        return out


def _members(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices (ascending) of each label 0..max."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, bounds)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the most similar centroid per row (first on ties), in blocks."""
    out = np.empty(x.shape[0], np.int64)
    step = max(1, PAIR_BLOCK // max(1, centroids.shape[0]))
    for start in range(0, x.shape[0], step):
        out[start:start + step] = np.argmax(x[start:start + step] @ centroids.T, axis=1)
    return out


def _close_pairs(x: np.ndarray, members: np.ndarray, threshold: np.float32):
    """Pairs (members[i], members[j]), i < j, with cosine ≥ threshold; row blocks bound memory."""
    xm = x[members]
    m = members.size
    step = max(1, PAIR_BLOCK // m)
    for start in range(0, m - 1, step):
        sim = xm[start:start + step] @ xm.T
        i, j = np.nonzero(sim >= threshold)
        upper = j > i + start
        yield members[i[upper] + start], members[j[upper]]


def embedding_matrix(column: pa.ChunkedArray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(row indices with a vector, n × d float32 matrix) from a (fixed-size) list column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type)
            or pa.types.is_large_list(arr.type)):
        raise EmbeddingError(f"{what} holds {arr.type}, expected a list of floats (an embedding per row)")
    valid = np.flatnonzero(pc.is_valid(arr).to_numpy(zero_copy_only=False))
    if not len(valid):
        return valid, np.zeros((0, 1), np.float32)
    present = arr.take(pa.array(valid))
    lengths = pc.list_value_length(present).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise EmbeddingError(f"{what} has vectors of different lengths ({lengths.min()}..{lengths.max()})")
    flat = pc.list_flatten(present).to_numpy(zero_copy_only=False)
    return valid, flat.astype(np.float32).reshape(len(valid), int(lengths[0]))
