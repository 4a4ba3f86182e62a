"""dedup_semantic (SemDeDup): planted near-identical embeddings, hard negatives, splits, order, end to end."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.dedup import semantic
from curate.dedup.semantic import SemanticPairs, default_clusters
from curate.errors import CurateError
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.dedup_semantic import DedupSemantic, DedupSemanticConfig
from tests.conftest import write_tar

DIM = 64


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _at_cosine(rng, v: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector with exactly ``cos`` similarity to unit vector ``v``."""
    r = rng.standard_normal(v.shape)
    r = _unit(r - (r @ v) * v)
    return cos * v + np.sqrt(1 - cos**2) * r


def _planted(seed=0, n=400, copies=40, hard=40):
    """n random originals; ``copies`` at cosine 0.97-0.995 (duplicates at ε=0.05); ``hard`` at 0.85-0.93 (not)."""
    rng = np.random.default_rng(seed)
    orig = _unit(rng.standard_normal((n, DIM)))
    vecs, keys, truth = list(orig), [f"o{i:04d}" for i in range(n)], {}
    for j in range(copies):
        vecs.append(_at_cosine(rng, orig[j], rng.uniform(0.97, 0.995)))
        keys.append(f"p{j:04d}")
        truth[f"p{j:04d}"] = f"o{j:04d}"
    for j in range(copies, copies + hard):
        vecs.append(_at_cosine(rng, orig[j], rng.uniform(0.85, 0.93)))
        keys.append(f"q{j:04d}")
    return keys, np.array(vecs, dtype=np.float32), truth


def _table(keys, vecs, **extra) -> pa.Table:
    flat = pa.array(np.asarray(vecs, np.float16).ravel(), pa.float16())
    emb = pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1])
    return pa.table({"key": keys, "clip_image_emb": emb, **extra})


def _dropped(decisions: pa.Table) -> dict[str, str]:
    return {k: o for k, r, o in zip(decisions["key"].to_pylist(), decisions["reason"].to_pylist(),
                                    decisions["duplicate_of"].to_pylist(), strict=True) if r is not None}


def test_planted_near_duplicates_found_hard_negatives_kept():
    keys, vecs, truth = _planted()
    d, info = DedupSemantic(DedupSemanticConfig(epsilon=0.05)).decide(_table(keys, vecs))
    assert _dropped(d) == truth  # recall 1, precision 1, duplicate_of = the original (smaller key)
    assert set(d["reason"].to_pylist()) == {None, "duplicate:semantic"}
    assert info["cluster_sizes"] == {"2": 40} and info["kmeans_clusters"] == default_clusters(480) == 22
    assert info["embedded"] == 480 and info["threshold"] == pytest.approx(0.95)


def test_epsilon_sets_how_close_a_duplicate_must_be():
    keys, vecs, truth = _planted()
    d, _ = DedupSemantic(DedupSemanticConfig(epsilon=0.2)).decide(_table(keys, vecs))
    found = _dropped(d)
    assert set(truth) < set(found) and {k for k in found if k.startswith("q")} == {
        f"q{j:04d}" for j in range(40, 80)}  # cosine 0.85-0.93 ≥ 0.8: now duplicates too


def test_result_independent_of_row_order_and_keep_rule_applies():
    keys, vecs, truth = _planted(seed=1)
    perm = np.random.default_rng(5).permutation(len(keys))
    a, _ = DedupSemantic(DedupSemanticConfig(epsilon=0.05)).decide(_table(keys, vecs))
    b, _ = DedupSemantic(DedupSemanticConfig(epsilon=0.05)).decide(_table([keys[i] for i in perm], vecs[perm]))
    assert _dropped(a) == _dropped(b)  # k-means sees rows in key order: same clusters, same decisions
    # a pair split across two k-means clusters is not compared (SemDeDup's approximation): near 1, not 1
    assert set(_dropped(a).items()) <= set(truth.items()) and len(_dropped(a)) >= 0.95 * len(truth)
    score = [1.0 if k.startswith("p") else 0.0 for k in keys]
    c, _ = DedupSemantic(DedupSemanticConfig(epsilon=0.05, keep=["-clip_score"])).decide(
        _table(keys, vecs, clip_score=pa.array(score, pa.float32())))
    assert _dropped(c) == {o: p for p, o in _dropped(a).items()}  # the better-scoring copy is kept instead


def test_giant_cluster_is_split_and_exact_copies_still_found():
    rng = np.random.default_rng(2)
    base = _unit(rng.standard_normal((300, DIM))).astype(np.float32)
    vecs = np.concatenate([base, base[:30]])  # 30 exact copies
    keys = [f"a{i:04d}" for i in range(300)] + [f"b{i:04d}" for i in range(30)]
    d, info = DedupSemantic(DedupSemanticConfig(n_clusters=1, max_cluster_size=40)).decide(_table(keys, vecs))
    assert _dropped(d) == {f"b{i:04d}": f"a{i:04d}" for i in range(30)}
    assert info["split_clusters"] == 1 and info["largest_kmeans_cluster"] <= 40
    assert info["compared_pairs"] < 330 * 329 // 2 // 4  # the pairwise step shrank with the split


