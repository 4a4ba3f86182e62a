"""dedup_phash: exact banded search against brute force, resized/re-encoded copies, sugar, shard independence."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from curate.dedup import phash
from curate.dedup.phash import (
    Band,
    SearchStats,
    band_layout,
    distinct_hashes,
    hamming,
    near_pairs,
    near_value_pairs,
    plan_bands,
)
from curate.errors import CurateError
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.dedup_phash import DedupPhash, DedupPhashConfig
from curate.stages.image_hash import ImageHash, ImageHashConfig
from tests.conftest import write_tar


def _photo(seed: int, size=(160, 120)) -> Image.Image:
    """A structured, photo-like test image: random rectangles and ellipses, slightly blurred."""
    from PIL import ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        box = [x0, y0, x0 + rng.randrange(10, 80), y0 + rng.randrange(10, 60)]
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    return im.filter(ImageFilter.GaussianBlur(1.5))


def _encode(im: Image.Image, fmt="JPEG", quality=90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _copy(im: Image.Image, kind: int) -> bytes:
    """Resized and/or re-encoded copies, as the web makes them."""
    w, h = im.size
    if kind == 0:
        return _encode(im, quality=55)
    if kind == 1:
        return _encode(im.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC), quality=90)
    if kind == 2:
        return _encode(im.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.LANCZOS), quality=70)
    return _encode(im.resize((w // 2, h // 2), Image.Resampling.BILINEAR), fmt="PNG")


def _flip(x: np.ndarray, bits) -> np.ndarray:
    y = x.copy()
    for b in bits:
        y ^= np.int64(1) << np.int64(b)
    return y


@pytest.mark.parametrize("max_distance", [0, 3, 10])
def test_banded_search_equals_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    base = rng.integers(-2**63, 2**63 - 1, 1500, dtype=np.int64)
    near = [_flip(base[i:i + 1], rng.choice(64, rng.integers(0, 14), replace=False))[0] for i in range(300)]
    h = np.concatenate([base, np.array(near, np.int64), base[:20]])  # also exact repeats
    left, right, candidates = near_pairs(h, max_distance)
    got = set(zip(left.tolist(), right.tolist(), strict=True))
    d = hamming(h[:, None], h[None, :])
    i, j = np.nonzero(np.triu(d <= max_distance, 1))
    assert got == set(zip(i.tolist(), j.tolist(), strict=True))
    assert len(got) == len(left)  # each pair reported once, in its first colliding band
    assert len(got) >= 20 and candidates >= len(got)


def _planted(seed: int, n: int, max_distance: int):
    """n random hashes, a third with a neighbour at 0..max_distance+3 bits, some exact repeats."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    near = [_flip(base[i:i + 1], rng.choice(64, rng.integers(0, max_distance + 4), replace=False))[0]
            for i in range(n // 3)]
    return np.concatenate([base, np.array(near, np.int64), base[:10]])


def _brute(h: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    i, j = np.nonzero(np.triu(hamming(h[:, None], h[None, :]) <= max_distance, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("max_distance", [2, 6, 10])
def test_multi_index_plans_equal_brute_force(max_distance):
    """Wide bands with radii (the plan at scale) find exactly the brute-force pairs, each once."""
    h = _planted(max_distance, 2400, max_distance)
    truth = _brute(h, max_distance)
    values, inverse = distinct_hashes(h)
    plans = [plan_bands(n, max_distance) for n in (10, 10**6, 10**7)]
    plans.append([Band(0, 30, max_distance // 2), Band(30, 34, max_distance - max_distance // 2 - 1)])
    for bands in plans:
        assert sum(b.radius + 1 for b in bands) == max_distance + 1 and sum(b.width for b in bands) == 64
        stats = SearchStats()
        vl, vr = near_value_pairs(values, max_distance, bands=bands, stats=stats)
        left, right = phash.expand_pairs(inverse, vl, vr)
        got = list(zip(left.tolist(), right.tolist(), strict=True))
        assert set(got) == truth and len(got) == len(truth), [(b.width, b.radius) for b in bands]
        assert phash.pair_count(inverse, vl, vr) == len(truth) and stats.candidates >= len(vl)
    assert len(truth) > 300  # the planted neighbours and repeats, not just chance pairs


def test_plan_grows_wider_bands_with_n():
    small, large = plan_bands(100, 10), plan_bands(10**6, 10)
    assert len(small) > len(large) and max(b.radius for b in large) >= 2
    assert plan_bands(5, 0) == [Band(0, 64, 0)]


def test_ray_tasks_give_the_same_pairs_whatever_their_number(ray_session, monkeypatch):
    monkeypatch.setattr(phash, "RAY_MIN_HASHES", 2)
    h = _planted(7, 3000, 10)
    values, _ = distinct_hashes(h)
    bands = plan_bands(10**6, 10)  # wide bands with radii: many masks to share out
    ref = near_value_pairs(values, 10, bands=bands)
    for tasks in (1, 4, 13):
        stats = SearchStats()
        got = near_value_pairs(values, 10, bands=bands, use_ray=True, tasks=tasks, stats=stats)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
        assert stats.tasks >= min(tasks, len(bands))


def test_band_layout_covers_all_bits():
    assert band_layout(10)[-1] == (59, 5) and sum(w for _, w in band_layout(10)) == 64
    with pytest.raises(ValueError, match="max_distance"):
        band_layout(64)


def _table(images, keys):
    n = len(images)
    return pa.table({"key": keys, "url": [None] * n, "caption": ["c"] * n, "status": ["kept"] * n,
                     "dropped_by": pa.nulls(n, pa.string()), "reason": pa.nulls(n, pa.string()),
                     "image": pa.array(images, pa.binary())})


def test_resized_and_reencoded_copies_found_distinct_images_kept():
    originals = [_photo(s) for s in range(60)]
    images, keys, truth = [], [], {}
    for i, im in enumerate(originals):
        images.append(_encode(im))
        keys.append(f"o{i:03d}")
    for i in range(0, 60, 3):  # 20 copies of 4 kinds
        images.append(_copy(originals[i], i % 4))
        keys.append(f"p{i:03d}")
        truth[f"p{i:03d}"] = f"o{i:03d}"
    hashed = ImageHash(ImageHashConfig())(_table(images, keys))
    d, info = DedupPhash(DedupPhashConfig(hash_images=False)).decide(hashed)
    found = {k: o for k, r, o in zip(d["key"].to_pylist(), d["reason"].to_pylist(), d["duplicate_of"].to_pylist(),
                                       strict=True) if r is not None}
    assert set(d["reason"].to_pylist()) == {None, "duplicate:near_image"}
    assert found == truth  # recall 1 and precision 1, each copy points at its original
    assert info["dropped"] == 20 and info["cluster_sizes"] == {"2": 20}
    assert info["bands"] == len(plan_bands(80, 10)) and info["hash_pairs"] == info["pairs"] == 20


def test_keep_rule_picks_the_representative():
    im = _photo(7)
    t = ImageHash(ImageHashConfig())(_table([_encode(im), _copy(im, 1), _copy(im, 2), _encode(im)],
                                            ["a", "b", "c", "n"]))
    # a row without a hash (as from a source that carries the column) is never matched
    t = t.set_column(t.schema.get_field_index("phash"), "phash",
                     pa.array(t["phash"].to_pylist()[:3] + [None], pa.int64()))
    t = t.append_column("clip_score", pa.array([0.1, 0.9, 0.5, 1.0], pa.float32()))
    d, info = DedupPhash(DedupPhashConfig(keep=["-clip_score"])).decide(t)
    assert d["duplicate_of"].to_pylist() == ["b", None, "b", None]
    assert d["reason"].to_pylist() == ["duplicate:near_image", None, "duplicate:near_image", None]
    assert info["hashed"] == 3


def test_missing_phash_column_says_what_to_add():
    with pytest.raises(CurateError, match="use: image_hash"):
        DedupPhash(DedupPhashConfig()).decide(pa.table({"key": ["a"]}))


def test_sugar_expands_to_hash_stage_and_global(make_recipe):
    r = load_recipe(make_recipe({"source": {"path": "x.parquet"},
                                 "stages": [{"use": "dedup_phash", "name": "near", "max_distance": 6},
                                            {"use": "dedup_phash", "name": "again", "hash_images": False}]}))
    assert [(s.use, s.name) for s in r.stages] == [("image_hash", "near_hash"), ("dedup_phash", "near"),
                                                  ("dedup_phash", "again")]


def _world(tmp_path, n_shards):
    originals = [_photo(100 + s) for s in range(30)]
    samples, truth = [], {}
    for i, im in enumerate(originals):
        samples.append({"__key__": f"k{i:03d}", "jpg": _encode(im), "txt": f"image {i}"})
    for i in range(0, 30, 2):
        key = f"z{i:03d}"
        samples.append({"__key__": key, ("png" if i % 8 == 6 else "jpg"): _copy(originals[i], i % 4),
                        "txt": f"copy {i}"})
        truth[key] = f"k{i:03d}"
    samples.append({"__key__": "bad", "jpg": b"\xff\xd8\xff" + b"\x00" * 64, "txt": "corrupt"})
    random.Random(n_shards).shuffle(samples)
    per = -(-len(samples) // n_shards)
    src = tmp_path / f"src{n_shards}"
    for s in range(n_shards):
        write_tar(src / f"{s}.tar", samples[s * per:(s + 1) * per])
    return src, truth


@pytest.mark.parametrize("n_shards", [1, 3])
def test_end_to_end_recipe_ledger_is_shard_independent(tmp_path, make_recipe, ray_session, n_shards,
                                                       monkeypatch):
    monkeypatch.setattr(phash, "RAY_MIN_HASHES", 2)  # the search runs as Ray tasks, as at scale
    src, truth = _world(tmp_path, n_shards)
    recipe = make_recipe({"source": {"path": str(src)}, "stages": [{"use": "dedup_phash"}],
                          "write": {"output": str(tmp_path / "out"), "formats": ["parquet"]}})
    m = run(load_recipe(recipe))
    assert m.counts.input == 46 and m.counts.kept == 30
    ledger = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "ledger").to_pylist()}
    assert ledger["bad"]["dropped_by"] == "dedup_phash_hash" and ledger["bad"]["reason"] == "image_decode_error"
    dups = {k: r["duplicate_of"] for k, r in ledger.items() if r["reason"] == "duplicate:near_image"}
    assert dups == truth
    assert all(ledger[k]["dropped_by"] == "dedup_phash" for k in dups)
    info = next(s for s in m.stages if s.name == "dedup_phash").info
    assert info["cluster_sizes"] == {"2": 15} and info["hashed"] == 45 and info["search_tasks"] > 1
    shard = pq.read_table(tmp_path / "out" / "parquet")
    assert shard["phash"].type == pa.int64() and "pixel_sha256" in shard.column_names


def _flat(colour, quality=90) -> bytes:
    """A low-texture image: one square on white. pHash ignores the colour (grey DCT signs)."""
    im = Image.new("RGB", (120, 120), (255, 255, 255))
    im.paste(colour, (40, 40, 80, 80))
    return _encode(im, quality=quality)


def test_min_cosine_keeps_colliding_low_texture_images_apart():
    images = [_flat((220, 20, 20)), _flat((20, 20, 220)), _flat((220, 20, 20), quality=60)]
    t = ImageHash(ImageHashConfig())(_table(images, ["red", "blue", "red2"]))
    red, blue, _ = t["phash"].to_pylist()
    assert hamming(np.int64(red), np.int64(blue)) <= 10  # a collision at the default distance
    emb = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.999, 0.04, 0, 0]], np.float16)  # blue is another image
    t = t.append_column("clip_image_emb", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4))
    plain, _ = DedupPhash(DedupPhashConfig(hash_images=False)).decide(t)
    assert plain["duplicate_of"].to_pylist() == ["blue", None, "blue"]
    d, info = DedupPhash(DedupPhashConfig(hash_images=False, min_cosine=0.95)).decide(t)
    assert d["duplicate_of"].to_pylist() == [None, None, "red"]
    assert info["hash_pairs"] >= 2 and info["pairs"] == 1
    with pytest.raises(CurateError, match="keep_embeddings"):
        DedupPhash(DedupPhashConfig(min_cosine=0.9)).decide(t.drop(["clip_image_emb"]))
    assert DedupPhash(DedupPhashConfig(min_cosine=0.9)).input_columns() == ["phash", "clip_image_emb"]
