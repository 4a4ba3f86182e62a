"""MinHash LSH on Ray: caption slices → signatures → a hash shuffle of band buckets → verified pairs.

The algorithm (shingles, signatures, bands × rows, bucket pairs) is
:mod:`curate.dedup.minhash`; this module distributes it, in four rounds of Ray
tasks whose data stays in Ray's object store (and spills to disk when the store
is full):

1. **map**, per slice of captions: normalise (in parallel, not on the driver),
   sign, keep the slice's *verification sketch* (the low 16 bits of each
   signature value: 256 bytes a row at 128 permutations; two different minima
   agree there with probability 2**-16, so the estimated Jaccard moves by at most
   ~1.5e-5) and partition ``(band, bucket, row)`` entries by bucket;
2. **reduce**, per partition: sort, emit the candidate pairs that share a
   bucket, split them by the group of slices of their left row;
3. **pull**, per group of left slices: deduplicate the candidates (a pair
   sharing buckets in several bands comes from several partitions), read each
   slice's sketch once and attach the left row's sketch to each pair, split by
   the group of slices of the right row;
4. **compare**, per group of right slices: read each slice's sketch once and
   keep the pairs whose sketches agree on at least the threshold.

No process holds an LSH index, a signature matrix or the candidate pairs of the
whole data set; the driver receives only the verified pairs. With Ray's object
store capped, memory therefore stays nearly flat as the data set grows: with a
512 MiB store, 10M captions peak at 1.23× the memory of 1M, the rest on disk
(``benchmarks/minhash.py --object-store-mb 512``).

Example::

    >>> params = MinHashParams(threshold=0.8)
    >>> left, right = near_duplicate_pairs(
    ...     ["a photo of a red dog on the beach", "A photo of a red dog on the beach!",
    ...      "a photo of a red dog on the beach at dawn", "a cat"], params)
    >>> sorted(zip(left.tolist(), right.tolist()))  # " at dawn": 5-gram Jaccard 0.78, within 2σ of 0.8
    [(0, 1), (0, 2), (1, 2)]
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
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

#: Rows per map task: large enough that Ray's per-task cost (~ms) is noise and that the shuffle
#: has few objects (maps × partitions: each one Ray restores separately when the store has spilled),
#: small enough that a task's signatures and shuffle pieces stay ~150 MB.
MAX_ROWS_PER_TASK = 100_000
#: Rows whose band entries one reducer sorts: (rows × bands) entries of 13 bytes and their sorts,
#: ~200 MB at 20 bands.
MAX_ROWS_PER_PARTITION = 200_000
#: Left rows per pull task: its candidates (~3 a row, with repeats, on web-like captions; 8 bytes
#: each) and their sort stay tens of MB; the sketches it attaches go out one slice at a time.
ROWS_PER_PULL = 2_000_000
#: Right rows per compare task: it holds the left sketches of their pairs (~0.4 a row on web-like
#: captions, 256 B each at 128 perms: ~100 MB).
ROWS_PER_COMPARE = 1_000_000
#: Captions one search can take: a candidate pair is coded as ``left * n + right`` in an int64.
MAX_ROWS = 3_000_000_000
#: Pairs compared per numpy step: (chunk × num_perm) uint16 twice and their comparison, ~40 MB at 128 perms.
VERIFY_CHUNK_PAIRS = 65_536


def verification_sketch(sig: np.ndarray) -> np.ndarray:
    """The low 16 bits of each signature value: what the verification compares to estimate a pair's Jaccard."""
    return sig.astype(np.uint16)


def _map_task(captions: pa.Array, first_row: int, params: MinHashParams, partitions: int, normalised: bool,
              wide: bool = False):
    """Normalise a slice of captions, sign it, and split its band hashes into ``partitions`` by bucket.

    Returns the slice's verification sketch (rows × num_perm uint16; a null or empty caption's row
    is zeros and never read), then one ``(band uint8, bucket uint64, row)`` piece per partition
    (row int32, or int64 when ``wide``: 2**31 rows or more). Null and empty captions (after
    normalisation) get no band entries: they match nobody.
    """
    num_perm = params.num_perm
    idx, sig = slice_signatures(captions, params, normalised)
    sketch = np.zeros((len(captions), num_perm), dtype=np.uint16)
    sketch[idx] = verification_sketch(sig)
    bands, rows_per_band = params.band_rows()
    bucket = band_hashes(sig, bands, rows_per_band).reshape(-1)
    del sig
    row = np.repeat((idx + first_row).astype(np.int64 if wide else np.int32), bands)
    band = np.tile(np.arange(bands, dtype=np.uint8), len(idx))
    part = (bucket % np.uint64(partitions)).astype(np.int64)
    pieces = [(band[o], bucket[o], row[o]) for o in _split_by(part, partitions)]
    del band, bucket, row, part
    _trim_heap()
    return (sketch, *pieces)


