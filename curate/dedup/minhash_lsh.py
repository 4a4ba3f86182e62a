"""MinHash LSH on Ray: caption slices → signatures → a hash shuffle of band buckets → verified pairs.

The algorithm (shingles, signatures, bands × rows, bucket pairs) is
:mod:`curate.dedup.minhash`; this module distributes it. Map tasks normalise
their slice of captions (in parallel, not on the driver), sign it and partition
``(bucket, band, row)`` by bucket; reduce tasks sort their partition, emit the
pairs that share a bucket and verify each by the signatures' agreement. No
process holds an LSH index or a signature matrix of the whole data set: what a
map task keeps for verification is its slice's *verification sketch*, the low
16 bits of each signature value (256 bytes a row at 128 permutations, half the
signature; two different minima agree there with probability 2**-16, so the
estimated Jaccard moves by at most ~1.5e-5).

Example::

    >>> params = MinHashParams(threshold=0.8)
    >>> left, right = near_duplicate_pairs(
    ...     ["a photo of a red dog on the beach", "A photo of a red dog on the beach!",
    ...      "a photo of a red dog on the beach at dawn", "a cat"], params)
    >>> sorted(zip(left.tolist(), right.tolist()))  # " at dawn": 5-gram Jaccard 0.78, within 2σ of 0.8
    [(0, 1), (0, 2), (1, 2)]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate.dedup.minhash import (
    MinHashParams,
    band_hashes,
    bucket_pairs,
    slice_signatures,
    warm_kernels,
)

#: Rows per map task: large enough that Ray's per-task cost (~ms) is noise, small enough that a
#: task's Python strs (normalised in the task) and shuffle pieces stay a few tens of MB.
MAX_ROWS_PER_TASK = 50_000
#: Rows whose band hashes one reducer sorts: (rows × bands) × 3 int64 arrays and their sorted
#: copies ≈ 50 MB at 9 bands, instead of N/cpus rows each (≈ 1 GB per reducer at a million rows).
MAX_ROWS_PER_PARTITION = 100_000
#: Pairs verified per numpy step: (chunk × num_perm) uint32 twice = 64 MB at 128 perms.
VERIFY_CHUNK_PAIRS = 65_536

def verification_sketch(sig: np.ndarray) -> np.ndarray:
    """The low 16 bits of each signature value: what reducers compare to estimate a pair's Jaccard."""
    return sig.astype(np.uint16)


def _map_task(captions: pa.Array, first_row: int, params: MinHashParams, partitions: int, normalised: bool):
    """Normalise a slice of captions, sign it, and split its band hashes into ``partitions`` by bucket.

    Returns the slice's verification sketch (rows × num_perm uint16; a null or empty caption's row
    is zeros and never read), then one ``(band uint8, bucket uint64, row int64)`` piece per partition.
    Null and empty captions (after normalisation) get no band entries: they match nobody.
    """
    num_perm = params.num_perm
    idx, sig = slice_signatures(captions, params, normalised)
    sketch = np.zeros((len(captions), num_perm), dtype=np.uint16)
    sketch[idx] = verification_sketch(sig)
    bands, rows_per_band = params.band_rows()
    bucket = band_hashes(sig, bands, rows_per_band).reshape(-1)
    del sig
    row = np.repeat(idx.astype(np.int64) + first_row, bands)
    band = np.tile(np.arange(bands, dtype=np.uint8), len(idx))
    part = (bucket % np.uint64(partitions)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    splits = np.searchsorted(part[order], np.arange(1, partitions))
    pieces = [(band[o], bucket[o], row[o]) for o in np.split(order, splits)]
    return (sketch, *pieces)


def _reduce_task(per_task: int, threshold: float, sketch_refs: list, *pieces):
    """Pairs sharing a bucket in this partition, kept when their sketches agree enough.

    ``sketch_refs`` are the map tasks' sketch slices (``per_task`` rows each, the last shorter);
    only the slices this partition's pairs touch are fetched, one at a time, from the object
    store where they already are.
    """
    band = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.uint8)
    bucket = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.uint64)
    row = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, np.int64)
    del pieces
    left, right = bucket_pairs(band, bucket, row)
    del band, bucket, row
    agree = sketch_agreement(SliceRows(sketch_refs, per_task), left, right)
    ok = agree >= threshold - 1e-12
    return left[ok], right[ok], len(left)


