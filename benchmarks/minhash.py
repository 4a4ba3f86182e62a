"""Caption near-duplicate dedup: curate's MinHash LSH on Ray vs datasketch's MinHashLSH, same captions.

Generates ``-n`` web-like captions (3-30 words) in which about a fifth of the rows
belong to planted near-duplicate clusters of 2-5 rows — a base caption plus
variants with changed casing, punctuation, doubled spaces, a typo (two letters
swapped), one word dropped or one word added — whose truth is known, the rest
distinct. Then, in one run:

- **curate**: :func:`curate.dedup.minhash.near_duplicate_pairs` (the code path of
  ``use: dedup_minhash`` with ``match: caption``) on a local Ray with ``--cpus``
  CPUs, then connected components. Ray start-up is excluded (paid once per
  session); normalising, shingling, signatures, the bucket shuffle, verification
  and components are included.
- **datasketch** used the usual way: per caption a ``MinHash(num_perm, seed)``
  updated once per shingle (bytes, default SHA-1 hash), ``MinHashLSH.insert``,
  then ``query`` for every caption; the pairs it returns, then connected
  components. Same normalisation, shingles (char 5-grams), threshold and num_perm.
  datasketch is single-threaded; that is how it is used.

Metrics are *pairwise* clustering metrics: a pair of rows is a true pair if the
rows are in the same planted cluster and a predicted pair if they end in the
same connected component; precision = |true ∩ predicted| / |predicted|, recall
= |true ∩ predicted| / |true|, F1 their harmonic mean (counted from the cluster
contingency table, without listing the pairs). Peak memory is the peak RSS of
this process plus its child processes (Ray's workers, raylet and GCS), sampled
every 0.1 s with psutil, minus the RSS before the method started (shared
object-store pages may be counted once per process that maps them).

``--baseline-n M`` runs datasketch on the first M captions only (they hold whole
clusters) and *extrapolates* its throughput to ``-n``; the output says so.

Run::

    pip install datasketch psutil
    python benchmarks/minhash.py -n 100000 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import numpy as np

#: Rows per generation block; a block holds whole clusters, so any multiple of it is a clean subsample.
BLOCK = 10_000
DUP_FRACTION = 0.2  # share of rows in planted clusters (web crawls: 10-30 % near-duplicate alt-text)

_COMMON = ("a an the of in on at with and for from by to photo image picture view stock vector "
           "illustration close up portrait background isolated white black red blue green old new "
           "small large beautiful young man woman child dog cat house street city beach sea sky "
           "mountain river tree flower car food table room window wall").split()


def _vocabulary(rng: random.Random, size: int = 30_000) -> list[str]:
    syll = ["ka", "lo", "mi", "ren", "sa", "to", "vi", "an", "el", "or", "us", "ber", "gan", "dor", "te",
            "qui", "zo", "ma", "li", "ne", "pra", "sto", "wen", "yal"]
    # sorted: a set's order changes with PYTHONHASHSEED, and the captions must not
    return sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(size)})


def _caption(rng: random.Random, vocab: list[str]) -> str:
    n = rng.choice([3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 24, 30])
    words = [rng.choice(_COMMON) if rng.random() < 0.35 else rng.choice(vocab) for _ in range(n)]
    return " ".join(words).capitalize()


def _variant(base: str, rng: random.Random, vocab: list[str]) -> str:
    words = base.split()
    kind = rng.choice(["case", "punct", "space", "typo", "drop", "add"])
    if kind == "case":
        return base.upper() if rng.random() < 0.5 else base.lower()
    if kind == "punct":
        return base + rng.choice(["!", ".", " ...", " -", "?"])
    if kind == "space":
        i = rng.randrange(len(words))
        return " ".join(words[:i] + ["", *words[i:]])
    if kind == "typo":
        i = max(range(len(words)), key=lambda j: len(words[j]))
        w = words[i]
        if len(w) > 3:
            k = rng.randrange(len(w) - 1)
            words[i] = w[:k] + w[k + 1] + w[k] + w[k + 2:]
        return " ".join(words)
    if kind == "drop" and len(words) > 3:
        del words[rng.randrange(len(words))]
        return " ".join(words)
    words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
    return " ".join(words)


def make_captions(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Captions and their true cluster ids; every BLOCK rows hold whole clusters, shuffled within."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    captions: list[str] = []
    truth: list[int] = []
    cluster = 0
    while len(captions) < n:
        block_n = min(BLOCK, n - len(captions))
        block: list[tuple[str, int]] = []
        while len(block) < block_n:
            base = _caption(rng, vocab)
            size = rng.randint(2, 5) if rng.random() < DUP_FRACTION / 3.5 else 1
            size = min(size, block_n - len(block))
            block.append((base, cluster))
            block += [(_variant(base, rng, vocab), cluster) for _ in range(size - 1)]
            cluster += 1
        rng.shuffle(block)
        captions += [c for c, _ in block]
        truth += [t for _, t in block]
    return captions, np.array(truth, dtype=np.int64)


def pair_metrics(truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pairwise precision / recall / F1 of a clustering against the truth."""
    def pairs(counts: np.ndarray) -> int:
        return int((counts * (counts - 1) // 2).sum())

    _, joint = np.unique(truth * (int(labels.max()) + 1) + labels, return_counts=True)
    tp = pairs(joint)
    predicted = pairs(np.unique(labels, return_counts=True)[1])
    true = pairs(np.unique(truth, return_counts=True)[1])
    p = tp / predicted if predicted else 1.0
    r = tp / true if true else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "true_pairs": true, "predicted_pairs": predicted}


class PeakRSS:
    """Peak resident memory of this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a worker exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def run_curate(captions: list[str], threshold: float, num_perm: int,
               verify: bool = True) -> tuple[np.ndarray, float, float]:
    from curate.dedup.clusters import connected_components
    from curate.dedup.minhash import MinHashParams, near_duplicate_pairs

    params = MinHashParams(threshold=threshold, num_perm=num_perm, verify=verify)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        left, right = near_duplicate_pairs(captions, params)
        labels = connected_components(len(captions), left, right)
        seconds = time.perf_counter() - t0
    return labels, seconds, mem.mib


def run_datasketch(captions: list[str], threshold: float, num_perm: int) -> tuple[np.ndarray, float, float]:
    from datasketch import MinHash, MinHashLSH

    from curate.dedup.clusters import connected_components
    from curate.dedup.minhash import char_shingles
    from curate.stages.dedup_exact import normalise_caption

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        sketches: dict[int, MinHash] = {}
        for i, c in enumerate(captions):
            text = normalise_caption(c)
            if not text:
                continue
            m = MinHash(num_perm=num_perm, seed=1)
            for s in char_shingles(text, 5):
                m.update(s.encode("utf-8"))
            lsh.insert(i, m)
            sketches[i] = m
        left, right = [], []
        for i, m in sketches.items():
            for j in lsh.query(m):
                if j > i:
                    left.append(i)
                    right.append(j)
        labels = connected_components(len(captions), np.array(left, np.int64), np.array(right, np.int64))
        seconds = time.perf_counter() - t0
    return labels, seconds, mem.mib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--captions", type=int, default=1_000_000)
    p.add_argument("--baseline-n", type=int, default=None,
                   help="run datasketch on the first M captions only and extrapolate its throughput")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    import ray

    t0 = time.perf_counter()
    captions, truth = make_captions(a.captions, a.seed)
    print(f"generated {len(captions):,} captions, {len(np.unique(truth)):,} true clusters "
          f"in {time.perf_counter() - t0:.1f}s")
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    c_labels, c_s, c_mem = run_curate(captions, a.threshold, a.num_perm)
    c_m = pair_metrics(truth, c_labels)
    u_labels, u_s, u_mem = run_curate(captions, a.threshold, a.num_perm, verify=False)
    u_m = pair_metrics(truth, u_labels)
    ray.shutdown()

    m = a.captions if a.baseline_n is None else min(a.captions, -(-a.baseline_n // BLOCK) * BLOCK)
    d_labels, d_s, d_mem = run_datasketch(captions[:m], a.threshold, a.num_perm)
    d_m = pair_metrics(truth[:m], d_labels)
    c_rate, d_rate = len(captions) / c_s, m / d_s

    print(f"\n{'method':<34}{'rows':>10}{'wall s':>9}{'rows/s':>10}{'peak MiB':>10}"
          f"{'precision':>10}{'recall':>8}{'F1':>7}")
    print(f"{'curate dedup_minhash (' + str(a.cpus) + ' CPUs)':<34}{len(captions):>10,}{c_s:>9.1f}{c_rate:>10,.0f}"
          f"{c_mem:>10.0f}{c_m['precision']:>10.4f}{c_m['recall']:>8.4f}{c_m['f1']:>7.4f}")
    print(f"{'  same, verify: false':<34}{len(captions):>10,}{u_s:>9.1f}{len(captions) / u_s:>10,.0f}"
          f"{u_mem:>10.0f}{u_m['precision']:>10.4f}{u_m['recall']:>8.4f}{u_m['f1']:>7.4f}")
    print(f"{'datasketch MinHashLSH (1 thread)':<34}{m:>10,}{d_s:>9.1f}{d_rate:>10,.0f}"
          f"{d_mem:>10.0f}{d_m['precision']:>10.4f}{d_m['recall']:>8.4f}{d_m['f1']:>7.4f}")
    if m < len(captions):
        print(f"NOTE: datasketch ran on the first {m:,} of {len(captions):,} captions (--baseline-n); its "
              f"throughput is EXTRAPOLATED to the full size (≈ {len(captions) / d_rate:,.0f} s) and its "
              "metrics are over that subsample")
    print(f"throughput ratio curate/datasketch: {c_rate / d_rate:.1f}x verified, "
          f"{len(captions) / u_s / d_rate:.1f}x unverified  (goal >= 10x at equal or better F1)")
    print("verify: true (the default) drops candidates whose estimated Jaccard is > 2 standard errors below "
          "the threshold; datasketch and verify: false keep every pair that shares a band bucket")
    print("metrics: pairwise (same planted cluster vs same connected component); "
          "peak MiB: RSS of this process + children (psutil, 0.1 s), above the level before")
    if a.json:
        a.json.write_text(json.dumps({
            "captions": len(captions), "baseline_captions": m, "cpus": a.cpus, "threshold": a.threshold,
            "num_perm": a.num_perm, "curate": {"seconds": c_s, "rows_per_s": c_rate, "peak_mib": c_mem, **c_m},
            "curate_unverified": {"seconds": u_s, "rows_per_s": len(captions) / u_s, "peak_mib": u_mem, **u_m},
            "datasketch": {"seconds": d_s, "rows_per_s": d_rate, "peak_mib": d_mem, **d_m,
                           "extrapolated": m < len(captions)},
            "ratio": c_rate / d_rate}, indent=1))


if __name__ == "__main__":
    main()
