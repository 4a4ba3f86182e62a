"""Perceptual hashes of images and the pairs of them within a Hamming distance.

:func:`image_hashes` decodes an image once and returns its 64-bit pHash (as
computed by the ``imagehash`` library: grey 32×32 LANCZOS thumbnail, 2-D DCT,
the 8×8 lowest frequencies above their median) and a SHA-256 of its decoded
RGB pixels and size, which equals for a lossless re-encode of the same pixels.

:func:`near_value_pairs` finds every pair of distinct hashes within
``max_distance`` bits by multi-index hashing (Norouzi et al., 2012) with an
exact guarantee. The 64 bits are cut into bands, band *i* searched within a
radius ``r_i``, with ``sum(r_i + 1) > max_distance``: if two hashes differed in
more than ``r_i`` bits in every band they would differ in more than
``max_distance`` bits in all, so a pair within the distance is within ``r_i``
in at least one band (the pigeonhole principle, generalised). In each band the
rows are sorted by band value and, for every flip mask of at most ``r_i`` bits,
each value is joined to its value XOR the mask (a direct-address table): the
pairs of rows found are candidates, each verified by its exact 64-bit
popcount and reported once (in the first band where it is within the radius).
The join and the verification are one compiled loop (:mod:`curate.dedup.phash_kernels`,
numba): ~0.7 ns a candidate and ~7.5 ns a value and mask, 6× the numpy formulation
at 1M hashes.

Why not ``max_distance + 1`` bands of exact agreement: at distance 10 that
means 11 bands of ~6 bits, buckets of n/64 rows and a fifth of all pairs as
candidates, which is quadratic. :func:`plan_bands` chooses the number of bands
and their radii for n by a cost model (flip masks × values + candidate pairs):
at distance 10, 4 bands of 16 bits (radii 2, 2, 2, 1) up to a few million
hashes, then 3 bands of 21-22 bits, radii 3, 3, 2 (~1.6 k masks per band,
~7 · 10⁻⁴ of all pairs as candidates).

For uniformly random hashes no exact method is linear at this radius: with m
bands of 64/m bits a query costs the flip masks of its bands plus the rows that
fall within their radii, and no m makes both constant as n grows (Norouzi et
al. give about n^(1 + H(10/64)) ≈ n^1.6 for the whole search; the planner's
model, 3.2 s at 1M, 93 s at 10M and 4,600 s at 100M of CPU, grows as n^1.5-1.7).
Real pHashes collide more, which only adds true pairs. The work runs
as Ray tasks (one band and a slice of its flip masks each; the hashes travel
through the object store), and the result does not depend on the number of
tasks: it is the exact set of pairs, sorted.

Example::

    >>> import numpy as np
    >>> h = np.array([0, 1, 3, -1], dtype=np.int64)  # 0b0, 0b1, 0b11, all ones
    >>> left, right, _ = near_pairs(h, max_distance=2)
    >>> sorted(zip(left.tolist(), right.tolist()))
    [(0, 1), (0, 2), (1, 2)]
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

log = logging.getLogger(__name__)

HASH_BITS = 64
#: Candidate pairs verified per numpy step: bounds a task's memory (~10 arrays of this many
#: int64, ~300 MB) however large a bucket grows, while keeping numpy calls big enough to be fast.
PAIR_BLOCK = 4_000_000
#: Bands up to this width look values up in a direct-address table (2^width int32, 64 MB at 24);
#: wider ones (few bands, large radii: not chosen below hundreds of millions of hashes) by binary search.
TABLE_BITS = 24
#: Cost model of :func:`plan_bands`, in ~ns on one core (the compiled join, measured at 2M hashes):
#: one distinct band value joined through one flip mask (half the values per mask; a table of
#: 2^22 buckets is out of cache, so a gather costs a memory access), one candidate pair verified,
#: one value sorted per band and task.
COST_MASK_VALUE = 7.5
COST_CANDIDATE = 0.7
COST_SORT_VALUE = 200.0
#: Python's share: per flip mask (built in Python) and per band and task (measured at 100 hashes).
COST_MASK_CALL = 3_000.0
COST_BAND_CALL = 50_000.0
#: Hashes below which the search runs in the calling process even when Ray is up (milliseconds).
RAY_MIN_HASHES = 20_000
#: Tasks per CPU: enough to even out bands of unequal cost.
TASKS_PER_CPU = 3
WHITE = (255, 255, 255)


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can decode (truncated, corrupt, or a decompression bomb)."""


