"""Clusters and keep rules shared by every dedup level."""

import numpy as np
import pyarrow as pa
import pytest

from curate.dedup.clusters import connected_components, decide_clusters, preference_order


def _union_find(n, pairs):
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        a, b = find(a), find(b)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(n)]


def test_components_match_union_find_on_random_graphs():
    rng = np.random.default_rng(7)
    for n, m in [(1, 0), (10, 3), (1000, 800), (20000, 30000)]:
        left, right = rng.integers(0, n, m), rng.integers(0, n, m)
        labels = connected_components(n, left, right)
        assert labels.tolist() == _union_find(n, zip(left.tolist(), right.tolist(), strict=True))


def test_long_chain_is_one_component():
    n = 5000
    order = np.random.default_rng(1).permutation(n)
    labels = connected_components(n, order[:-1], order[1:])
    assert set(labels.tolist()) == {0}


def test_keep_rule_prefers_highest_score_then_smallest_key():
    t = pa.table({"key": ["d", "c", "b", "a", "e"], "clip_score": [0.9, None, 0.9, 0.1, 0.5]})
    labels = connected_components(5, np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]))
    d, info = decide_clusters(t, labels, reason="duplicate:test", keep=["-clip_score"])
    # b and d tie at 0.9: the smaller key wins; the null score is never preferred
    assert d["duplicate_of"].to_pylist() == ["b", "b", None, "b", "b"]
    assert d["reason"].to_pylist() == ["duplicate:test"] * 2 + [None] + ["duplicate:test"] * 2
    assert info == {"dropped": 4, "clusters": 1, "cluster_sizes": {"5": 1}}


def test_default_keep_is_smallest_key_and_singletons_are_kept():
    t = pa.table({"key": ["k3", "k1", "k2", "k9"]})
    labels = connected_components(4, np.array([0]), np.array([1]))
    d, info = decide_clusters(t, labels, reason="duplicate:test")
    assert d["duplicate_of"].to_pylist() == ["k1", None, None, None]
    assert info["dropped"] == 1 and info["cluster_sizes"] == {"2": 1}


def test_keep_rule_naming_a_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match="clip_score"):
        preference_order(pa.table({"key": ["a"]}), ["-clip_score"])


def test_empty_table():
    d, info = decide_clusters(pa.table({"key": pa.array([], pa.string())}), np.zeros(0, np.int64),
                              reason="duplicate:test")
    assert d.num_rows == 0 and info["dropped"] == 0


def test_a_later_global_stage_keeps_an_earlier_ones_duplicate_of():
    from curate import rows
    from curate.engine.parts import apply_decisions

    batch = pa.table({rows.KEY: ["a", "b", "c", "d"], rows.STATUS: [rows.KEPT] * 4,
                      rows.DROPPED_BY: pa.nulls(4, pa.string()), rows.REASON: pa.nulls(4, pa.string())})
    first = pa.table({rows.KEY: ["a", "b", "c", "d"], rows.REASON: [None, "duplicate:exact_image", None, None],
                      "duplicate_of": [None, "a", None, None]})
    batch = apply_decisions(batch, first, "dedup_exact")
    # the second stage sees only what the first kept, so its decisions do not name b
    second = pa.table({rows.KEY: ["a", "c", "d"], rows.REASON: [None, None, "duplicate:near_image"],
                       "duplicate_of": [None, None, "c"]})
    batch = apply_decisions(batch, second, "dedup_phash")
    assert batch["duplicate_of"].to_pylist() == [None, "a", None, "c"]
    assert batch[rows.DROPPED_BY].to_pylist() == [None, "dedup_exact", None, "dedup_phash"]
