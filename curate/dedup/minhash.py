"""MinHash LSH over captions, compiled and distributed on Ray: signatures → band buckets → pairs.

What it computes is datasketch 2.x's ``MinHash`` (scheme ``affine32``, the 2.x
default): each shingle's 32-bit hash is pre-mixed with the MurmurHash3 32-bit
finaliser and permuted by ``a * h + b mod 2**32`` with the ``(a, b)`` that
``numpy.random.RandomState(seed)`` draws for datasketch, and a signature is the
per-permutation minimum. Only two things differ from calling
``MinHash.bulk``/``update_batch``, both for speed:

- the shingle hash: datasketch's default is SHA-1 of each shingle's bytes, one
  Python call per shingle (~90 per caption). Here a shingle's hash is a
  multilinear hash of its Unicode code points (random odd 64-bit constants,
  MurmurHash3's 64-bit finaliser, top 32 bits). ``datasketch.MinHash(hashfunc=shingle_hash)``
  given the same shingles gives the same signature bit for bit (a test checks);
- the loop over a caption's shingles and the 128 permutations is one compiled
  kernel (numba, ``nogil``; LLVM vectorises the permutation loop): about 3.5 µs a
  caption on one core, 9x the numpy formulation kept as the reference
  (:func:`signatures_from_hashes`). Signatures depend on nothing but the text,
  ``num_perm`` and ``seed``: the same on every worker, process and run.

Bands × rows are chosen for the threshold by datasketch's ``MinHashLSH`` rule
(:func:`optimal_bands`), weighting misses 9:1 since every candidate is verified
(:data:`VERIFIED_FN_WEIGHT`). The distributed search over band buckets (map tasks,
a hash shuffle of band entries, then the candidates joined with the verification
sketches) is :mod:`curate.dedup.minhash_lsh`; this module is the algorithm, with no
Ray in it.

Example::

    >>> params = MinHashParams(threshold=0.8)
    >>> sig = signatures(["a photo of a red dog on the beach", "a photo of a red dog on the beach at dawn"], params)
    >>> round(float((sig[0] == sig[1]).mean()), 2)  # estimates their 5-gram Jaccard, 0.78
    0.75
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from curate.text import normalise_caption

Shingle = Literal["char", "word"]

#: Shingle hashes per chunk in the numpy reference (:func:`signatures_from_hashes`): (chunk × num_perm)
#: uint32 = 512 KB at 128 perms stays in L2 cache.
PERMUTE_CHUNK_SHINGLES = 1024
#: Buckets up to this size emit every pair; larger ones (thousands of rows sharing a boilerplate
#: caption) emit a star around their first row plus a chain, so pairs stay O(rows), not O(rows²).
ALL_PAIRS_MAX_BUCKET = 64

#: Weight of the false-negative area when choosing bands × rows for verified candidates (false
#: positives 1 - this). datasketch's equal weights leave a pair *at* the threshold a candidate
#: only 44 % of the time at t = 0.7 (14 × 9; 87 % at J = 0.8): the banding, not the verification,
#: lost the recall. A false positive of the banding costs one sketch comparison and is then
#: rejected, so curate weights misses 9:1: t = 0.7 → 20 × 6 (a pair at J = 0.7 is a candidate
#: 92 % of the time), t = 0.8 → 14 × 9, t = 0.9 → 8 × 16. On benchmarks/minhash.py's 100k
#: captions at t = 0.7 pairwise F1 goes from 0.930 to 0.968, precision staying ≥ 0.999.
VERIFIED_FN_WEIGHT = 0.9

_U64 = np.uint64
_SEED_CONSTANTS = 0x5EED_C0DE  # seeds the shingle-hash constants; fixed so hashes are stable across runs
_MAX_NGRAM = 64


# ------------------------------------------------------------------ hashing primitives


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit)."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: datasketch 2.x's pre-mix of every input hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _constants(count: int, salt: int) -> np.ndarray:
    """Random odd 64-bit multipliers for the multilinear shingle and band hashes."""
    gen = np.random.default_rng([_SEED_CONSTANTS, salt])
    return gen.integers(0, 1 << 63, size=count, dtype=np.uint64) * _U64(2) + _U64(1)


_CHAR_C = _constants(_MAX_NGRAM, 1)
_WORD_C = _constants(_MAX_NGRAM * _MAX_NGRAM, 2)  # one set per word n-gram length
_BAND_C = _constants(4096, 3)


def shingle_hash(shingle: str | tuple[str, ...]) -> int:
    """The 32-bit hash of one shingle, in plain Python: the reference the vectorised code matches.

    A char shingle is a string; a word shingle a tuple of words. Pass it to
    ``datasketch.MinHash(hashfunc=shingle_hash)`` to get curate's signatures from datasketch.
    """
    mask = (1 << 64) - 1
    if isinstance(shingle, str):
        h = sum(ord(c) * int(_CHAR_C[j]) for j, c in enumerate(shingle)) & mask
    else:
        k = len(shingle)
        h = sum(_word_token_hash(w) * int(_WORD_C[k * _MAX_NGRAM + j]) for j, w in enumerate(shingle)) & mask
    return int(_fmix64(np.array([h], dtype=np.uint64))[0] >> _U64(32))


def _word_token_hash(word: str) -> int:
    """Python reference of a word's 64-bit hash (polynomial in its code points, see _word_hashes)."""
    h = 0
    for j, c in enumerate(word):
        h = (h + ord(c) * pow(_POLY, j, 1 << 64)) & ((1 << 64) - 1)
    return int(_fmix64(np.array([h], dtype=np.uint64))[0])


