"""First-fit-decreasing bin packing of sample lengths into fixed-capacity sequences.

Open-Qwen2VL packs with the textbook loop: sort the samples by length, longest
first, then put each one into the *first* open sequence it fits in, scanning
every sequence — O(n·bins) Python steps per shard. :func:`first_fit_decreasing`
gives the same assignment (item by item, not only the same bin count) in
O(n log n):

- a max segment tree over the bins' remaining capacities answers "leftmost bin
  with room ≥ x" in O(log bins), instead of a scan;
- items of equal length are placed as a group: first fit puts consecutive equal
  items into the same bin until it cannot take another, so a group fills one
  existing bin per tree query, and whatever no open bin can take goes into new
  bins that are created (and written into the tree) with numpy in one step.
  Token lengths take at most ``capacity`` distinct values, so a million samples
  are a few thousand groups.

Ties are broken by the caller's order (keys): the result is deterministic and
identical to :func:`naive_first_fit_decreasing`, the reference loop kept for the
tests and ``benchmarks/pack.py``.

>>> p = first_fit_decreasing([3, 5, 2, 4, 1], capacity=6)
>>> p.num_bins, p.bin_of.tolist(), [b.tolist() for b in p.bins()]
(3, [2, 0, 1, 1, 0], [[1, 4], [3, 2], [0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Packing:
    """The result: which bin each item went to, in the caller's item order.

    ``order`` is the placement order (length descending, then caller order); a
    bin's items, in that order, are what :meth:`bins` returns.
    """

    bin_of: np.ndarray  # int64, per item
    loads: np.ndarray  # int64, per bin: summed lengths
    order: np.ndarray  # int64, item indices in placement order
    capacity: int

    @property
    def num_bins(self) -> int:
        return len(self.loads)

    @property
    def efficiency(self) -> float:
        """Filled tokens / capacity of the bins used (1.0 for an empty packing)."""
        if not self.num_bins:
            return 1.0
        return float(self.loads.sum()) / (self.num_bins * self.capacity)

    def bins(self) -> list[np.ndarray]:
        """Item indices per bin, each in placement order."""
        if not self.num_bins:
            return []
        placed = self.bin_of[self.order]
        by_bin = self.order[np.argsort(placed, kind="stable")]
        counts = np.bincount(placed, minlength=self.num_bins)
        return np.split(by_bin, np.cumsum(counts)[:-1])


def _validate(lengths: Sequence[int] | np.ndarray, capacity: int) -> np.ndarray:
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {arr.shape}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 1:
            raise ValueError(f"lengths must be >= 1, got {lo} at index {int(arr.argmin())}")
        if hi > capacity:
            raise ValueError(f"length {hi} at index {int(arr.argmax())} exceeds capacity {capacity}")
    return arr


def placement_order(lengths: np.ndarray) -> np.ndarray:
    """Longest first; equal lengths keep the caller's order (a stable sort), so ties go by key."""
    return np.argsort(-lengths, kind="stable")


class _MaxTree:
    """Max segment tree over bin remaining capacities; unopened bins hold 0."""

    def __init__(self, max_bins: int) -> None:
        size = 1
        while size < max(1, max_bins):
            size *= 2
        self.size = size
        self.tree = np.zeros(2 * size, dtype=np.int64)
        self._t = self.tree  # local alias for the hot loops

    def leftmost_at_least(self, x: int) -> int:
        """Index of the leftmost bin whose remaining capacity is ≥ x, or -1."""
        t = self._t
        if t[1] < x:
            return -1
        i = 1
        size = self.size
        while i < size:
            i *= 2
            if t[i] < x:
                i += 1
        return i - size

    def set(self, bin_index: int, value: int) -> None:
        t = self._t
        i = bin_index + self.size
        t[i] = value
        i //= 2
        while i:
            a, b = t[2 * i], t[2 * i + 1]
            t[i] = a if a > b else b
            i //= 2

    def set_range(self, start: int, values: np.ndarray) -> None:
        """Write consecutive leaves and recompute their ancestors level by level (numpy)."""
        if not len(values):
            return
        t = self._t
        lo, hi = start + self.size, start + len(values) + self.size - 1
        t[lo:hi + 1] = values
        while lo > 1:
            lo //= 2
            hi //= 2
            t[lo:hi + 1] = np.maximum(t[2 * lo:2 * hi + 2:2], t[2 * lo + 1:2 * hi + 2:2])


def first_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> Packing:
    """Pack ``lengths`` (each 1..capacity) into bins of ``capacity`` by first-fit decreasing.

    Ties between equal lengths are placed in the order given: pass the items
    sorted by key for a packing that depends only on the data.
    """
    arr = _validate(lengths, capacity)
    n = arr.size
    order = placement_order(arr)
    bin_of = np.empty(n, dtype=np.int64)
    if n == 0:
        return Packing(bin_of, np.zeros(0, np.int64), order, capacity)
    sorted_len = arr[order]
    # Groups of equal length, in placement order.
    starts = np.flatnonzero(np.r_[True, sorted_len[1:] != sorted_len[:-1]])
    ends = np.r_[starts[1:], n]
    tree = _MaxTree(n)
    remaining = np.zeros(n, dtype=np.int64)  # per bin (only the first num_bins are used)
    num_bins = 0
    for g_start, g_end in zip(starts.tolist(), ends.tolist(), strict=True):
        size = int(sorted_len[g_start])
        pos = g_start
        # 1) fill open bins, leftmost first, each with as many of the group as it takes
        while pos < g_end:
            b = tree.leftmost_at_least(size)
            if b < 0:
                break
            room = int(remaining[b])
            take = min(g_end - pos, room // size)
            bin_of[order[pos:pos + take]] = b
            remaining[b] = room - take * size
            tree.set(b, room - take * size)
            pos += take
        if pos == g_end:
            continue
        # 2) the rest opens new bins, capacity // size items each (all bins left of them are too full)
        per_bin = capacity // size
        left = g_end - pos
        new = -(-left // per_bin)
        bin_of[order[pos:g_end]] = num_bins + np.arange(left, dtype=np.int64) // per_bin
        fill = np.full(new, per_bin * size, dtype=np.int64)
        fill[-1] = (left - (new - 1) * per_bin) * size
        remaining[num_bins:num_bins + new] = capacity - fill
        tree.set_range(num_bins, capacity - fill)
        num_bins += new
    loads = capacity - remaining[:num_bins]
    return Packing(bin_of, loads, order, capacity)


def naive_first_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> Packing:
    """The reference: Open-Qwen2VL's loop — each item, longest first, scans the bins in order
    and goes into the first one with room, else opens a new bin. O(n·bins); for tests and
    benchmarks only."""
    arr = _validate(lengths, capacity)
    order = placement_order(arr)
    bin_of = np.empty(arr.size, dtype=np.int64)
    loads: list[int] = []
    for i in order.tolist():
        x = int(arr[i])
        for b, load in enumerate(loads):
            if load + x <= capacity:
                loads[b] = load + x
                bin_of[i] = b
                break
        else:
            bin_of[i] = len(loads)
            loads.append(x)
    return Packing(bin_of, np.asarray(loads, dtype=np.int64), order, capacity)


def lower_bound_bins(lengths: Sequence[int] | np.ndarray, capacity: int) -> int:
    """ceil(sum / capacity): no packing can use fewer bins."""
    total = int(np.asarray(lengths, dtype=np.int64).sum())
    return -(-total // capacity)