def sketch_agreement(sketch: SliceRows | np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair: the fraction of permutations whose (sketched) minima agree."""
    rows = np.unique(np.concatenate([left, right]))
    got = sketch[rows]  # only the rows the pairs name: (distinct rows × num_perm)
    li, ri = np.searchsorted(rows, left), np.searchsorted(rows, right)
    out = np.empty(len(left), dtype=np.float64)
    for i in range(0, len(left), VERIFY_CHUNK_PAIRS):
        j = slice(i, i + VERIFY_CHUNK_PAIRS)
        out[j] = (got[li[j]] == got[ri[j]]).mean(axis=1)
    return out


class SliceRows:
    """Rows of a matrix held as equal slices in Ray's object store: ``m[idx]`` fetching only the
    slices ``idx`` touches, one at a time (each is mapped read-only from shared memory)."""

    def __init__(self, refs: list, per_slice: int) -> None:
        self.refs = refs
        self.per_slice = per_slice

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        import ray

        idx = np.asarray(idx, dtype=np.int64)
        which = idx // self.per_slice
        out = None
        for k in np.unique(which):
            part = ray.get(self.refs[int(k)])
            if out is None:
                out = np.empty((len(idx), part.shape[1]), dtype=part.dtype)
            m = which == k
            out[m] = part[idx[m] - int(k) * self.per_slice]
            del part
        return out if out is not None else np.zeros((0, 0), np.uint16)


@dataclass
class PairStats:
    """What the LSH found: for the manifest's info."""

    bands: int = 0
    rows: int = 0
    #: pairs sharing a bucket, summed over partitions (a pair whose bands collide in buckets of
    #: two partitions counts twice; within a partition each pair counts once)
    candidate_pairs: int = 0
    verified_pairs: int = 0  # distinct pairs whose signatures agree on ≥ the verify threshold


def near_duplicate_pairs(captions: list[str | None] | pa.Array | pa.ChunkedArray, params: MinHashParams, *,
                         stats: PairStats | None = None, partitions: int | None = None,
                         normalised: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (left < right) sharing an LSH bucket whose estimated Jaccard passes verification.

    Null and empty captions (after normalisation) take no part: they are never
    anyone's duplicate. Runs on the current Ray (started if needed). The result
    depends only on the captions and their order, not on task or partition counts.
    """
    import ray

    # The captions go to the object store as Arrow slices (~ the text's bytes per row); the map tasks
    # normalise them, so the driver builds no Python str per row.
    if isinstance(captions, pa.ChunkedArray):
        column = captions.combine_chunks() if captions.num_chunks != 1 else captions.chunk(0)
    elif isinstance(captions, pa.Array):
        column = captions
    else:
        column = pa.array(captions, pa.string())
    b, r = params.band_rows()
    if stats is not None:
        stats.bands, stats.rows = b, r
    n = len(column)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not ray.is_initialized():  # a library call outside a run: a local Ray, as ray.remote would start
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    warm_kernels()  # compiles once into numba's on-disk cache, which the workers then load
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # enough partitions that one reducer's sort stays small; the pairs do not depend on the count
    partitions = partitions or max(cpus, -(-n // MAX_ROWS_PER_PARTITION))
    per_task = max(1, min(MAX_ROWS_PER_TASK, -(-n // (2 * cpus))))
    map_fn = ray.remote(_map_task).options(num_returns=partitions + 1)
    outs = [map_fn.remote(pa.concat_arrays([column.slice(s, per_task)]), s, params, partitions, normalised)
            for s in range(0, n, per_task)]
    del column
    reduce_fn = ray.remote(_reduce_task)
    sketch_refs = [o[0] for o in outs]  # a list of refs inside an argument: passed by reference
    results = ray.get([reduce_fn.remote(per_task, params.verify_threshold(), sketch_refs,
                                        *[o[1 + p] for o in outs]) for p in range(partitions)])
    del outs, sketch_refs
    left = np.concatenate([res[0] for res in results])
    right = np.concatenate([res[1] for res in results])
    if len(left):  # a pair sharing buckets in several bands may come from several partitions
        code = np.unique(left * n + right)
        left, right = code // n, code % n
    if stats is not None:
        stats.candidate_pairs = int(sum(res[2] for res in results))
        stats.verified_pairs = int(len(left))
    return left, right
