"""SemDeDup's candidate search: k-means over embeddings, then pairwise cosine inside each cluster.

Abbas et al. (SemDeDup, 2023) cluster CLIP image embeddings with k-means and
compare only samples of the same cluster, so the quadratic step runs on
clusters of ~n/k rows instead of the whole pool. :class:`SemanticPairs` does
exactly that, on Ray workers when Ray is up (``use_ray``), in this process
otherwise — the same functions, the same result:

1. the normalised rows are cut into chunks of ``CHUNK_ROWS`` (boundaries at
   fixed row numbers) and put in the object store once;
2. k-means: seeded k-means++ (scikit-learn's) on a sample of
   max(``KMEANS_INIT_MIN``, ``KMEANS_INIT_PER_CLUSTER``·k) rows in one task, then Lloyd iterations on a seeded sample of
   ``kmeans_sample`` rows, where each iteration's assignment and per-cluster sums
   run as one task per chunk and the driver only adds the k × d sums (in chunk
   order, float64) into the means (Euclidean k-means on the unit rows, as
   scikit-learn's); stops when fewer than ``KMEANS_TOL`` of the sample rows change cluster;
3. every row is assigned to its most similar (cosine) centroid by one task per chunk,
   which also splits its rows by ``cluster % partitions`` (a shuffle);
4. one task per partition compares the rows of each of its clusters (a cluster
   larger than ``max_cluster_size`` is first split by k-means again, then, if its
   points are too alike to split, in row order) and returns the pairs.

Guarantees the pipeline needs:

- **deterministic**: rows are given in key order by the caller, chunks have fixed
  boundaries, the sums are added in chunk order, every tie breaks by row index —
  the result depends neither on shards nor on the number of workers or partitions;
- **bounded memory**: similarities are computed in row blocks of at most
  ``PAIR_BLOCK`` values; no process but the caller holds all rows (the driver
  puts them in the object store chunk by chunk).

Pairs whose vectors are *across* two clusters are not compared — the
approximation SemDeDup makes (near-duplicates are close, so they almost
always share a cluster; exact copies always do).

Why not faiss: its k-means is fast on one machine, but here every Lloyd step is
spread over Ray tasks anyway, and a step is one matrix product and an argmax
per chunk (numpy's BLAS, the kernel faiss would call); faiss would add a
native dependency for nothing the tasks need.

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
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: Similarity block (float32 values) per matrix product: ~32 MB, whatever a cluster's size.
PAIR_BLOCK = 8_000_000
#: Rows Lloyd's iterations run on: enough to place sqrt(n) centroids for pools of tens of millions;
#: every row is then assigned once.
KMEANS_SAMPLE = 200_000
#: Lloyd iterations at most; they stop earlier once fewer than KMEANS_TOL of the sample rows change cluster
#: (SemDeDup's faiss setting is 100 iterations; near-duplicates sit together long before centroids settle).
KMEANS_ITER = 20
KMEANS_TOL = 1e-3
#: k-means++ seeds centroids from this many sample rows per cluster (its cost is ~10·rows·k·d).
KMEANS_INIT_PER_CLUSTER = 16
KMEANS_INIT_MIN = 20_000
#: Largest cluster compared as a whole: its pairwise step is max_cluster_size² dot products.
MAX_CLUSTER_SIZE = 20_000
#: Rows per chunk (one task per chunk and Lloyd step): 64 MB of float32 at d = 512.
CHUNK_ROWS = 32_768
#: Bytes of vectors per pairwise partition (one task each).
PARTITION_BYTES = 256 * 2**20
#: Rows below which the search stays in this process even when Ray is up.
RAY_MIN_ROWS = 20_000


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
    kmeans_iterations: int = 0
    tasks: int = 0


class _Local:
    """Runs the steps in this process (the same functions the Ray tasks run)."""

    def put(self, x):
        return x

    def get(self, x):
        return x

    def call(self, fn, *args, num_returns: int = 1):
        return fn(*args)


class _Ray:
    def __init__(self) -> None:
        import ray

        self.ray = ray
        self.fns: dict = {}
        self.tasks = 0

    def put(self, x):
        return self.ray.put(x)

    def get(self, x):
        return self.ray.get(x)

    def call(self, fn, *args, num_returns: int = 1):
        key = (fn, num_returns)
        if key not in self.fns:
            self.fns[key] = self.ray.remote(fn).options(num_returns=num_returns)
        self.tasks += 1
        return self.fns[key].remote(*args)


@dataclass
class SemanticPairs:
    """Pairs of rows with cosine similarity ≥ 1 - ``epsilon`` inside k-means clusters."""

    epsilon: float
    n_clusters: int | None = None
    seed: int = 0
    max_cluster_size: int = MAX_CLUSTER_SIZE
    kmeans_sample: int = KMEANS_SAMPLE
    kmeans_iter: int = KMEANS_ITER
    chunk_rows: int = CHUNK_ROWS
    partitions: int | None = None

    def pairs(self, x: np.ndarray, *, use_ray: bool = False) -> tuple[np.ndarray, np.ndarray, SemanticStats]:
        """(left, right, stats) for the rows of ``x`` (n × d, any float dtype, not yet normalised)."""
        x = np.asarray(x)
        return self.pairs_of_chunks((normalise(x[s:s + self.chunk_rows]) for s in range(0, len(x), self.chunk_rows)),
                                    use_ray=use_ray)

    def pairs_of_chunks(self, chunks: Iterable[np.ndarray], *, use_ray: bool = False
                        ) -> tuple[np.ndarray, np.ndarray, SemanticStats]:
        """Like :meth:`pairs` for normalised rows given as consecutive chunks of ``chunk_rows`` (the last shorter)."""
        run = _Local()
        refs, sizes = [], []
        held: list[np.ndarray] = []
        for c in chunks:  # chunks go to the object store as they come once there are enough rows
            if use_ray and isinstance(run, _Local) and sum(sizes) + len(c) >= RAY_MIN_ROWS:
                run = _Ray()
                refs = [run.put(h) for h in held]
                held = []
            if isinstance(run, _Ray):
                refs.append(run.put(c))
            else:
                held.append(c)
            sizes.append(len(c))
        if isinstance(run, _Local):
            refs = held
        n = sum(sizes)
        stats = SemanticStats()
        if n < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
        dim = int(self._shape(run, refs[0]))
        offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        k = min(n, self.n_clusters or default_clusters(n))
        centroids = self._kmeans(run, refs, offsets, k, stats) if k > 1 else None
        if isinstance(run, _Ray):
            cpus = max(1, int(run.ray.cluster_resources().get("CPU", 1)))
            parts = self.partitions or max(cpus, -(-n * dim * 4 // PARTITION_BYTES))
        else:
            parts = self.partitions or 1
        parts = max(1, min(parts, k))
        c_ref = run.put(centroids)
        outs = [run.call(_assign_split, ref, c_ref, int(offsets[i]), parts, num_returns=parts)
                for i, ref in enumerate(refs)]
        if parts == 1:
            outs = [[o] for o in outs]
        cfg = (self.epsilon, self.max_cluster_size, self.kmeans_sample, self.seed)
        results = run.get([run.call(_partition_pairs, cfg, *[o[p] for o in outs]) for p in range(parts)])
        left = np.concatenate([r[0] for r in results])
        right = np.concatenate([r[1] for r in results])
        for r in results:
            stats.clusters += r[2].clusters
            stats.largest_cluster = max(stats.largest_cluster, r[2].largest_cluster)
            stats.split_clusters += r[2].split_clusters
            stats.compared_pairs += r[2].compared_pairs
        stats.tasks = getattr(run, "tasks", 0)
        order = np.lexsort((right, left))
        return left[order], right[order], stats

    @staticmethod
    def _shape(run, ref) -> int:
        return run.get(run.call(_dim, ref))

    def _kmeans(self, run, refs: list, offsets: np.ndarray, k: int, stats: SemanticStats) -> np.ndarray:
        """k normalised centroids: k-means++ on a sample, then Lloyd steps as one task per chunk."""
        n = int(offsets[-1])
        rng = np.random.default_rng(self.seed)
        pick = np.sort(rng.choice(n, self.kmeans_sample, replace=False)) if n > self.kmeans_sample \
            else np.arange(n)
        bounds = np.searchsorted(pick, offsets)
        pieces = [run.call(_take, ref, pick[bounds[i]:bounds[i + 1]] - offsets[i])
                  for i, ref in enumerate(refs) if bounds[i + 1] > bounds[i]]
        m = len(pick)
        init_rows = np.sort(rng.choice(m, min(m, max(KMEANS_INIT_MIN, KMEANS_INIT_PER_CLUSTER * k)),
                                       replace=False)) if m > KMEANS_INIT_MIN else np.arange(m)
        centroids = run.get(run.call(_init_centroids, init_rows, k, self.seed, *pieces))
        labels = None
        for it in range(self.kmeans_iter):
            c_ref = run.put(centroids)
            steps = run.get([run.call(_lloyd_step, piece, c_ref) for piece in pieces])
            sums = np.zeros_like(steps[0][0])
            counts = np.zeros(k, np.int64)
            for s_, c_, _ in steps:  # in chunk order: the same float sums whatever ran where
                sums += s_
                counts += c_
            new_labels = np.concatenate([st[2] for st in steps])
            stats.kmeans_iterations = it + 1
            moved = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)  # Euclidean means, as sklearn's
            centroids = np.where((counts > 0)[:, None], moved, centroids)  # an empty cluster keeps its centroid
            if labels is not None and np.count_nonzero(labels != new_labels) <= KMEANS_TOL * len(labels):
                break
            labels = new_labels
        return normalise(centroids)  # rows then go to the most similar (cosine) centroid


def _dim(x: np.ndarray) -> int:
    return int(x.shape[1])


def _take(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[rows])


def _init_centroids(rows: np.ndarray, k: int, seed: int, *pieces: np.ndarray) -> np.ndarray:
    """Seeded k-means++ (scikit-learn's greedy variant) on the given rows of the sample."""
    from sklearn.cluster import kmeans_plusplus

    sample = np.concatenate(pieces)[rows]
    centres, _ = kmeans_plusplus(sample, k, random_state=seed)
    return centres.astype(np.float32)


def _lloyd_step(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-cluster float64 sums of the rows, counts, labels) of one chunk."""
    labels = _nearest(x, centroids, euclidean=True)
    k, d = centroids.shape
    sums = np.zeros((k, d), np.float64)
    _sum_by_label(sums, labels, x)
    return sums, np.bincount(labels, minlength=k).astype(np.int64), labels.astype(np.int32)


def _sum_by_label(sums: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
    if not labels.size:
        return
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sums[lab[starts]] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)


def _assign_split(x: np.ndarray, centroids: np.ndarray | None, first_row: int, parts: int):
    """Each row's cluster; the rows as (global row, cluster, vectors) split into ``parts`` by cluster."""
    labels = np.zeros(x.shape[0], np.int64) if centroids is None else _nearest(x, centroids)
    rows = np.arange(first_row, first_row + x.shape[0], dtype=np.int64)
    part = labels % parts
    out = [(rows[part == p], labels[part == p], np.ascontiguousarray(x[part == p])) for p in range(parts)]
    return out if parts > 1 else out[0]


def _partition_pairs(cfg: tuple, *pieces) -> tuple[np.ndarray, np.ndarray, SemanticStats]:
    """Close pairs inside every cluster of one partition (rows ascending within each cluster)."""
    epsilon, max_cluster_size, kmeans_sample, seed = cfg
    rows = np.concatenate([p[0] for p in pieces])
    labels = np.concatenate([p[1] for p in pieces])
    x = np.concatenate([p[2] for p in pieces]) if rows.size else np.zeros((0, 1), np.float32)
    stats = SemanticStats()
    lefts, rights = [], []
    threshold = np.float32(1.0 - epsilon)
    splitter = _Splitter(max_cluster_size, kmeans_sample, seed)
    for members in _members(labels) if rows.size else []:
        if not members.size:
            continue
        parts = splitter.split(x, members) if members.size > max_cluster_size else [members]
        stats.split_clusters += len(parts) > 1
        for part in parts:
            stats.clusters += 1
            stats.largest_cluster = max(stats.largest_cluster, int(part.size))
            if part.size < 2:
                continue
            stats.compared_pairs += part.size * (part.size - 1) // 2
            for li, ri in _close_pairs(x, part, threshold):
                lefts.append(rows[li])
                rights.append(rows[ri])
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    return np.concatenate(lefts), np.concatenate(rights), stats


@dataclass
class _Splitter:
    max_cluster_size: int
    kmeans_sample: int
    seed: int

    def split(self, x: np.ndarray, members: np.ndarray, depth: int = 0) -> list[np.ndarray]:
        """A too-large cluster as parts of at most ``max_cluster_size`` rows (k-means, then row order)."""
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
            out.extend(self.split(x, g, depth + 1))
        return out

    def _kmeans(self, x: np.ndarray, k: int, seed: int) -> np.ndarray:
        """Cluster label per row: fit on a seeded sample, assign every row to its nearest centroid."""
        from sklearn.cluster import KMeans

        n = x.shape[0]
        fit = x
        if n > self.kmeans_sample:
            pick = np.sort(np.random.default_rng(seed).choice(n, self.kmeans_sample, replace=False))
            fit = x[pick]
        km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed).fit(fit)
        return _nearest(x, normalise(km.cluster_centers_))