def test_identical_points_that_kmeans_cannot_split_are_chunked():
    vecs = np.tile(np.eye(DIM, dtype=np.float32)[:1], (25, 1))
    left, right, stats = SemanticPairs(epsilon=0.05, n_clusters=1, max_cluster_size=10).pairs(vecs)
    assert stats.largest_cluster == 10 and stats.clusters == 3
    assert len(left) == 2 * 45 + 10  # all pairs inside the chunks of 10, 10 and 5


def test_null_embeddings_are_never_matched():
    keys, vecs, _ = _planted(n=20, copies=2, hard=0)
    t = _table(keys, vecs)
    mask = pa.array([k == "p0001" for k in keys])
    emb = pa.FixedSizeListArray.from_arrays(t["clip_image_emb"].combine_chunks().values, DIM, mask=mask)
    d, info = DedupSemantic(DedupSemanticConfig(epsilon=0.05)).decide(t.set_column(1, "clip_image_emb", emb))
    assert _dropped(d) == {"p0000": "o0000"} and info["embedded"] == 21


def test_missing_embeddings_say_what_to_add():
    with pytest.raises(CurateError, match="clip_score.*keep_embeddings"):
        DedupSemantic(DedupSemanticConfig(epsilon=0.05)).decide(pa.table({"key": ["a"]}))


def _scene_bytes(seed: int):
    from PIL import Image

    from curate.demo.world import english_caption, random_scene, render_scene

    rng = random.Random(seed)
    scene = random_scene(rng)
    im = render_scene(scene, 320, 256, rng)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    small = io.BytesIO()
    im.resize((288, 230), Image.Resampling.BICUBIC).save(small, "JPEG", quality=75)
    return buf.getvalue(), small.getvalue(), english_caption(scene, rng)


def test_ray_tasks_chunks_and_partitions_do_not_change_the_pairs(ray_session, monkeypatch):
    """Lloyd steps, assignment and the pairwise step as Ray tasks: same pairs as in-process,
    whatever the chunking of the rows or the number of partitions."""
    monkeypatch.setattr(semantic, "RAY_MIN_ROWS", 2)
    keys, vecs, truth = _planted(seed=3, n=1500, copies=120, hard=60)
    ref = SemanticPairs(epsilon=0.05, seed=4).pairs(vecs)
    assert len(ref[0]) >= 0.95 * len(truth)
    for chunk_rows, partitions in [(64, 1), (500, 3), (4096, 7)]:
        finder = SemanticPairs(epsilon=0.05, seed=4, chunk_rows=chunk_rows, partitions=partitions)
        left, right, stats = finder.pairs(vecs, use_ray=True)
        assert np.array_equal(left, ref[0]) and np.array_equal(right, ref[1]), (chunk_rows, partitions)
        assert stats.tasks > partitions and stats.clusters == ref[2].clusters


def test_end_to_end_with_the_demo_clip(tmp_path, make_recipe, ray_session, monkeypatch):
    monkeypatch.setattr(semantic, "RAY_MIN_ROWS", 2)  # k-means and the comparison as Ray tasks, as at scale
    samples, truth = [], {}
    for i in range(24):
        img, small, cap = _scene_bytes(1000 + i)
        samples.append({"__key__": f"k{i:03d}", "jpg": img, "txt": cap})
        if i % 3 == 0:
            samples.append({"__key__": f"r{i:03d}", "jpg": small, "txt": cap + " again"})
            truth[f"r{i:03d}"] = f"k{i:03d}"
        if i % 4 == 1:
            samples.append({"__key__": f"x{i:03d}", "jpg": img, "txt": "the same bytes"})
            truth[f"x{i:03d}"] = f"k{i:03d}"
    random.Random(0).shuffle(samples)
    write_tar(tmp_path / "src" / "a.tar", samples[:20])
    write_tar(tmp_path / "src" / "b.tar", samples[20:])
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "stages": [{"use": "clip_score", "model": "curate-demo-clip"},
                                     {"use": "dedup_semantic", "epsilon": 0.002}],
                          "write": {"output": str(tmp_path / "out"), "formats": ["parquet"]}})
    m = run(load_recipe(recipe))
    assert m.counts.input == 38
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pylist()
    dropped = {r["key"]: r["duplicate_of"] for r in ledger if r["reason"] == "duplicate:semantic"}
    assert dropped == truth
    assert {r["dropped_by"] for r in ledger if r["status"] == "dropped"} == {"dedup_semantic"}
    info = next(s for s in m.stages if s.name == "dedup_semantic").info
    assert info["embedded"] == 38 and info["dropped"] == 14 and info["ray_tasks"] > 0
