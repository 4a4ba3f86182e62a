"""The compiled (numba) kernel of :mod:`curate.dedup.phash`'s multi-index search: one band's values
joined to their values XOR each flip mask, every candidate verified by its 64-bit popcount in the
same loop. Brute force is the reference it equals (tested, as is the numpy join kept for bands too
wide for a table); it makes no temporary array per mask, which is where numpy's time went (about ten passes over
half the values for each of ~1,500 masks a band at 10M hashes).
"""

from __future__ import annotations

import numba
import numpy as np

_K_M1 = np.uint64(0x5555555555555555)
_K_M2 = np.uint64(0x3333333333333333)
_K_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_K_H01 = np.uint64(0x0101010101010101)
_K_1, _K_2, _K_4, _K_56 = np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(56)


@numba.njit(cache=True, nogil=True, inline="always")
def _k_popcount(x):  # pragma: no cover - compiled
    """Set bits of a uint64 (the SWAR form, which LLVM turns into one POPCNT where the CPU has it)."""
    x = x - ((x >> _K_1) & _K_M1)
    x = (x & _K_M2) + ((x >> _K_2) & _K_M2)
    x = (x + (x >> _K_4)) & _K_M4
    return (x * _K_H01) >> _K_56


@numba.njit(cache=True, nogil=True)
def k_mask_join(values, starts, counts, hs, order, top, masks, start_of, count_of, max_distance,
                earlier_shift, earlier_mask, earlier_radius):  # pragma: no cover - compiled
    """Verified pairs found through flip masks whose highest set bit is ``top``.

    ``values``: the band's distinct values, ascending; ``starts`` / ``counts``: each one's bucket
    (positions in ``hs``, the hashes in band order; ``order``: their row numbers); ``start_of`` /
    ``count_of``: the same by band value, start -1 when empty. Only values whose bit ``top``
    is 0 are joined (the partner has it: each unordered pair once), every member of their bucket
    against every member of the partner's. A pair is kept when its hashes differ in at most
    ``max_distance`` bits and in more than ``earlier_radius[e]`` bits of every earlier band e
    (there it was found already). Returns (left rows, right rows, candidates seen).
    """
    cap = 1024
    left = np.empty(cap, np.int64)
    right = np.empty(cap, np.int64)
    k = 0
    candidates = 0
    bit = np.uint64(1) << np.uint64(top)
    for mi in range(masks.size):
        mask = masks[mi]
        for vi in range(values.size):  # ascending: v ^ mask walks the table nearly in order
            v = values[vi]
            if v & bit:  # sorted values: runs of one bit value, so the branch predicts well
                continue
            p = v ^ mask
            lo = start_of[p]
            if lo < 0:
                continue
            hi = lo + count_of[p]
            for a in range(starts[vi], starts[vi] + counts[vi]):
                ha = hs[a]
                candidates += hi - lo
                for b in range(lo, hi):
                    x = ha ^ hs[b]
                    if _k_popcount(x) > max_distance:
                        continue
                    mine = True
                    for e in range(earlier_shift.size):
                        if _k_popcount((x >> earlier_shift[e]) & earlier_mask[e]) <= earlier_radius[e]:
                            mine = False
                            break
                    if not mine:
                        continue
                    if k == cap:
                        cap *= 2
                        grown_l = np.empty(cap, np.int64)
                        grown_r = np.empty(cap, np.int64)
                        grown_l[:k] = left[:k]
                        grown_r[:k] = right[:k]
                        left, right = grown_l, grown_r
                    i, j = order[a], order[b]
                    left[k] = min(i, j)
                    right[k] = max(i, j)
                    k += 1
    return left[:k], right[:k], candidates