def _members(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices (ascending) of each label 0..max."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, bounds)


def _nearest(x: np.ndarray, centroids: np.ndarray, euclidean: bool = False) -> np.ndarray:
    """Index of the most similar centroid per row (first on ties), in blocks; ``euclidean``: the
    nearest by L2 distance (x·c - |c|²/2 for the unit rows) instead of the largest cosine."""
    out = np.empty(x.shape[0], np.int64)
    step = max(1, PAIR_BLOCK // max(1, centroids.shape[0]))
    bias = -0.5 * np.einsum("ij,ij->i", centroids, centroids) if euclidean else 0.0
    for start in range(0, x.shape[0], step):
        out[start:start + step] = np.argmax(x[start:start + step] @ centroids.T + bias, axis=1)
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


def embedding_chunks(column: pa.ChunkedArray, what: str, chunk_rows: int = CHUNK_ROWS
                     ) -> tuple[np.ndarray, Iterable[np.ndarray]]:
    """(row indices with a vector, normalised float32 chunks of ``chunk_rows`` of them, built lazily).

    The driver holds the Arrow column and one chunk at a time, not an n × d float32 matrix.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type)
            or pa.types.is_large_list(arr.type)):
        raise EmbeddingError(f"{what} holds {arr.type}, expected a list of floats (an embedding per row)")
    valid = np.flatnonzero(pc.is_valid(arr).to_numpy(zero_copy_only=False))
    if not len(valid):
        return valid, iter(())
    present = arr.take(pa.array(valid))
    lengths = pc.list_value_length(present).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise EmbeddingError(f"{what} has vectors of different lengths ({lengths.min()}..{lengths.max()})")
    dim = int(lengths[0])

    def chunks():
        for s in range(0, len(present), chunk_rows):
            part = present.slice(s, chunk_rows)
            flat = pc.list_flatten(part).to_numpy(zero_copy_only=False)
            yield normalise(flat.astype(np.float32).reshape(len(part), dim))

    return valid, chunks()
