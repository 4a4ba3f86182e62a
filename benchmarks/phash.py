"""pHash near-duplicate search: curate's multi-index hashing on Ray vs brute force and faiss.

Generates ``-n`` synthetic 64-bit hashes: uniformly random (the hard case for
any index: no structure to exploit), of which ``--planted`` (default 10 %) are
copies of an earlier hash with 0-13 random bits flipped, within blocks of
``BLOCK`` rows (so the first ``--sub`` rows hold whole planted pairs). Then:

- **curate**: :func:`curate.dedup.phash.near_value_pairs` — the code path of
  ``use: dedup_phash`` — on a local Ray with ``--cpus`` CPUs (Ray start-up
  excluded). Recall is checked against every planted pair within the distance,
  and against brute force on the first ``--sub`` rows (all pairs there, planted
  or by chance).
- **brute force**: all pairs of the first ``--sub`` rows (numpy xor + popcount,
  row blocks), one process; its time is *extrapolated* to n as (n/sub)².
- **faiss** (if ``import faiss`` works): ``IndexBinaryFlat.range_search`` (brute
  force in C++, SIMD popcount) and ``IndexBinaryMultiHash`` (nhash=3 tables of
  21 bits, nflip=3: exact at distance 10) over all n hashes, queried with the
  first ``--faiss-queries`` rows; the time of n queries is *extrapolated*
  linearly. faiss uses ``--cpus`` OpenMP threads.

Peak memory: the peak RSS of this process plus its children (Ray's workers,
raylet, GCS), sampled every 0.1 s with psutil, minus the RSS before the method
started (``peak_mib``: an object-store page counts once per process that maps it);
for curate also ``memory_mib``, the physical memory (Σ PSS, the store once).

Run::

    pip install psutil faiss-cpu   # faiss optional
    python benchmarks/phash.py -n 1000000 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the shared harness, as `python benchmarks/X.py` runs
from _harness import PeakRSS  # noqa: E402

BLOCK = 20_000


def synthetic(n: int, planted: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes as uint64, planted left rows, planted right rows): copies flip 0-13 bits of an earlier row."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    lefts, rights = [], []
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        k = int(m * planted)
        pick = s + rng.permutation(m)[:2 * k]  # disjoint (original, copy) pairs inside the block
        left, right = pick[:k], pick[k:]
        flips = rng.integers(0, 14, k)
        bits = rng.random((k, 64)).argsort(axis=1)  # a random permutation of the bits per copy
        mask = np.zeros(k, np.uint64)
        for b in range(13):
            mask |= np.where(b < flips, np.uint64(1) << bits[:, b].astype(np.uint64), np.uint64(0))
        h[right] = h[left] ^ mask
        lefts.append(left)
        rights.append(right)
    return h, np.concatenate(lefts), np.concatenate(rights)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def brute_force(h: np.ndarray, d: int, block: int = 2000) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for s in range(0, h.size, block):
        dist = hamming(h[s:s + block, None], h[None, :])
        i, j = np.nonzero(dist <= d)
        keep = j > i + s
        out.update(zip((i[keep] + s).tolist(), j[keep].tolist(), strict=True))
    return out


def run_curate(h: np.ndarray, d: int, tasks: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Row pairs within d bits: distinct hashes searched on Ray, then rows of one hash paired too."""
    from curate.dedup.phash import SearchStats, distinct_hashes, expand_pairs, near_value_pairs

    stats = SearchStats()
    values, inverse = distinct_hashes(h.view(np.int64))
    vl, vr = near_value_pairs(values, d, use_ray=True, tasks=tasks, stats=stats)
    left, right = expand_pairs(inverse, vl, vr)
    return left, right, {"distinct": int(values.size), "bands": stats.describe(), "tasks": stats.tasks,
                         "candidates": stats.candidates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("-d", "--max-distance", type=int, default=10)
    ap.add_argument("--planted", type=float, default=0.1)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--sub", type=int, default=20_000, help="rows brute force compares (all pairs)")
    ap.add_argument("--faiss-queries", type=int, default=5_000)
    ap.add_argument("--skip-faiss", action="store_true")
    a = ap.parse_args()
    import ray

    h, pl, pr = synthetic(a.n, a.planted)
    planted = {(int(x), int(y)) for x, y in zip(np.minimum(pl, pr), np.maximum(pl, pr), strict=True)
               if hamming(h[x], h[y]) <= a.max_distance}
    results: dict[str, dict] = {}

    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    with PeakRSS(memory=True) as mem:
        t = time.perf_counter()
        left, right, info = run_curate(h, a.max_distance, a.tasks)
        secs = time.perf_counter() - t
    ray.shutdown()
    got = set(zip(left.tolist(), right.tolist(), strict=True))
    sub = a.sub
    t = time.perf_counter()
    exact_sub = brute_force(h[:sub], a.max_distance)
    brute_secs = time.perf_counter() - t
    got_sub = {p for p in got if p[1] < sub}
    results["curate"] = {
        "n": a.n, "seconds": secs, "peak_mib": mem.mib, "memory_mib": mem.total_mib, **info, "pairs": len(got),
        "planted_within_distance": len(planted), "planted_recall": len(planted & got) / max(1, len(planted)),
        "subsample_rows": sub, "subsample_exact_pairs": len(exact_sub),
        "subsample_recall": len(exact_sub & got_sub) / max(1, len(exact_sub)),
        "subsample_extra_pairs": len(got_sub - exact_sub)}
    results["brute_force_numpy"] = {"measured_rows": sub, "measured_seconds": brute_secs,
                                    "extrapolated_seconds": brute_secs * (a.n / sub) ** 2, "extrapolated": True}
    if not a.skip_faiss:
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            faiss.omp_set_num_threads(a.cpus)
            codes = np.ascontiguousarray(h).view(np.uint8).reshape(a.n, 8)
            q = codes[:a.faiss_queries]
            for name, make in [("faiss_IndexBinaryFlat", lambda: faiss.IndexBinaryFlat(64)),
                               ("faiss_IndexBinaryMultiHash_3x21_nflip3", lambda: _multihash(faiss))]:
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    index = make()
                    index.add(codes)
                    built = time.perf_counter() - t
                    t = time.perf_counter()
                    lims, _, ids = index.range_search(q, a.max_distance + 1)  # faiss: distance < radius
                    qsecs = time.perf_counter() - t
                found = {(min(i, int(j)), max(i, int(j))) for i in range(len(q))
                         for j in ids[lims[i]:lims[i + 1]] if int(j) != i}
                want = {p for p in got if p[0] < len(q) or p[1] < len(q)}
                results[name] = {"build_seconds": built, "queries": len(q), "query_seconds": qsecs,
                                 "extrapolated_seconds": built + qsecs * a.n / len(q), "extrapolated": True,
                                 "peak_mib": mem.mib, "agrees_with_curate_on_queried_rows": found == want}
                del index
    print(json.dumps(results, indent=2))


def _multihash(faiss):
    index = faiss.IndexBinaryMultiHash(64, 3, 21)
    index.nflip = 3  # 3 tables × (3 + 1) > 10: exact at distance 10
    return index


if __name__ == "__main__":
    main()