_POLY = int(_constants(1, 4)[0])
_POLY_INV = pow(_POLY, -1, 1 << 64)


def _kernels():
    """The compiled kernels (:mod:`curate.dedup.minhash_kernels`), imported on first use: numba costs
    0.25 s to import, which every recipe would otherwise pay as the stage registry loads this module."""
    from curate.dedup import minhash_kernels

    return minhash_kernels


def warm_kernels() -> None:
    """Compile (or load from numba's on-disk cache) every kernel once, on tiny inputs."""
    a, b = permutations(2, 1)
    out = np.empty((1, 2), np.uint32)
    k = _kernels()
    k._k_char_signatures(np.zeros(5, np.uint32), np.zeros(1, np.int64), np.ones(1, np.int64), 5, _CHAR_C, a, b, out)
    k._k_hash_signatures(np.zeros(1, np.uint32), np.ones(1, np.int64), a, b, out)
    k._k_band_hashes(out, 1, 2, _BAND_C, np.empty((1, 1), np.uint64))
    normalised_codepoints(pa.array(["A b"]), 1)


# ------------------------------------------------------------------ shingles


@dataclass(frozen=True)
class MinHashParams:
    """Everything that decides a signature and a match. Defaults: see the stage's options."""

    threshold: float = 0.8
    num_perm: int = 128
    seed: int = 1
    shingle: Shingle = "char"
    ngram: int = 5
    bands: int | None = None  # None: chosen from the threshold by optimal_bands
    rows: int | None = None
    #: Candidates are verified against ``threshold - verify_sigmas * σ``, σ the standard error
    #: of the estimate at the threshold, sqrt(t(1-t)/num_perm) (0.035 for 0.8 and 128
    #: permutations). The estimate is a sample of num_perm coin flips: verifying at the
    #: threshold itself would reject half of the pairs whose true Jaccard *is* the threshold.
    #: Two standard errors keep ~98 % of those and still reject the chance bucket collisions
    #: of unrelated captions (true Jaccard far below). 0: verify at the threshold exactly.
    verify_sigmas: float = 2.0
    #: False: keep every pair that shares a bucket, as datasketch's MinHashLSH query does.
    verify: bool = True

    def verify_threshold(self) -> float:
        """The estimated Jaccard a candidate pair must reach (see ``verify_sigmas``; 0 unverified)."""
        if not self.verify:
            return 0.0
        t = self.threshold
        return max(0.0, t - self.verify_sigmas * math.sqrt(t * (1.0 - t) / self.num_perm))

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 1 <= self.ngram <= _MAX_NGRAM:
            raise ValueError(f"ngram must be in [1, {_MAX_NGRAM}], got {self.ngram}")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:  # type: ignore[operator]
            raise ValueError(f"bands × rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")

    def band_rows(self) -> tuple[int, int]:
        """Bands × rows: as set, else :func:`optimal_bands` weighting false negatives
        ``VERIFIED_FN_WEIGHT`` to 1 - that when candidates are verified, 0.5/0.5 (datasketch's
        ``MinHashLSH`` default) when they are not."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        w = VERIFIED_FN_WEIGHT if self.verify else 0.5
        return optimal_bands(self.threshold, self.num_perm, fp_weight=1.0 - w, fn_weight=w)


def char_shingles(text: str, n: int) -> list[str]:
    """Character n-grams of a normalised caption; a caption shorter than n is one shingle."""
    if len(text) <= n:
        return [text]
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def word_shingles(text: str, n: int) -> list[tuple[str, ...]]:
    """Word 1..n-grams of a normalised caption (so a one-word caption still has a shingle)."""
    words = text.split(" ")
    return [tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)]


def normalised_codepoints(captions: pa.Array, pad: int,
                          normalised: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Code points of each caption's normalised text (:func:`curate.text.normalise_caption`), each
    followed by ``pad`` NULs, with each text's start and length (0: null or nothing left).

    ASCII captions are normalised by a compiled kernel straight from the Arrow buffers (no Python
    str); the others by ``normalise_caption`` (tests check both agree). ``normalised``: as given.
    """
    captions = captions.cast(pa.large_string()) if captions.type != pa.large_string() else captions
    n = len(captions)
    _, offs_buf, data_buf = captions.buffers()
    offsets = np.frombuffer(offs_buf, dtype=np.int64)[captions.offset:captions.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    valid = captions.is_valid().to_numpy(zero_copy_only=False)
    total = int(offsets[-1] - offsets[0]) + n * (pad + 1)
    out = np.empty(total, dtype=np.uint32)
    starts = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    ascii_ok = np.empty(n, dtype=np.bool_)
    pos = _kernels()._k_normalise_ascii(data, offsets, valid, pad, out, starts, lengths, ascii_ok)  # identity if normalised
    rest = np.flatnonzero(valid & ~ascii_ok)
    if len(rest) == 0:
        return out[:pos], starts, lengths
    texts = captions.take(pa.array(rest)).to_pylist()
    if not normalised:
        texts = [normalise_caption(t) or "" for t in texts]
    cp, rest_starts, rest_lengths = _codepoints(texts, pad)
    starts[rest] = rest_starts + pos
    lengths[rest] = rest_lengths
    return np.concatenate([out[:pos], cp]), starts, lengths


def _codepoints(texts: list[str], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Code points of all texts, each followed by ``pad`` NULs (never in a normalised caption)."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    sep = "\0" * pad
    joined = sep.join(texts) + sep
    cp = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    starts = np.zeros(len(texts), dtype=np.int64)
    if len(texts) > 1:
        starts[1:] = np.cumsum(lengths[:-1] + pad)
    return cp, starts, lengths


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return offsets + np.arange(total, dtype=np.int64)


def _char_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every char n-gram of every text, and how many each text has."""
    cp, starts, lengths = _codepoints(texts, n - 1)
    cp = cp.astype(np.uint64)
    windows = len(cp) - n + 1
    h = cp[:windows] * _CHAR_C[0]
    for j in range(1, n):
        h += cp[j:j + windows] * _CHAR_C[j]
    counts = np.maximum(lengths - n + 1, 1)  # shorter than n: the padded whole caption, one shingle
    h = h[_ranges(starts, counts)]
    return (_fmix64(h) >> _U64(32)).astype(np.uint32), counts


def _word_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every word 1..n-gram of every text, and how many each text has.

    A word's hash is a polynomial in its code points computed for all words at once
    from prefix sums: sum(cp[s+j] * P**j) = (H[e] - H[s]) * P**-s, wrapping mod 2**64.
    """
    cp = _codepoints(texts, 1)[0].astype(np.uint64)  # one NUL between texts: a word boundary like a space
    is_sep = (cp == 32) | (cp == 0)
    powers = np.empty(len(cp) + 1, dtype=np.uint64)
    powers[0] = 1
    powers[1:] = _U64(_POLY)
    powers = np.cumprod(powers, dtype=np.uint64)
    inv = np.empty(len(cp) + 1, dtype=np.uint64)
    inv[0] = 1
    inv[1:] = _U64(_POLY_INV)
    inv = np.cumprod(inv, dtype=np.uint64)
    prefix = np.zeros(len(cp) + 1, dtype=np.uint64)
    np.cumsum(cp * powers[:-1], out=prefix[1:])
    boundary = np.flatnonzero(is_sep)
    word_start = np.concatenate([[0], boundary + 1])[:-1]
    word_end = boundary  # every text ends with its NUL, so each word ends at a separator
    word_hash = _fmix64((prefix[word_end] - prefix[word_start]) * inv[word_start])
    # which text each word belongs to: count NULs before it
    text_of_word = np.cumsum(np.concatenate([[0], cp[boundary] == 0]))[:-1]
    words_per_text = np.bincount(text_of_word, minlength=len(texts)).astype(np.int64)
    first_word = np.concatenate([[0], np.cumsum(words_per_text)[:-1]])
    parts_h, parts_text = [], []
    for k in range(1, n + 1):
        per_text = np.maximum(words_per_text - k + 1, 0)
        idx = _ranges(first_word, per_text)
        h = word_hash[idx] * _WORD_C[k * _MAX_NGRAM]
        for j in range(1, k):
            h += word_hash[idx + j] * _WORD_C[k * _MAX_NGRAM + j]
        parts_h.append(h)
        parts_text.append(np.repeat(np.arange(len(texts)), per_text))
    h = np.concatenate(parts_h)
    order = np.argsort(np.concatenate(parts_text), kind="stable")
    counts = np.bincount(np.concatenate(parts_text), minlength=len(texts)).astype(np.int64)
    return (_fmix64(h[order]) >> _U64(32)).astype(np.uint32), counts


def shingle_hashes(texts: list[str], shingle: Shingle, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every shingle of every (normalised, non-empty) text, and the count per text."""
    if not texts:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    return _char_hashes(texts, n) if shingle == "char" else _word_hashes(texts, n)


# ------------------------------------------------------------------ signatures


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch 2.x's affine32 permutation parameters (a odd, b), drawn exactly as it draws them."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def signatures_from_hashes(hashes: np.ndarray, counts: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures (rows × num_perm uint32) from shingle hashes grouped by ``counts``.

    The numpy formulation, kept as the reference the compiled kernels are tested against.
    """
    a, b = permutations(num_perm, seed)
    out = np.empty((len(counts), num_perm), dtype=np.uint32)
    if len(counts) == 0:
        return out
    mixed = _fmix32(hashes.astype(np.uint32))
    ends = np.cumsum(counts)
    starts = ends - counts
    row = 0
    while row < len(counts):  # chunks of whole rows of about PERMUTE_CHUNK_SHINGLES shingles
        stop = int(np.searchsorted(ends, starts[row] + PERMUTE_CHUNK_SHINGLES, side="right"))
        stop = max(stop, row + 1)
        lo, hi = int(starts[row]), int(ends[stop - 1])
        phv = np.multiply.outer(mixed[lo:hi], a)
        phv += b
        out[row:stop] = np.minimum.reduceat(phv, starts[row:stop] - lo, axis=0)
        row = stop
    return out


def signatures(texts: list[str], params: MinHashParams) -> np.ndarray:
    """Signatures (rows × num_perm uint32) of normalised, non-empty texts, by the compiled kernels."""
    a, b = permutations(params.num_perm, params.seed)
    out = np.empty((len(texts), params.num_perm), dtype=np.uint32)
    if not texts:
        return out
    if params.shingle == "char":
        cp, starts, lengths = _codepoints(texts, params.ngram - 1)
        _kernels()._k_char_signatures(cp, starts, lengths, params.ngram, _CHAR_C, a, b, out)
    else:
        hashes, counts = _word_hashes(texts, params.ngram)
        _kernels()._k_hash_signatures(hashes, np.cumsum(counts), a, b, out)
    return out


# ------------------------------------------------------------------ bands


def _fp_fn_areas(threshold: float, num_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every (b, r) with b·r ≤ num_perm: the false-positive area ∫₀ᵗ P(s) ds and the
    false-negative area ∫ₜ¹ 1 − P(s) ds of the S-curve P(s) = 1 − (1 − sʳ)ᵇ."""
    b, r = np.meshgrid(np.arange(1, num_perm + 1), np.arange(1, num_perm + 1), indexing="ij")
    ok = b * r <= num_perm
    b, r = b[ok].astype(np.float64), r[ok].astype(np.float64)
    # Composite Simpson's rule on 2,001 points: within 1e-9 of scipy.integrate.quad for these smooth curves.
    s_fp = np.linspace(0.0, threshold, 2001)
    s_fn = np.linspace(threshold, 1.0, 2001)
    p_fp = 1.0 - (1.0 - s_fp[None, :] ** r[:, None]) ** b[:, None]
    p_fn = (1.0 - s_fn[None, :] ** r[:, None]) ** b[:, None]
    return b, r, _simpson(p_fp, s_fp), _simpson(p_fn, s_fn)


def _simpson(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    h = (x[-1] - x[0]) / (len(x) - 1)
    return h / 3.0 * (y[:, 0] + y[:, -1] + 4.0 * y[:, 1:-1:2].sum(axis=1) + 2.0 * y[:, 2:-1:2].sum(axis=1))


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """Bands × rows minimising the weighted false-positive + false-negative areas.

    datasketch's ``MinHashLSH._optimal_param`` with its default weights (0.5, 0.5);
    for 128 permutations: t=0.9 → 5×25, t=0.8 → 9×13, t=0.7 → 14×9.
    """
    b, r, fp, fn = _fp_fn_areas(threshold, num_perm)
    err = fp * fp_weight + fn * fn_weight
    best = int(np.argmin(err))  # first minimum in (b, r) order, as datasketch's loop keeps the first
    return int(b[best]), int(r[best])


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit hash per band of each signature (rows × bands uint64): a multilinear hash of the
    band's values, xor the band's index, through fmix64 (compiled; :func:`band_hashes_reference`)."""
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    _kernels()._k_band_hashes(np.ascontiguousarray(sig), bands, rows, _BAND_C, out)
    return out


def band_hashes_reference(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """:func:`band_hashes` in numpy."""
    out = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    for k in range(bands):
        block = sig[:, k * rows:(k + 1) * rows].astype(np.uint64)
        h = (block * _BAND_C[k * rows:(k + 1) * rows]).sum(axis=1, dtype=np.uint64)
        out[:, k] = _fmix64(h ^ _U64(k))
    return out


# ------------------------------------------------------------------ pairs from buckets


def bucket_pairs(band: np.ndarray, bucket: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (left < right) of rows that share a (band, bucket), deduplicated.

    Buckets of up to ``ALL_PAIRS_MAX_BUCKET`` rows give every pair; larger ones a
    star around their smallest row plus the chain of neighbours in row order —
    enough to connect a bucket of identical signatures, without O(k²) pairs.
    """
    # Nearly every entry is alone in its bucket: drop those first with one plain sort of the bucket
    # hashes (entries sharing a hash across bands are split by the exact sort below).
    by_hash = np.argsort(bucket)
    sorted_hash = bucket[by_hash]
    shared = np.zeros(len(bucket), dtype=bool)
    same = sorted_hash[1:] == sorted_hash[:-1]
    shared[1:] |= same
    shared[:-1] |= same
    sel = by_hash[shared]
    band, bucket, row = band[sel], bucket[sel], row[sel]
    if len(row) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((row, bucket, band))
    band, bucket, row = band[order], bucket[order], row[order]
    new_run = np.ones(len(row), dtype=bool)
    new_run[1:] = (band[1:] != band[:-1]) | (bucket[1:] != bucket[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_size = np.diff(np.append(run_start, len(row)))
    size = run_size[run_id]
    lefts, rights = [], []
    small = size <= ALL_PAIRS_MAX_BUCKET
    max_small = int(size[small].max()) if small.any() else 1
    for d in range(1, max(max_small, 2)):
        i = np.flatnonzero(run_id[:-d] == run_id[d:]) if d < len(row) else np.zeros(0, np.int64)
        if d > 1:
            i = i[small[i]]
        lefts.append(row[i])
        rights.append(row[i + d])
    big = np.flatnonzero(~small & ~new_run)  # star: every non-first member of a big bucket to its first
    lefts.append(row[run_start[run_id[big]]])
    rights.append(row[big])
    left = np.concatenate(lefts).astype(np.int64)
    right = np.concatenate(rights).astype(np.int64)
    code = np.unique(left * (int(row.max()) + 1) + right)
    return code // (int(row.max()) + 1), code % (int(row.max()) + 1)


def slice_signatures(captions: pa.Array, params: MinHashParams, normalised: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sign an Arrow slice of captions: ``(idx, sig)``, the positions of the non-empty captions
    (after normalisation) and their signatures (len(idx) × num_perm uint32).

    Character shingles go from Arrow's buffers to the compiled kernel without a Python str per
    row; word shingles through :func:`signatures`.
    """
    if params.shingle == "char":
        cp, starts, lengths = normalised_codepoints(captions, params.ngram - 1, normalised)
        idx = np.flatnonzero(lengths > 0)
        a, b = permutations(params.num_perm, params.seed)
        sig = np.empty((len(idx), params.num_perm), dtype=np.uint32)
        _kernels()._k_char_signatures(cp, starts[idx], lengths[idx], params.ngram, _CHAR_C, a, b, sig)
        return idx, sig
    texts = captions.to_pylist()
    if not normalised:
        texts = [normalise_caption(t) for t in texts]
    idx = np.flatnonzero(np.fromiter((bool(t) for t in texts), dtype=bool, count=len(texts)))
    return idx, signatures([texts[i] for i in idx], params)
