"""Caption near-duplicate dedup: curate vs rensa vs datasketch (two ways), same captions, same truth.

Generates ``-n`` web-like captions (3-30 words, a third common English words, the
rest drawn from a 30,000-word synthetic vocabulary) in which about a fifth of the
rows belong to planted near-duplicate clusters of 2-5 rows: a base caption plus
variants with changed casing, punctuation, doubled spaces, a typo (two letters
swapped), one word dropped or one word added. The truth is known; the rest of
the rows are distinct. Nothing in it depends on curate's hashing or banding.

Every method gets the same normalisation (:func:`curate.text.normalise_caption`),
the same shingles (char 5-grams), ``--threshold`` (0.7) and ``--num-perm`` (128):

- **curate**: :func:`curate.dedup.minhash.near_duplicate_pairs` (the code path of
  ``use: dedup_minhash`` with ``match: caption``) on a local Ray with ``--cpus``
  CPUs, then the stage's clusters (in caption order each row joins the first kept
  row it matches: ``leader_labels``). Ray start-up is excluded (paid once per
  session; a run on 2,000 captions first starts the workers and loads the compiled
  kernels); normalising, shingling, signatures, the bucket shuffle, verification
  and clustering are included.
- **rensa** (Rust MinHash, one thread: ``RAYON_NUM_THREADS=1``) used as its README
  shows: ``RMinHashDeduplicator(threshold, num_perm, use_lsh=True).add_pairs`` with
  each caption's shingles, which keeps a caption unless it matches one already kept;
  then ``get_duplicate_sets`` for the dropped rows, to know which kept row each
  duplicates (needed for the clustering metrics), then connected components.
- **datasketch, shingle by shingle**: per caption a ``MinHash(num_perm, seed=1)``
  updated once per shingle (bytes, default SHA-1), ``MinHashLSH.insert``, then
  ``query`` for every caption; its pairs, then connected components.
- **datasketch, update_batch**: the same with one ``MinHash.update_batch`` call a caption.

Metrics are *pairwise* clustering metrics: a pair of rows is a true pair if the
rows are in the same planted cluster and a predicted pair if they end in the
same predicted cluster (curate's clusters, the others' connected components);
precision = |true ∩ predicted| / |predicted|, recall = |true ∩ predicted| / |true|,
F1 their harmonic mean. Memory is sampled every 0.1 s over this process and its
children (Ray's workers, raylet and GCS), above the level before the method started,
two ways: *memory* is the physical memory (Σ PSS from ``/proc/*/smaps_rollup``, the
object store counted once, even where no process maps it any more), *RSS sum* is Σ RSS
(an object-store page counts once per process that maps it: an upper bound).

``--object-store-mb`` caps Ray's object store (default: Ray's, 30 % of RAM); beyond
the cap Ray spills objects to disk (``/tmp/ray``) and brings them back when a task
reads them. curate's map outputs (sketches, band entries) and the verification's
pieces all live there, so with a cap curate's memory no longer grows with n.

``--baseline-n M`` runs the two datasketch columns on the first M captions only
(they hold whole clusters) and *extrapolates* their throughput to ``-n``; the
output says so. ``--skip`` leaves methods out (e.g. ``--skip datasketch`` at 10M).

Run (rensa and datasketch are in the ``test`` extras; psutil too)::

    python benchmarks/minhash.py -n 100000 --cpus 2
    python benchmarks/minhash.py -n 1000000 --cpus 2 --baseline-n 50000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the shared harness, as `python benchmarks/X.py` runs
from _harness import PeakRSS  # noqa: E402

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


def run_curate(captions: list[str], threshold: float, num_perm: int,
               verify: bool = True) -> tuple[np.ndarray, float, tuple[float, float]]:
    from curate.dedup.minhash import MinHashParams, warm_kernels
    from curate.dedup.minhash_kernels import leader_labels
    from curate.dedup.minhash_lsh import PairStats, near_duplicate_pairs

    params = MinHashParams(threshold=threshold, num_perm=num_perm, verify=verify)
    warm_kernels()  # a first run compiles into numba's on-disk cache; later runs (and workers) load it
    near_duplicate_pairs(captions[:2000], params)  # starts Ray's workers (part of Ray start-up, excluded)
    with PeakRSS(memory=True) as mem:
        t0 = time.perf_counter()
        stats = PairStats()
        left, right = near_duplicate_pairs(captions, params, stats=stats)
        # the stage's clusters: rows in key order (here, caption order), each joins the first kept row it matches
        labels = leader_labels(len(captions), left, right, np.arange(len(captions)))
        seconds = time.perf_counter() - t0
    print(f"curate: {stats.candidate_pairs:,} candidate pairs (with repeats), {stats.compared_pairs:,} compared, "
          f"{stats.verified_pairs:,} verified; signatures and shuffle {stats.shuffle_seconds:.1f} s, "
          f"verification {stats.verify_seconds:.1f} s", flush=True)
    growth = ", ".join(f"{k} {v:+.0f}" for k, v in list(mem.growth_by_name().items())[:7])
    print(f"curate's memory peak above the level before, MiB (private PSS by process name, the object store): "
          f"{growth}", flush=True)
    return labels, seconds, (mem.mib, mem.total_mib)


def run_rensa(captions: list[str], threshold: float, num_perm: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    from rensa import RMinHashDeduplicator

    from curate.dedup.clusters import connected_components
    from curate.dedup.minhash import char_shingles
    from curate.text import normalise_caption

    with PeakRSS(memory=True) as mem:
        t0 = time.perf_counter()
        rows = [(i, normalise_caption(c)) for i, c in enumerate(captions)]
        shingles = [(str(i), char_shingles(t, 5)) for i, t in rows if t]
        dedup = RMinHashDeduplicator(threshold=threshold, num_perm=num_perm, use_lsh=True)
        keep = dedup.add_pairs(shingles)
        dropped = [s for s, k in zip(shingles, keep, strict=True) if not k]
        sets = dedup.get_duplicate_sets([tokens for _, tokens in dropped])
        left = np.array([int(k) for (k, _), dup in zip(dropped, sets, strict=True) if dup], np.int64)
        right = np.array([min(int(d) for d in dup) for dup in sets if dup], np.int64)
        labels = connected_components(len(captions), left, right)
        seconds = time.perf_counter() - t0
    return labels, seconds, (mem.mib, mem.total_mib)


def run_datasketch(captions: list[str], threshold: float, num_perm: int,
                   batch: bool = False) -> tuple[np.ndarray, float, tuple[float, float]]:
    from datasketch import MinHash, MinHashLSH

    from curate.dedup.clusters import connected_components
    from curate.dedup.minhash import char_shingles
    from curate.text import normalise_caption

    with PeakRSS(memory=True) as mem:
        t0 = time.perf_counter()
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        sketches: dict[int, MinHash] = {}
        for i, c in enumerate(captions):
            text = normalise_caption(c)
            if not text:
                continue
            m = MinHash(num_perm=num_perm, seed=1)
            if batch:
                m.update_batch([s.encode("utf-8") for s in char_shingles(text, 5)])
            else:
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
    return labels, seconds, (mem.mib, mem.total_mib)


METHODS = ("curate", "rensa", "datasketch", "datasketch_batch")
LABELS = {"curate": "curate dedup_minhash ({cpus} CPUs)", "rensa": "rensa RMinHashDeduplicator (1 thread)",
          "datasketch": "datasketch, shingle by shingle", "datasketch_batch": "datasketch, update_batch"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--captions", type=int, default=100_000)
    p.add_argument("--baseline-n", type=int, default=None,
                   help="run the datasketch columns on the first M captions only and extrapolate their throughput")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=METHODS)
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="cap Ray's object store (MiB); objects beyond it spill to disk")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"  # rensa: one thread, before it is first imported

    t0 = time.perf_counter()
    captions, truth = make_captions(a.captions, a.seed)
    print(f"generated {len(captions):,} captions, {len(np.unique(truth)):,} true clusters "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    results: dict[str, dict] = {}
    if "curate" not in a.skip:
        import ray

        store = a.object_store_mb * 2**20 if a.object_store_mb else None
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, object_store_memory=store)
        labels, secs, mib = run_curate(captions, a.threshold, a.num_perm)
        ray.shutdown()
        results["curate"] = {"rows": len(captions), "seconds": secs, "rss_sum_mib": mib[0], "memory_mib": mib[1], **pair_metrics(truth, labels)}
        print("curate done", flush=True)
    if "rensa" not in a.skip:
        labels, secs, mib = run_rensa(captions, a.threshold, a.num_perm)
        results["rensa"] = {"rows": len(captions), "seconds": secs, "rss_sum_mib": mib[0], "memory_mib": mib[1], **pair_metrics(truth, labels)}
        print("rensa done", flush=True)
    m = a.captions if a.baseline_n is None else min(a.captions, -(-a.baseline_n // BLOCK) * BLOCK)
    for name, batch in (("datasketch", False), ("datasketch_batch", True)):
        if name not in a.skip:
            labels, secs, mib = run_datasketch(captions[:m], a.threshold, a.num_perm, batch=batch)
            results[name] = {"rows": m, "seconds": secs, "rss_sum_mib": mib[0], "memory_mib": mib[1], "extrapolated": m < len(captions),
                             **pair_metrics(truth[:m], labels)}
            print(f"{name} done", flush=True)
    for r in results.values():
        r["captions_per_s"] = r["rows"] / r["seconds"]

    names = [k for k in METHODS if k in results]
    rows = [("rows", lambda r: f"{r['rows']:,}"), ("wall s", lambda r: f"{r['seconds']:.1f}"),
            ("captions/s", lambda r: f"{r['captions_per_s']:,.0f}"), ("memory MiB", lambda r: f"{r['memory_mib']:.0f}"), ("RSS sum MiB", lambda r: f"{r['rss_sum_mib']:.0f}"),
            ("precision", lambda r: f"{r['precision']:.4f}"), ("recall", lambda r: f"{r['recall']:.4f}"),
            ("F1", lambda r: f"{r['f1']:.4f}")]
    width = 40
    print("\n" + f"{'':<12}" + "".join(f"{LABELS[k].format(cpus=a.cpus):>{width}}" for k in names))
    for label, fmt in rows:
        print(f"{label:<12}" + "".join(f"{fmt(results[k]):>{width}}" for k in names))
    others = [k for k in names if k != "curate"]
    if "curate" in results and others:
        best = max(others, key=lambda k: results[k]["captions_per_s"])
        c, o = results["curate"], results[best]
        print(f"\ncurate / fastest alternative ({LABELS[best]}): {c['captions_per_s'] / o['captions_per_s']:.2f}x "
              f"captions/s, F1 {c['f1']:.4f} vs {o['f1']:.4f}  (goal: >= 2x rensa at F1 >= rensa's)")
    if any(r.get("extrapolated") for r in results.values()):
        print(f"NOTE: datasketch columns ran on the first {m:,} of {len(captions):,} captions (--baseline-n); "
              "their captions/s is measured there (EXTRAPOLATED to the full size) and their metrics are "
              "over that subsample")
    print(f"threshold {a.threshold}, {a.num_perm} permutations, char 5-grams; metrics: pairwise (same planted "
          "cluster vs same predicted cluster); memory: peak physical memory (PSS, the object store once) of "
          "this process + children, RSS sum: peak of their RSS summed (0.1 s samples), both above the level "
          "before" + (f"; Ray's object store capped at {a.object_store_mb} MiB" if a.object_store_mb else ""))
    if a.json:
        a.json.write_text(json.dumps({"captions": len(captions), "cpus": a.cpus, "threshold": a.threshold,
                                      "object_store_mb": a.object_store_mb,
                                      "num_perm": a.num_perm, **results}, indent=1))


if __name__ == "__main__":
    main()