@dataclass(frozen=True)
class ImageHashes:
    phash: int  # the 64 pHash bits reinterpreted as a signed int64 (Arrow/Parquet have no uint64 need)
    pixel_sha256: str
    width: int
    height: int


def to_rgb(im):
    """RGB pixels as a viewer shows them: transparency composited onto white, as img2dataset does."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def image_hashes(data: bytes) -> ImageHashes:
    """pHash and pixel SHA-256 of encoded image bytes; :class:`UndecodableImage` when PIL cannot decode them."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)
    except Exception as e:  # noqa: BLE001 - any decoder failure (incl. DecompressionBombError) is one case
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e
    w, h = rgb.size
    digest = hashlib.sha256(f"{w}x{h}:".encode())
    digest.update(rgb.tobytes())
    bits = imagehash.phash(rgb, hash_size=8).hash.ravel()  # row-major, as str(ImageHash) prints it
    return ImageHashes(phash=bits_to_int64(bits), pixel_sha256=digest.hexdigest(), width=w, height=h)


def bits_to_int64(bits: np.ndarray) -> int:
    """64 booleans (most significant first, the order of ``str(imagehash.ImageHash)``) → signed int64."""
    packed = np.packbits(np.asarray(bits, dtype=bool)).view(">u8")[0]
    return int(np.array(packed, dtype=np.uint64).view(np.int64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of int64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    return np.bitwise_count(x.view(np.uint64))  # on int64 numpy would count |x|'s bits


def band_layout(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of ``max_distance + 1`` bands covering the 64 bits, widths differing by at most one."""
    n_bands = max_distance + 1
    if not 1 <= n_bands <= HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    return _split_bits(n_bands)


def _split_bits(n_bands: int) -> list[tuple[int, int]]:
    base, extra = divmod(HASH_BITS, n_bands)
    out, shift = [], 0
    for i in range(n_bands):
        width = base + (1 if i < extra else 0)
        out.append((shift, width))
        shift += width
    return out


@dataclass(frozen=True)
class Band:
    """Bits ``shift .. shift + width - 1`` of the hash, searched within ``radius`` flipped bits."""

    shift: int
    width: int
    radius: int

    @property
    def masks(self) -> int:
        """Flip masks searched besides equality: the Hamming ball of the radius, less its centre."""
        return ball_size(self.width, self.radius) - 1


def ball_size(width: int, radius: int) -> int:
    """Bit patterns of ``width`` bits within ``radius`` of one."""
    return sum(math.comb(width, k) for k in range(min(radius, width) + 1))


def band_cost(n: int, band: Band) -> float:
    """Estimated ns of one band over n distinct uniformly random hashes (see the ``COST_`` constants)."""
    values = min(n, 2 ** band.width)
    lookup = 1.0 if band.width <= TABLE_BITS else 6.0  # binary search instead of a table gather
    joins = band.masks * (values / 2 * COST_MASK_VALUE * lookup + COST_MASK_CALL)
    candidates = n * (n - 1) / 2 * ball_size(band.width, band.radius) / 2 ** band.width
    return joins + candidates * COST_CANDIDATE + n * COST_SORT_VALUE + COST_BAND_CALL


def plan_bands(n: int, max_distance: int) -> list[Band]:
    """Bands and radii with ``sum(radius + 1) == max_distance + 1`` that minimise :func:`band_cost` for n.

    For each number of bands m (1 .. max_distance + 1) the bits are split as evenly as
    possible and the radii too (the wider bands take the larger radii). Tiny n gives
    ``max_distance + 1`` bands of radius 0 (no masks); larger n fewer, wider bands.
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    best: tuple[float, list[Band]] | None = None
    for m in range(1, max_distance + 2):
        base_r, more = divmod(max_distance + 1 - m, m)
        if ball_size(HASH_BITS // m + 1, base_r + 1) > 50_000_000:
            continue  # flip masks beyond any use (one band at distance 10: 10^11)
        bands = [Band(s, w, base_r + (1 if i < more else 0)) for i, (s, w) in enumerate(_split_bits(m))]
        cost = sum(band_cost(max(n, 2), b) for b in bands)
        if best is None or cost < best[0]:
            best = (cost, bands)
    assert best is not None
    return best[1]


@dataclass
class SearchStats:
    """What the search did: for the manifest's info."""

    bands: list[Band] = field(default_factory=list)
    tasks: int = 0
    candidates: int = 0  # candidate pairs verified (a pair within the radius of two bands counts twice)

    def describe(self) -> str:
        return " ".join(f"{b.width}b/r{b.radius}" for b in self.bands)


def near_value_pairs(values: np.ndarray, max_distance: int, *, use_ray: bool = False,
                     tasks: int | None = None, stats: SearchStats | None = None,
                     bands: list[Band] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of *distinct* hashes within ``max_distance`` bits, as sorted index pairs.

    ``values``: distinct 64-bit hashes (int64 or uint64), in any order. ``use_ray``
    runs the bands as Ray tasks (``tasks`` of them, default a few per CPU), else in
    this process; the pairs are the same either way, sorted by (i, j).
    """
    h = np.ascontiguousarray(np.asarray(values).view(np.uint64) if np.asarray(values).dtype == np.int64
                             else np.asarray(values, dtype=np.uint64))
    n = h.size
    bands = bands or plan_bands(n, max_distance)
    stats = stats if stats is not None else SearchStats()
    stats.bands = bands
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if use_ray and n >= RAY_MIN_HASHES:
        import ray

        warm_kernel()  # compiled here once, into numba's on-disk cache that the tasks then load
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        work = _assign_work(n, bands, tasks or TASKS_PER_CPU * cpus)
        ref = ray.put(h)
        fn = ray.remote(_band_task)
        results = ray.get([fn.remote(ref, bands, b, tops, eq, max_distance) for b, tops, eq in work])
    else:
        work = _assign_work(n, bands, 1)
        results = [_band_task(h, bands, b, tops, eq, max_distance) for b, tops, eq in work]
    stats.tasks = len(work)
    stats.candidates = int(sum(r[2] for r in results))
    left = np.concatenate([r[0] for r in results])
    right = np.concatenate([r[1] for r in results])
    order = np.lexsort((right, left))  # a pair is reported by one band only: sorting makes the order fixed
    return left[order], right[order]


def _kernels():
    """The compiled join (:mod:`curate.dedup.phash_kernels`), imported on first use: numba costs 0.25 s
    to import, which every recipe would otherwise pay as the stage registry loads this module."""
    from curate.dedup import phash_kernels

    return phash_kernels


def warm_kernel() -> None:
    """Compile (or load from numba's cache) the join on tiny inputs of the types the tasks pass."""
    h = np.array([0, 1], np.uint64)
    i64 = np.array([0, 1], np.int64)
    table = np.array([0, 1], np.int32)
    none_u, none_i = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    _kernels().k_mask_join(h, i64, np.ones(2, np.int64), h, i64, 0, np.ones(1, np.uint64), table,
                           np.ones(2, np.int32), 1, none_u, none_u, none_i)


def _assign_work(n: int, bands: list[Band], target: int) -> list[tuple[int, list[int], bool]]:
    """(band index, top bits of its flip masks, whether this task also pairs equal band values).

    Flip masks are grouped by their highest set bit t (a task keeps only the values whose
    bit t is 0, so each unordered pair is seen once): ``ball(t, radius - 1)`` masks per group.
    Bands get tasks in proportion to their cost, groups go to the least-loaded task.
    """
    costs = [band_cost(n, b) for b in bands]
    total = sum(costs)
    out: list[tuple[int, list[int], bool]] = []
    for bi, band in enumerate(bands):
        groups = [(ball_size(t, band.radius - 1), t) for t in range(band.width)] if band.radius else []
        k = max(1, min(len(groups) or 1, round(target * costs[bi] / total)))
        loads = [0] * k
        tops: list[list[int]] = [[] for _ in range(k)]
        for cost, t in sorted(groups, reverse=True):
            i = loads.index(min(loads))
            loads[i] += cost
            tops[i].append(t)
        out.extend((bi, sorted(tp), i == 0) for i, tp in enumerate(tops))
    return out


def _flip_masks(top: int, radius: int) -> list[int]:
    """Masks of at most ``radius`` bits whose highest set bit is ``top``."""
    out = []
    for k in range(radius):
        for combo in combinations(range(top), k):
            out.append((1 << top) | sum(1 << b for b in combo))
    return out


def _band_task(h: np.ndarray, bands: list[Band], bi: int, tops: list[int], equal: bool,
               max_distance: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Verified pairs (i < j) of band ``bi`` through the masks whose top bits are ``tops``.

    Returns (left, right, candidates); pairs within the radius of an earlier band are left
    to that band, so every pair comes from exactly one band.
    """
    band = bands[bi]
    v = (h >> np.uint64(band.shift)) & np.uint64((1 << band.width) - 1)
    order = np.argsort(v, kind="stable")
    sv = v[order]
    hs = h[order]  # hashes in band order: a bucket's members are contiguous
    del v
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
    values = sv[starts]
    counts = np.diff(np.r_[starts, sv.size])
    found = _Found(hs, order, bands[:bi], max_distance)
    if equal:
        multi = np.flatnonzero(counts > 1)
        found.groups(starts[multi], counts[multi], starts[multi], counts[multi], same=True)
    if not tops:
        return found.result()
    if band.width <= TABLE_BITS:  # bucket (start, count) by band value; the compiled join
        start_of = np.full(1 << band.width, -1, np.int64 if hs.size >= 2**31 else np.int32)
        start_of[values] = starts
        count_of = np.zeros(1 << band.width, start_of.dtype)
        count_of[values] = counts
        earlier = bands[:bi]
        shift = np.array([b.shift for b in earlier], np.uint64)
        width_mask = np.array([(1 << b.width) - 1 for b in earlier], np.uint64)
        radius = np.array([b.radius for b in earlier], np.int64)
        join = _kernels().k_mask_join
        for top in tops:
            masks = np.array(_flip_masks(top, band.radius), np.uint64)
            left, right, seen = join(values, starts, counts, hs, order, top, masks, start_of, count_of,
                                     max_distance, shift, width_mask, radius)
            found.add(left, right, seen)
        return found.result()

    def lookup(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # wide bands: binary search
        pos = np.minimum(np.searchsorted(values, p), values.size - 1)
        hit = np.flatnonzero(values[pos] == p)
        return hit, starts[pos[hit]], counts[pos[hit]]

    for top in tops:
        q = np.flatnonzero(((sv >> np.uint64(top)) & np.uint64(1)) == 0)  # the partner has the bit: larger
        vq, hq = sv[q], hs[q]
        for mask in _flip_masks(top, band.radius):
            hit, s, c = lookup(vq ^ np.uint64(mask))
            qi, hh = q[hit], hq[hit]
            k = 0
            while True:  # the k-th member of each partner bucket (most buckets hold one row)
                found.rows(qi, s + k, hh)
                k += 1
                more = np.flatnonzero(c > k)
                if not more.size:
                    break
                qi, hh, s, c = qi[more], hh[more], s[more], c[more]
    return found.result()


class _Found:
    """Collects verified pairs of rows (positions in the band-ordered hashes)."""

    def __init__(self, hs: np.ndarray, order: np.ndarray, earlier: list[Band], max_distance: int) -> None:
        self.hs, self.order, self.earlier, self.d = hs, order, earlier, max_distance
        self.lefts: list[np.ndarray] = []
        self.rights: list[np.ndarray] = []
        self.candidates = 0

    def groups(self, sa: np.ndarray, ca: np.ndarray, sb: np.ndarray, cb: np.ndarray, same: bool) -> None:
        """Every member pair of bucket pairs (start, count), or of each bucket with itself (``same``)."""
        if not sa.size:
            return
        k = ca.astype(np.int64) * cb
        ends = np.cumsum(k)
        first = 0
        while first < k.size:  # blocks of bucket pairs with at most ~PAIR_BLOCK member pairs
            last = max(first + 1, int(np.searchsorted(ends, (ends[first] - k[first]) + PAIR_BLOCK, "right")))
            kk = k[first:last]
            pid = np.repeat(np.arange(first, last), kk)
            off = np.arange(pid.size) - np.repeat(np.cumsum(kk) - kk, kk)
            ia = sa[pid] + off // cb[pid]
            ib = sb[pid] + off % cb[pid]
            if same:
                ia, ib = ia[ia < ib], ib[ia < ib]
            self.rows(ia, ib, self.hs[ia])
            first = last

    def rows(self, ia: np.ndarray, ib: np.ndarray, ha: np.ndarray) -> None:
        """Verify candidate pairs (ia, ib), ``ha`` = the hashes at ia."""
        self.candidates += ia.size
        x = ha ^ self.hs[ib]
        ok = np.flatnonzero(np.bitwise_count(x) <= self.d)
        if not ok.size:
            return
        x, ia, ib = x[ok], ia[ok], ib[ok]
        mine = np.ones(ok.size, bool)
        for band in self.earlier:  # reported by the first band where the pair is within its radius
            part = (x >> np.uint64(band.shift)) & np.uint64((1 << band.width) - 1)
            mine &= np.bitwise_count(part) > band.radius
        i, j = self.order[ia[mine]], self.order[ib[mine]]
        self.lefts.append(np.minimum(i, j))
        self.rights.append(np.maximum(i, j))

    def add(self, left: np.ndarray, right: np.ndarray, candidates: int) -> None:
        """Pairs (row numbers) already verified elsewhere, e.g. by the compiled join."""
        self.lefts.append(left)
        self.rights.append(right)
        self.candidates += candidates

    def result(self) -> tuple[np.ndarray, np.ndarray, int]:
        if not self.lefts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), self.candidates
        return np.concatenate(self.lefts), np.concatenate(self.rights), self.candidates


def distinct_hashes(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct hashes as uint64 ascending, index of each row's hash among them)."""
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    return np.unique(h, return_inverse=True)


def expand_pairs(inverse: np.ndarray, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i < j) from pairs of distinct hashes, plus every pair of rows sharing one hash."""
    n_values = int(inverse.max()) + 1 if inverse.size else 0
    rows = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[rows], np.arange(n_values + 1))
    counts = np.diff(starts)
    multi = np.flatnonzero(counts > 1)
    sa = np.concatenate([starts[multi], starts[left]])
    ca = np.concatenate([counts[multi], counts[left]])
    sb = np.concatenate([starts[multi], starts[right]])
    cb = np.concatenate([counts[multi], counts[right]])
    same = np.r_[np.ones(multi.size, bool), np.zeros(left.size, bool)]
    k = ca * cb
    pid = np.repeat(np.arange(k.size), k)
    off = np.arange(pid.size) - np.repeat(np.cumsum(k) - k, k)
    ia = rows[sa[pid] + off // cb[pid]]
    ib = rows[sb[pid] + off % cb[pid]]
    keep = ~same[pid] | (ia < ib)
    i, j = np.minimum(ia, ib)[keep], np.maximum(ia, ib)[keep]
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64)


def pair_count(inverse: np.ndarray, left: np.ndarray, right: np.ndarray) -> int:
    """How many row pairs :func:`expand_pairs` would give, without listing them."""
    counts = np.bincount(inverse).astype(np.int64) if inverse.size else np.zeros(0, np.int64)
    return int((counts * (counts - 1) // 2).sum() + (counts[left] * counts[right]).sum())


def near_pairs(hashes: np.ndarray, max_distance: int, *, use_ray: bool = False,
               stats: SearchStats | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Every pair (i < j) of rows whose hashes differ in at most ``max_distance`` bits.

    Returns (left, right, candidates): row indices of the pairs, sorted, and how many
    candidate pairs were verified (the cost, reported in the manifest; rows with one
    hash count as verified pairs). Exact: no pair within the distance is missed, none
    beyond it is returned.
    """
    stats = stats if stats is not None else SearchStats()
    values, inverse = distinct_hashes(hashes)
    vl, vr = near_value_pairs(values, max_distance, use_ray=use_ray, stats=stats)
    left, right = expand_pairs(inverse, vl, vr)
    same = pair_count(inverse, np.zeros(0, np.int64), np.zeros(0, np.int64))
    return left, right, stats.candidates + same
