"""dedup_minhash: datasketch-equal signatures, LSH parameters, planted clusters, pair vs caption, e2e."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from curate.dedup import minhash as mh
from curate.dedup import minhash_lsh as lsh
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.dedup_minhash import DedupMinhash, DedupMinhashConfig
from curate.text import normalise_caption
from tests.conftest import jpeg_bytes

WORDS = ("dog cat beach mountain river city street car bicycle tree flower red blue green old new "
         "small large wooden stone house garden market sunset morning winter summer child woman man "
         "table chair window door bridge boat lake forest road train station painting portrait").split()


def _stage(**kw) -> DedupMinhash:
    return DedupMinhash(DedupMinhashConfig(**kw))


def _random_caption(rng: random.Random, lo: int = 8, hi: int = 20) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(rng.randint(lo, hi)))


# ------------------------------------------------------------------ signatures and parameters


@pytest.mark.parametrize("shingle,n", [("char", 5), ("char", 3), ("word", 3), ("word", 1)])
def test_signatures_equal_datasketch_minhash(shingle, n):
    captions = ["a photo of a red dog on the beach", "cat", "a", "ünïcode wörds 日本語 テキスト and more",
                "two words", "the the the the the the"]
    params = mh.MinHashParams(shingle=shingle, ngram=n, num_perm=64, seed=7)
    sig = mh.signatures(captions, params)
    for text, got in zip(captions, sig, strict=True):
        shingles = mh.char_shingles(text, n) if shingle == "char" else mh.word_shingles(text, n)
        ref = MinHash(num_perm=64, seed=7, hashfunc=mh.shingle_hash)  # datasketch 2.x, affine32
        for s in shingles:
            ref.update(s)
        assert ref.scheme == "affine32"
        np.testing.assert_array_equal(ref.hashvalues, got)


def test_estimated_jaccard_tracks_true_jaccard():
    rng = random.Random(1)
    a = _random_caption(rng, 15, 15)
    words = a.split()
    b = " ".join(words[:-1] + ["extra"])
    sa, sb = set(mh.char_shingles(a, 5)), set(mh.char_shingles(b, 5))
    true_j = len(sa & sb) / len(sa | sb)
    sig = mh.signatures([a, b], mh.MinHashParams(num_perm=512))
    assert abs((sig[0] == sig[1]).mean() - true_j) < 0.08


@pytest.mark.parametrize("threshold,expected", [(0.9, (5, 25)), (0.8, (9, 13)), (0.7, (14, 9))])
def test_bands_and_rows_from_threshold(threshold, expected):
    assert mh.optimal_bands(threshold, 128) == expected
    assert mh.optimal_bands(threshold, 128) == _optimal_param(threshold, 128, 0.5, 0.5)


def test_bands_and_rows_match_datasketch_elsewhere(ray_session):
    for t, p in [(0.5, 128), (0.95, 128), (0.85, 256), (0.75, 64)]:
        assert mh.optimal_bands(t, p) == _optimal_param(t, p, 0.5, 0.5), (t, p)
    # verify: false keeps datasketch's MinHashLSH rule; verified candidates weight misses 9:1
    assert mh.MinHashParams(threshold=0.7, verify=False).band_rows() == _optimal_param(0.7, 128, 0.5, 0.5)
    assert mh.MinHashParams(threshold=0.7).band_rows() == _optimal_param(0.7, 128, 0.1, 0.9) == (20, 6)
    assert _stage(threshold=0.7, match="caption").decide(_table(["a b c d e f", "a b c d e f"]))[1]["bands"] == 20


def test_bucket_pairs_all_pairs_small_star_and_chain_large():
    row = np.arange(100, dtype=np.int64)
    band = np.zeros(100, np.int64)
    bucket = np.where(row < 3, 1, 2).astype(np.uint64)  # a bucket of 3 and one of 97
    left, right = mh.bucket_pairs(band, bucket, row)
    pairs = set(zip(left.tolist(), right.tolist(), strict=True))
    assert {(0, 1), (0, 2), (1, 2)} <= pairs
    big = {p for p in pairs if p[0] >= 3}
    assert big == {(3, i) for i in range(4, 100)} | {(i, i + 1) for i in range(3, 99)}


# ------------------------------------------------------------------ decisions


def _table(captions, **extra) -> pa.Table:
    return pa.table({"key": [f"k{i:05d}" for i in range(len(captions))], "caption": captions, **extra})


def _planted(rng: random.Random, clusters: int, noise: int):
    """Base captions with near-duplicate variants (true 5-gram Jaccard ≥ 0.85) and distinct noise."""
    captions, cluster = [], []
    for c in range(clusters):
        base = _random_caption(rng, 12, 25)
        variants = [base, base.upper() + "!", base.replace(" ", "  ", 2) + ".",
                    " ".join(base.split()[:-1]) + " " + base.split()[-1].capitalize()]
        words = base.split()
        words.insert(len(words) // 2, "the")
        variants.append(" ".join(words))
        for v in variants:
            sa = set(mh.char_shingles(normalise_caption(base), 5))
            sv = set(mh.char_shingles(normalise_caption(v), 5))
            assert len(sa & sv) / len(sa | sv) >= 0.85
            captions.append(v)
            cluster.append(c)
    for i in range(noise):
        captions.append(_random_caption(rng))
        cluster.append(clusters + i)
    perm = list(range(len(captions)))
    rng.shuffle(perm)
    return [captions[i] for i in perm], [cluster[i] for i in perm]


def test_planted_clusters_recall_precision_and_duplicate_of(ray_session):
    rng = random.Random(0)
    captions, cluster = _planted(rng, clusters=40, noise=400)
    scores = [rng.random() for _ in captions]
    table = _table(captions, score=scores)
    decisions, info = _stage(match="caption", keep=["-score"]).decide(table)
    d = {r["key"]: r for r in decisions.to_pylist()}
    keys = table["key"].to_pylist()
    by_cluster: dict[int, list[int]] = {}
    for i, c in enumerate(cluster):
        by_cluster.setdefault(c, []).append(i)
    should_drop = {keys[i] for c, m in by_cluster.items() if len(m) > 1
                   for i in m if i != max(m, key=lambda j: scores[j])}
    dropped = {k for k, r in d.items() if r["reason"] is not None}
    precision = len(dropped & should_drop) / len(dropped)
    recall = len(dropped & should_drop) / len(should_drop)
    assert precision == 1.0 and recall >= 0.95, (precision, recall)
    for k in dropped & should_drop:  # duplicate_of: the highest-scoring member of its true cluster
        members = by_cluster[cluster[keys.index(k)]]
        assert d[k]["duplicate_of"] == keys[max(members, key=lambda j: scores[j])]
        assert d[k]["reason"] == "duplicate:near_caption"
    assert info["dropped"] == len(dropped) and info["bands"] == 14 and info["rows_per_band"] == 9
    assert sum(info["cluster_sizes"].values()) == info["clusters"] >= 38


def test_short_captions_are_one_shingle_and_empty_never_match(ray_session):
    captions = ["cat", "Cat.", "cats", "", None, "", None, "  ", "a dog"]
    decisions, _ = _stage(match="caption").decide(_table(captions))
    reasons = decisions["reason"].to_pylist()
    dup_of = decisions["duplicate_of"].to_pylist()
    assert reasons[1] == "duplicate:near_caption" and dup_of[1] == "k00000"  # "cat" == "cat" (one shingle)
    assert reasons[2] is None  # "cats" is a different single shingle
    assert reasons[3:8] == [None] * 5  # empty, null, blank: nobody's duplicate
    assert mh.char_shingles("cat", 5) == ["cat"] and mh.word_shingles("a dog", 3) == [("a",), ("dog",), ("a", "dog")]


def _pair_table(**image_cols) -> pa.Table:
    captions = ["stock photo of a dog"] * 4 + ["a red bicycle leaning on a stone wall in the old town"] * 2
    return _table(captions, **image_cols)


def test_match_pair_keeps_distinct_images_that_share_a_caption(ray_session):
    # rows 0,1: one picture (pHash 3 bits apart); rows 2,3: unrelated pictures; rows 4,5: same picture
    phash = pa.array([0x0F0F_0F0F_0F0F_0F0F, 0x0F0F_0F0F_0F0F_0F08, 0x7123_4567_89AB_CDEF,
                      -0x5555_5555_5555_5556, 42, 42], pa.int64())
    by_pair, info = _stage().decide(_pair_table(phash=phash))
    assert by_pair["reason"].to_pylist() == [None, "duplicate:near_pair", None, None, None, "duplicate:near_pair"]
    assert by_pair["duplicate_of"].to_pylist()[1] == "k00000" and info["image_similarity"] == "phash"
    assert info["image_rejected_pairs"] > 0
    by_caption, _ = _stage(match="caption").decide(_pair_table(phash=phash))
    assert by_caption["reason"].to_pylist() == [None] + ["duplicate:near_caption"] * 3 + [None, "duplicate:near_caption"]


def test_match_pair_by_clip_embedding_and_missing_image_feature(ray_session):
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    vecs = [base, base + 0.05 * rng.normal(size=16), rng.normal(size=16), None, base, base]
    emb = pa.array([None if v is None else v.astype(np.float16).tolist() for v in vecs], pa.list_(pa.float16(), 16))
    decisions, info = _stage(image_min_cosine=0.9).decide(_pair_table(clip_image_emb=emb, phash=pa.array([1] * 6, pa.int64())))
    assert info["image_similarity"] == "clip"  # auto prefers the embedding over pHash
    assert decisions["reason"].to_pylist() == [None, "duplicate:near_pair", None, None, None, "duplicate:near_pair"]


def test_match_pair_without_image_features_says_what_to_add(ray_session):
    with pytest.raises(ValueError, match="clip_score.*image_hash.*match: caption"):
        _stage().decide(_pair_table())
    with pytest.raises(ValueError, match="by phash"):
        _stage(image_similarity="phash").decide(_pair_table(clip_image_emb=pa.array([[1.0]] * 6)))
    assert "phash" in _stage().input_columns() and "clip_image_emb" in _stage().input_columns()
    assert _stage(match="caption", keep=["-clip_score"]).input_columns() == ["caption", "clip_score"]


def test_pairs_do_not_depend_on_partitions_or_task_sizes(ray_session, monkeypatch):
    rng = random.Random(3)
    captions, _ = _planted(rng, clusters=20, noise=200)
    params = mh.MinHashParams()
    ref = lsh.near_duplicate_pairs(captions, params)
    monkeypatch.setattr(lsh, "MAX_ROWS_PER_TASK", 37)  # many small map tasks
    for partitions in (1, 3, 8):
        got = lsh.near_duplicate_pairs(captions, params, partitions=partitions)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    assert len(ref[0]) >= 20 * 4


def test_verification_join_equals_comparing_whole_signatures(ray_session, monkeypatch):
    """The verification (left sketches pulled per group of slices, compared per group of right slices)
    keeps exactly the bucket-sharing pairs whose sketches agree on ≥ the threshold, however many groups."""
    rng = random.Random(5)
    captions, _ = _planted(rng, clusters=30, noise=300)
    for _ in range(60):  # pairs near the threshold, so that some candidates fail verification
        words = _random_caption(rng, 12, 16).split()
        captions += [" ".join(words), " ".join(w if rng.random() < 0.75 else rng.choice(WORDS) for w in words)]
    params = mh.MinHashParams(threshold=0.6)
    texts = [normalise_caption(c) for c in captions]
    sig = mh.signatures(texts, params)
    b, r = params.band_rows()
    bucket = mh.band_hashes(sig, b, r).reshape(-1)
    left, right = mh.bucket_pairs(np.tile(np.arange(b, dtype=np.uint8), len(texts)), bucket,
                                  np.repeat(np.arange(len(texts)), b))
    sketch = lsh.verification_sketch(sig)
    agree = (sketch[left] == sketch[right]).mean(axis=1)
    keep = agree >= params.verify_threshold() - 1e-12
    assert 0 < keep.sum() < len(left)  # some candidates are rejected: the verification is exercised
    monkeypatch.setattr(lsh, "MAX_ROWS_PER_TASK", 41)  # 14 sketch slices
    for per_compare, per_pull in ((50, 100), (10**6, 10**7)):  # ~a group per slice or two; one
        monkeypatch.setattr(lsh, "ROWS_PER_COMPARE", per_compare)
        monkeypatch.setattr(lsh, "ROWS_PER_PULL", per_pull)
        stats = lsh.PairStats()
        got = lsh.near_duplicate_pairs(captions, params, stats=stats)
        np.testing.assert_array_equal(got[0], left[keep])
        np.testing.assert_array_equal(got[1], right[keep])
        assert stats.verified_pairs == keep.sum() and stats.compared_pairs == len(left)
        assert stats.candidate_pairs >= len(left)


# ------------------------------------------------------------------ end to end


def _e2e(tmp_path, make_recipe, name: str, rows_per_shard: int, data: pa.Table):
    src = tmp_path / f"{name}.parquet"
    pq.write_table(data, src, row_group_size=rows_per_shard)
    recipe = make_recipe({"source": {"path": str(src), "key_col": "id"},
                          "stages": [{"use": "dedup_minhash", "image_similarity": "phash", "keep": ["-quality"]}],
                          "write": {"output": str(tmp_path / name), "samples_per_shard": rows_per_shard,
                                    "formats": ["parquet"]}}, name=f"{name}.yaml")
    m = run(load_recipe(recipe))
    ledger = pq.read_table(tmp_path / name / "ledger").sort_by("key")
    return m, ledger


def test_end_to_end_ledger_and_shard_count_invariance(tmp_path, make_recipe, ray_session):
    rng = random.Random(5)
    captions, cluster = _planted(rng, clusters=6, noise=30)
    n = len(captions)
    # images: members of a planted cluster share a picture (pHash equal) except cluster 0's, which differ
    phash = [c if c != 0 else rng.getrandbits(63) for c in cluster]  # random: ~32 bits apart
    data = pa.table({"id": [f"s{i:03d}" for i in range(n)], "image": [jpeg_bytes(color=(i, 3, 9)) for i in range(n)],
                     "caption": captions, "phash": pa.array(phash, pa.int64()),
                     "quality": [float(i % 7) for i in range(n)]})
    m1, one = _e2e(tmp_path, make_recipe, "one", n, data)
    m4, many = _e2e(tmp_path, make_recipe, "many", 13, data)
    assert len(m4.shards) > len(m1.shards) == 1
    cols = ["key", "status", "dropped_by", "reason", "duplicate_of"]
    assert one.select(cols).to_pylist() == many.select(cols).to_pylist()
    rows = {r["key"]: r for r in one.to_pylist()}
    for c in range(1, 6):
        members = [r for r in rows.values() if cluster[int(r["key"][1:])] == c]
        kept = [r for r in members if r["status"] == "kept"]
        assert len(kept) == 1 and kept[0]["quality"] == max(r["quality"] for r in members)
        for r in members:
            if r["status"] == "dropped":
                assert (r["dropped_by"], r["reason"], r["duplicate_of"]) == \
                    ("dedup_minhash", "duplicate:near_pair", kept[0]["key"])
    assert all(r["status"] == "kept" for r in rows.values() if cluster[int(r["key"][1:])] in (0,) or
               cluster[int(r["key"][1:])] >= 6)  # cluster 0: near captions, different images; noise
    assert m1.counts.kept == n - 5 * 4
    info = next(s for s in m1.stages if s.name == "dedup_minhash").info
    assert info["cluster_sizes"] == {"5": 5} and info["image_rejected_pairs"] == 10


def test_verification_allows_the_estimates_standard_error():
    """A pair whose true Jaccard is the threshold must not be a coin flip: verify 2σ below it."""
    p = mh.MinHashParams(threshold=0.8, num_perm=128)
    assert p.verify_threshold() == pytest.approx(0.8 - 2 * (0.8 * 0.2 / 128) ** 0.5)
    assert mh.MinHashParams(threshold=0.8, verify_sigmas=0).verify_threshold() == 0.8
    # estimates of pairs at exactly J = 0.8 (binomial over 128 permutations): ~98 % pass, ~50 % at 0.8
    rng = np.random.default_rng(0)
    est = rng.binomial(128, 0.8, 20000) / 128
    assert (est >= p.verify_threshold()).mean() > 0.95
    assert (est >= 0.8).mean() < 0.65
    assert mh.MinHashParams(threshold=0.8, verify=False).verify_threshold() == 0.0  # datasketch's semantics


def test_leader_clusters_do_not_chain_and_follow_the_keep_order():
    """A ~ B ~ C ~ D in a chain: connected components would drop three of four rows as copies of A,
    although A and C share nothing. A row is dropped only as a copy of a row that is kept."""
    from curate.dedup.minhash_kernels import leader_labels

    left, right = np.array([0, 1, 2]), np.array([1, 2, 3])
    assert leader_labels(5, left, right, np.arange(5)).tolist() == [0, 0, 2, 2, 4]
    # preferring the last rows (a keep rule) keeps 3 and 1: 2 joins 3, 0 joins 1
    assert leader_labels(5, left, right, np.arange(5)[::-1]).tolist() == [1, 1, 3, 3, 4]
    # a row matching two kept rows joins the preferred one
    assert leader_labels(3, np.array([0, 1]), np.array([2, 2]), np.array([1, 0, 2])).tolist() == [0, 1, 1]
    assert leader_labels(0, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == []
