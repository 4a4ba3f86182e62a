"""Clusters of duplicates and the one sample each keeps: shared by every dedup level.

A dedup level finds candidate pairs (rows ``left[i]`` and ``right[i]`` are
duplicates), :func:`connected_components` turns the pairs into clusters, and
:func:`decide_clusters` keeps one row per cluster by the recipe's ``keep`` rule
and marks the others with a reason and ``duplicate_of`` (the kept key).

The keep rule is a list of column names, a ``-`` prefix meaning "highest
first" (``["-clip_score"]`` keeps the best-scoring sample); ties, nulls and an
empty rule fall back to the smallest key, so the result does not depend on the
number of shards or workers that produced the rows.

Example::

    >>> import numpy as np, pyarrow as pa
    >>> t = pa.table({"key": ["a", "b", "c"], "clip_score": [0.2, 0.9, 0.5]})
    >>> labels = connected_components(3, np.array([0, 1]), np.array([1, 2]))
    >>> d, info = decide_clusters(t, labels, reason="duplicate:x", keep=["-clip_score"])
    >>> d["duplicate_of"].to_pylist(), info["cluster_sizes"]
    (['b', None, 'b'], {'3': 1})
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import rows

#: The recipe option every dedup stage shares; use as ``keep: list[str] = KEEP_FIELD``.
KEEP_FIELD: Any = Field(
    default_factory=list,
    description="Which sample of a duplicate cluster is kept: columns in order of preference, "
    "`-` for highest first (e.g. [-clip_score]); ties and nulls fall back to the smallest key.",
)


def keep_columns(keep: list[str]) -> list[str]:
    """The columns a keep rule reads (for a global stage's ``input_columns``)."""
    return [k.lstrip("-+") for k in keep]


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Label each of ``n`` rows with the smallest row index of its component.

    Vectorised min-label propagation with pointer jumping: O(pairs) per round,
    a handful of rounds for the small clusters duplicates form.
    """
    labels = np.arange(n, dtype=np.int64)
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    if n == 0 or left.size == 0:
        return labels
    while True:
        low = np.minimum(labels[left], labels[right])
        new = labels.copy()
        np.minimum.at(new, left, low)
        np.minimum.at(new, right, low)
        while True:  # pointer jumping: every row points at its component's current root
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            return labels
        labels = new


def preference_order(table: pa.Table, keep: list[str]) -> np.ndarray:
    """Row indices from most to least preferred by the keep rule, then by key."""
    sort_keys: list[tuple[str, str, str]] = []
    for k in keep:
        col = k.lstrip("-+")
        if col not in table.column_names:
            raise ValueError(f"keep rule names column {col!r}, which the rows do not have "
                             f"(columns: {', '.join(table.column_names)})")
        sort_keys.append((col, "descending" if k.startswith("-") else "ascending", "at_end"))
    sort_keys.append((rows.KEY, "ascending", "at_end"))
    return pc.sort_indices(table, sort_keys=sort_keys).to_numpy()


def decide_clusters(table: pa.Table, labels: np.ndarray, *, reason: str, keep: list[str] | None = None,
                    order: np.ndarray | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Decisions for a global stage: one kept row per cluster, the rest marked.

    Returns (``key``, ``reason``, ``duplicate_of``) for every row, and info with
    the number dropped and the histogram of cluster sizes (clusters of 2+).
    ``order``: :func:`preference_order` of ``table`` by ``keep``, when the caller already has it.
    """
    n = table.num_rows
    labels = np.asarray(labels, dtype=np.int64)
    order = preference_order(table, keep or []) if order is None else order
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, labels, rank)
    rep = order[best[labels]] if n else np.zeros(0, dtype=np.int64)
    is_dup = rep != np.arange(n)
    keys = table[rows.KEY].combine_chunks() if n else pa.array([], pa.string())
    dup_of = pc.if_else(pa.array(is_dup), keys.take(pa.array(rep)), pa.nulls(n, pa.string())) if n \
        else pa.array([], pa.string())
    reasons = pc.if_else(pa.array(is_dup), pa.scalar(reason), pa.nulls(n, pa.string())) if n \
        else pa.array([], pa.string())
    sizes = np.bincount(labels, minlength=n) if n else np.zeros(0, dtype=np.int64)
    hist_sizes, hist_counts = np.unique(sizes[sizes > 1], return_counts=True)
    info = {
        "dropped": int(is_dup.sum()),
        "clusters": int((sizes > 1).sum()),
        "cluster_sizes": {str(int(s)): int(c) for s, c in zip(hist_sizes, hist_counts, strict=True)},
    }
    decisions = pa.table({rows.KEY: keys.cast(pa.string()), rows.REASON: reasons.cast(pa.string()),
                          "duplicate_of": dup_of.cast(pa.string())})
    return decisions, info