def _split_by(key: np.ndarray, k: int) -> list[np.ndarray]:
    """Positions of each key value 0 .. k-1 (k arrays, empty ones included), in their order."""
    order = np.argsort(key, kind="stable")
    return np.split(order, np.searchsorted(key[order], np.arange(1, k)))


@dataclass(frozen=True)
class _Layout:
    """How rows map to sketch slices and slices to the pull and compare groups."""

    n: int
    per_slice: int
    slices: int
    left_groups: int
    right_groups: int

    def left_group(self, row: np.ndarray) -> np.ndarray:
        return (row // self.per_slice) * self.left_groups // self.slices

    def right_group(self, row: np.ndarray) -> np.ndarray:
        return (row // self.per_slice) * self.right_groups // self.slices

    def slices_of_left_group(self, g: int) -> list[int]:
        return [k for k in range(self.slices) if k * self.left_groups // self.slices == g]


def _reduce_task(layout: _Layout, *pieces):
    """Candidate pairs (left < right) of rows sharing a (band, bucket) in this partition.

    Returns their count, then one array of pair codes (``left * n + right``, int64) per left group.
    """
    band = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.uint8)
    bucket = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.uint64)
    row = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, np.int64)
    del pieces
    left, right = bucket_pairs(band, bucket, row)
    del band, bucket, row
    code = left * layout.n + right
    out = [code[o] for o in _split_by(layout.left_group(left), layout.left_groups)]
    del left, right, code
    _trim_heap()
    return (sum(len(c) for c in out), *out)


def _pull_task(layout: _Layout, group: int, sketch_refs: list, *codes):
    """Deduplicated candidates whose left row is in this group, each with its left row's sketch.

    A generator: for each slice of the group in turn, reads the slice's sketch (once) and
    yields one ``(left, right, left rows' sketch)`` piece per right group, so that Ray stores
    each piece as it comes and this task never holds more than one slice's pieces.
    """
    import ray

    code = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    del codes
    left, right = code // layout.n, code % layout.n  # sorted by left
    del code
    rgroup = layout.right_group(right)
    for k in layout.slices_of_left_group(group):
        lo, hi = np.searchsorted(left, [k * layout.per_slice, (k + 1) * layout.per_slice])
        if hi > lo:
            sketch = ray.get(sketch_refs[k])
            rows = sketch[left[lo:hi] - k * layout.per_slice]
            del sketch
        else:
            rows = np.zeros((0, 0), np.uint16)
        for o in _split_by(rgroup[lo:hi], layout.right_groups):
            yield left[lo:hi][o], right[lo:hi][o], rows[o]
    del left, right, rgroup
    _trim_heap()


