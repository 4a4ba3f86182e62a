"""SemDeDup at scale: curate's k-means + within-cluster cosine on Ray vs exact brute force on a subsample.

Generates ``-n`` synthetic unit embeddings of dimension ``--dim`` shaped like
CLIP space: ``--topics`` random topic centres, each row a centre plus Gaussian
noise (cosine to its centre ~0.6), and ``--planted`` (default 10 %) of the rows
are near-copies of another row of the same block of ``BLOCK`` rows at cosine
0.98-0.999 (about 60 % of them above the default threshold 0.99). Then:

- **curate**: :meth:`curate.dedup.semantic.SemanticPairs.pairs_of_chunks` — the
  code path of ``use: dedup_semantic`` (k = ⌈√n⌉, k-means++ on a sample, Lloyd
  steps, assignment and the pairwise step as Ray tasks) — on a local Ray with
  ``--cpus`` CPUs (Ray start-up excluded; putting the chunks in the object store
  included).
- **exact**: every pair of the first ``--sub`` rows (whole blocks) with cosine ≥
  1 - ε, by blocked matrix products in one process. Quality = recall of curate's
  pairs (from the full run) among those rows against this exact set; precision
  is 1 by construction (every reported pair is verified) and checked.

Peak memory: the peak RSS of this process plus its children (Ray's workers,
raylet, GCS; object-store pages may count once per process mapping them),
sampled every 0.1 s, minus the RSS before the method started (the generated
matrix, ~2 GB at 1M × 512, is held before).

Run::

    python benchmarks/semantic.py -n 1000000 --dim 512 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from phash import PeakRSS  # noqa: E402

BLOCK = 20_000


def synthetic(n: int, dim: int, topics: int, planted: float, seed: int = 0):
    """(n × dim float32 unit rows, planted left rows, planted right rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    lefts, rights = [], []
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        block = centres[rng.integers(0, topics, m)] + rng.standard_normal((m, dim), np.float32) * np.float32(
            1.3 / np.sqrt(dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        k = int(m * planted)
        pick = rng.permutation(m)[:2 * k]
        left, right = pick[:k], pick[k:]
        cos = rng.uniform(0.98, 0.999, k).astype(np.float32)[:, None]
        r = rng.standard_normal((k, dim)).astype(np.float32)
        v = block[left]
        r -= np.sum(r * v, axis=1, keepdims=True) * v
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        block[right] = cos * v + np.sqrt(1 - cos**2) * r
        x[s:s + m] = block
        lefts.append(s + left)
        rights.append(s + right)
    return x, np.concatenate(lefts), np.concatenate(rights)


def exact_pairs(x: np.ndarray, threshold: float, block: int = 2048) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for s in range(0, len(x), block):
        sim = x[s:s + block] @ x.T
        i, j = np.nonzero(sim >= np.float32(threshold))
        keep = j > i + s
        out.update(zip((i[keep] + s).tolist(), j[keep].tolist(), strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--topics", type=int, default=2000)
    ap.add_argument("--planted", type=float, default=0.1)
    ap.add_argument("--epsilon", type=float, default=0.01)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--sub", type=int, default=40_000)
    a = ap.parse_args()
    import ray

    from curate.dedup.semantic import CHUNK_ROWS, SemanticPairs

    t = time.perf_counter()
    x, pl, pr = synthetic(a.n, a.dim, a.topics, a.planted)
    gen = time.perf_counter() - t
    thr = 1.0 - a.epsilon
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    finder = SemanticPairs(epsilon=a.epsilon)
    with PeakRSS() as mem:
        t = time.perf_counter()
        left, right, stats = finder.pairs_of_chunks((x[s:s + CHUNK_ROWS] for s in range(0, a.n, CHUNK_ROWS)),
                                                    use_ray=True)
        secs = time.perf_counter() - t
    ray.shutdown()
    got = set(zip(left.tolist(), right.tolist(), strict=True))
    sims = np.einsum("ij,ij->i", x[pl], x[pr])
    planted = {(min(int(p), int(q)), max(int(p), int(q))) for p, q, c in zip(pl, pr, sims, strict=True) if c >= thr}
    t = time.perf_counter()
    exact = exact_pairs(x[:a.sub], thr)
    exact_secs = time.perf_counter() - t
    got_sub = {p for p in got if p[1] < a.sub}
    print(json.dumps({
        "n": a.n, "dim": a.dim, "epsilon": a.epsilon, "generate_seconds": gen,
        "curate": {"seconds": secs, "peak_mib": mem.mib, "pairs": len(got), "kmeans_k": stats.clusters,
                   "kmeans_iterations": stats.kmeans_iterations, "largest_cluster": stats.largest_cluster,
                   "split_clusters": stats.split_clusters, "compared_pairs": stats.compared_pairs,
                   "ray_tasks": stats.tasks,
                   "planted_above_threshold": len(planted),
                   "planted_recall": len(planted & got) / max(1, len(planted))},
        "exact_subsample": {"rows": a.sub, "seconds": exact_secs, "extrapolated_seconds_n": exact_secs * (a.n / a.sub) ** 2,
                            "pairs": len(exact), "recall": len(exact & got_sub) / max(1, len(exact)),
                            "precision": len(exact & got_sub) / max(1, len(got_sub))},
    }, indent=2))


if __name__ == "__main__":
    main()