def _compare_task(layout: _Layout, threshold: float, sketch_refs: list, *pieces):
    """The pairs of this right group whose left sketch agrees with the right row's on ≥ ``threshold``.

    Reads each right slice's sketch once (only those its pairs need). Returns (left, right) of
    the verified pairs and how many pairs it compared.
    """
    import ray

    pieces = [p for p in pieces if len(p[0])]
    if not pieces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    left = np.concatenate([p[0] for p in pieces])
    right = np.concatenate([p[1] for p in pieces])
    left_sketch = np.concatenate([p[2] for p in pieces])
    del pieces
    agree = np.empty(len(left), dtype=np.float64)
    which = right // layout.per_slice
    order = np.argsort(which, kind="stable")
    bounds = np.flatnonzero(np.r_[True, which[order][1:] != which[order][:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        at = order[a:b]
        k = int(which[at[0]])
        sketch = ray.get(sketch_refs[k])
        for i in range(0, len(at), VERIFY_CHUNK_PAIRS):
            sel = at[i:i + VERIFY_CHUNK_PAIRS]
            same = left_sketch[sel] == sketch[right[sel] - k * layout.per_slice]
            agree[sel] = np.count_nonzero(same, axis=1) / same.shape[1]  # no float copy, as .mean() makes
        del sketch
    del left_sketch
    ok = agree >= threshold - 1e-12
    out = left[ok], right[ok], len(left)
    del left, right, agree
    _trim_heap()
    return out


def _trim_heap() -> None:
    """Hand the heap's freed pages back to the OS before a task's worker goes idle.

    glibc keeps freed memory for reuse (its mmap threshold rises to 32 MB after large arrays
    are freed, so later ones come from the heap), as does Arrow's allocator: without this an
    idle Ray worker keeps its last task's peak for the rest of the run.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, loaded once per worker; None where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@dataclass
class PairStats:
    """What the LSH found: for the manifest's info."""

    bands: int = 0
    rows: int = 0
    #: pairs sharing a bucket, summed over partitions (a pair whose bands collide in buckets of
    #: two partitions counts twice; within a partition each pair counts once)
    candidate_pairs: int = 0
    compared_pairs: int = 0  # distinct candidate pairs whose sketches were compared
    shuffle_seconds: float = 0.0  # signatures, band entries and their shuffle, to the candidates
    verify_seconds: float = 0.0  # the candidates joined with the sketches and compared
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

    b, r = params.band_rows()
    if stats is not None:
        stats.bands, stats.rows = b, r
    n = len(captions)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n > MAX_ROWS:
        raise ValueError(f"dedup_minhash takes at most {MAX_ROWS:,} captions in one run, got {n:,}: "
                         "a candidate pair is coded as left * n + right in an int64")
    if not ray.is_initialized():  # a library call outside a run: a local Ray, as ray.remote would start
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    warm_kernels()  # compiles once into numba's on-disk cache, which the workers then load
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # enough partitions that one reducer's sort stays small; the pairs do not depend on the count
    partitions = partitions or max(cpus, -(-n // MAX_ROWS_PER_PARTITION))
    per_task = max(1, min(MAX_ROWS_PER_TASK, -(-n // (2 * cpus))))
    t0 = time.perf_counter()
    map_fn = ray.remote(_map_task).options(num_returns=partitions + 1)
    # The captions go to the object store as Arrow slices (~ the text's bytes per row), one slice at
    # a time (no copy of the whole column here); the map tasks normalise them, so the driver builds
    # no Python str per row.
    outs = [map_fn.remote(_caption_slice(captions, s, per_task), s, params, partitions, normalised, n >= 2**31)
            for s in range(0, n, per_task)]
    sketch_refs = [o[0] for o in outs]
    slices = len(sketch_refs)
    layout = _Layout(n, per_task, slices, left_groups=max(1, min(slices, -(-n // ROWS_PER_PULL))),
                     right_groups=max(1, min(slices, max(cpus, -(-n // ROWS_PER_COMPARE)))))
    reduce_fn = ray.remote(_reduce_task).options(num_returns=layout.left_groups + 1)
    reduced = [reduce_fn.remote(layout, *[o[1 + p] for o in outs]) for p in range(partitions)]
    del outs  # each partition's band entries are freed once its reducer is done
    candidate_count = int(sum(ray.get([r[0] for r in reduced])))  # with repeats across partitions
    t1 = time.perf_counter()
    pulled = []
    for g in range(layout.left_groups):
        width = len(layout.slices_of_left_group(g)) * layout.right_groups
        pull_fn = ray.remote(_pull_task).options(num_returns=width)
        out = pull_fn.remote(layout, g, sketch_refs, *[r[1 + g] for r in reduced])
        pulled.append([out] if width == 1 else out)
    del reduced
    compare_fn = ray.remote(_compare_task)
    verified = ray.get([compare_fn.remote(layout, params.verify_threshold(), sketch_refs,
                                          *[piece for refs in pulled for piece in refs[rg::layout.right_groups]])
                        for rg in range(layout.right_groups)])
    del pulled, sketch_refs
    left = np.concatenate([v[0] for v in verified])
    right = np.concatenate([v[1] for v in verified])
    order = np.lexsort((right, left))
    left, right = left[order], right[order]
    if stats is not None:
        stats.candidate_pairs = candidate_count
        stats.compared_pairs = int(sum(v[2] for v in verified))
        stats.verified_pairs = int(len(left))
        stats.shuffle_seconds, stats.verify_seconds = t1 - t0, time.perf_counter() - t1
    return left, right


def _caption_slice(captions: list[str | None] | pa.Array | pa.ChunkedArray, start: int, length: int) -> pa.Array:
    """Rows ``start .. start + length`` of the captions as one Arrow string array (a copy of just those)."""
    if isinstance(captions, (pa.Array, pa.ChunkedArray)):
        part = captions.slice(start, length)
        return pa.concat_arrays(part.chunks) if isinstance(part, pa.ChunkedArray) else pa.concat_arrays([part])
    return pa.array(captions[start:start + length], pa.string())
