"""The synthetic world: deterministic, with every planted category in the expected count."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import pytest
from PIL import Image

from curate.demo.captions import (
    DISTINCT_MAX_JACCARD,
    NEAR_DUPLICATE_MIN_JACCARD,
    CaptionIndex,
    jaccard,
    normalise,
)
from curate.demo.scenes import tag_vocabulary
from curate.demo.world import (
    CATEGORIES,
    CLEAN,
    DEFECT_RATES,
    DUPLICATE_CATEGORIES,
    World,
    category_counts,
    generate_world,
)


def _file_digests(world: World) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((world.root / "files").iterdir())}


def test_same_seed_same_world_other_seed_other_world(tmp_path, small_world):
    again = generate_world(tmp_path / "a", samples=small_world.samples, seed=3)
    assert again.truth.equals(small_world.truth)
    assert _file_digests(again) == _file_digests(small_world)
    other = generate_world(tmp_path / "b", samples=small_world.samples, seed=4)
    assert other.truth["caption"].to_pylist() != small_world.truth["caption"].to_pylist()


def test_category_counts_follow_the_rates():
    counts = category_counts(2000)
    assert counts["mismatched_caption"] == 80 and counts["slow_drip"] == 5 and counts["dead_link"] == 40
    assert sum(counts.values()) == 2000
    assert 0.25 <= 1 - counts[CLEAN] / 2000 <= 0.35  # a realistic share of defects
    assert set(category_counts(40)) == set(CATEGORIES) and min(category_counts(40).values()) >= 1
    with pytest.raises(ValueError, match="at least"):
        category_counts(10)


def test_world_has_every_category_in_its_count(small_world):
    assert small_world.counts() == category_counts(small_world.samples)
    assert set(small_world.counts()) == {CLEAN, *DEFECT_RATES}
    assert json.loads((small_world.root / "world.json").read_text())["counts"] == category_counts(small_world.samples)


def test_input_carries_no_truth(small_world):
    urls = small_world.url_list("http://127.0.0.1:9")
    assert urls.column_names == ["url", "caption", "source"]
    paths = [u.split(":9", 1)[1] for u in urls["url"].to_pylist()]
    assert len(set(paths)) == small_world.samples  # every row has its own URL, even exact duplicates
    assert all(p.startswith("/img/") for p in paths)  # the path says nothing about the category


def _rows(world: World, category: str) -> list[dict]:
    return [r for r in world.truth.to_pylist() if r["category"] == category]


def _open(world: World, row: dict) -> Image.Image:
    return Image.open(io.BytesIO((world.root / row["file"]).read_bytes()))


def test_image_defects_have_the_planted_sizes(small_world):
    for r in _rows(small_world, CLEAN):
        img = _open(small_world, r)
        assert img.size == (r["width"], r["height"])
        assert min(img.size) >= 256 and max(img.size) / min(img.size) <= 1.6
    assert all(min(r["width"], r["height"]) < 200 for r in _rows(small_world, "tiny_image"))
    for r in _rows(small_world, "elongated_image"):
        assert max(r["width"], r["height"]) / min(r["width"], r["height"]) > 3 and min(r["width"], r["height"]) >= 200
    formats = Counter(_open(small_world, r).mode for r in small_world.truth.to_pylist()
                      if r["behaviour"] == "ok")
    assert formats["RGB"] and formats["RGBA"]  # JPEG and PNG, some with an alpha channel


def test_captions(small_world):
    clean = _rows(small_world, CLEAN)
    # Clean captions are unique after normalisation: exact caption dedup must not remove any.
    assert len({normalise(r["caption"]) for r in clean}) == len(clean)
    assert all(len(r["caption"].split()) >= 3 and r["caption_language"] == "en" for r in clean)
    for r in _rows(small_world, "non_english"):
        assert r["caption_language"] in ("de", "fr", "es") and len(r["caption"].split()) >= 4
    assert all(not (r["caption"] or "").strip() for r in _rows(small_world, "empty_caption"))
    assert all(not r["caption_matches"] for r in _rows(small_world, "mismatched_caption"))
    for r in _rows(small_world, "mismatched_caption"):
        objects = json.loads(r["objects"])
        assert not any(f"{o['colour']} {o['shape']}" in r["caption"] for o in objects)


def test_captions_of_distinct_rows_are_not_near_duplicates(small_world):
    # Only a duplicate group's members may be caption near-duplicates of each other: any other
    # pair under dedup_minhash's threshold by a margin, so its truth is not in doubt.
    rows = [r for r in small_world.truth.to_pylist() if (r["caption"] or "").strip()]
    worst = 0.0
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if not (a["dup_group"] and a["dup_group"] == b["dup_group"]):
                worst = max(worst, jaccard(a["caption"], b["caption"]))
    assert worst < DISTINCT_MAX_JACCARD


def test_caption_index_is_exact_jaccard():
    caps = ["two small yellow diamonds against a plain white backdrop", "a red star", "Red star!", "",
            "three small yellow diamonds against a plain white backdrop", "a small blue circle"]
    index = CaptionIndex()
    for c in caps[:4]:
        index.add(c)
    for c in caps:
        assert list(index.jaccards(c)) == pytest.approx([jaccard(c, d) for d in caps[:4]])
    assert jaccard("a red star", "Red star!") < 1 and jaccard("A red star.", "a red star") == 1.0
    assert index.max_jaccard(caps[4]) == pytest.approx(0.86, abs=0.01)
    assert index.max_jaccard(caps[0], skip=0) < 0.5


def test_duplicate_groups(small_world):
    rows = small_world.truth.to_pylist()
    groups: dict[str, dict[str, tuple[int, dict]]] = {}
    for i, r in enumerate(rows):
        if r["dup_group"]:
            groups.setdefault(r["dup_group"], {})[r["dup_role"]] = (i, r)
    assert len(groups) == sum(category_counts(small_world.samples)[c] for c in DUPLICATE_CATEGORIES)
    for members in groups.values():
        (oi, orig), (ci, copy) = members["original"], members["copy"]
        assert oi < ci and orig["category"] == CLEAN and copy["category"] in DUPLICATE_CATEGORIES
        assert orig["objects"] == copy["objects"] and orig["path"] != copy["path"]
        same_bytes = orig["sha256"] == copy["sha256"]
        assert same_bytes == (copy["category"] == "exact_duplicate")
        same_caption = normalise(orig["caption"]) == normalise(copy["caption"])
        assert same_caption == (copy["category"] == "caption_duplicate")
        if copy["category"] == "caption_near_duplicate":
            assert orig["caption"] in copy["caption"]
            assert jaccard(orig["caption"], copy["caption"]) >= NEAR_DUPLICATE_MIN_JACCARD
        if copy["category"] in ("caption_duplicate", "caption_near_duplicate"):
            # the original's picture mirrored: same size, the same pixels left to right
            a = _open(small_world, orig).convert("RGBA")
            white = Image.new("RGBA", a.size, (255, 255, 255, 255))
            a = Image.alpha_composite(white, a).convert("L").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            b = _open(small_world, copy).convert("L")
            assert a.size == b.size
            diff = sum(abs(x - y) for x, y in zip(a.getdata(), b.getdata(), strict=True)) / (a.width * a.height)
            assert diff < 4


def test_url_behaviours(small_world):
    rows = {r["category"]: r for r in small_world.truth.to_pylist()}
    assert rows["dead_link"]["file"] is None and rows["dead_link"]["behaviour"] == "not_found"
    corrupt = (small_world.root / rows["corrupt_bytes"]["file"]).read_bytes()
    assert corrupt[:2] == b"\xff\xd8"  # sniffs as a JPEG
    with pytest.raises(OSError):
        Image.open(io.BytesIO(corrupt)).load()
    assert (small_world.root / rows["html_as_image"]["file"]).read_bytes().startswith(b"<!DOCTYPE html>")
    assert rows["html_as_image"]["content_type"] == "image/jpeg"
    assert "noai" in rows["opt_out"]["robots"] or "noimageai" in rows["opt_out"]["robots"]
    assert rows["slow_drip"]["behaviour"] == "drip"


def test_tags(small_world):
    vocab = tag_vocabulary()
    assert (small_world.root / "tags.txt").read_text().split("\n")[:-1] == vocab
    assert len(vocab) == len(set(vocab)) == 8 + 6 + 48 + 3
    for r in small_world.truth.to_pylist()[:20]:
        assert f"{r['background']} background" in r["tags"] and set(r["colours"]) <= set(r["tags"])
        assert set(r["tags"]) <= set(vocab)


def test_reuses_a_matching_world(tmp_path):
    w = generate_world(tmp_path, samples=40, seed=1)
    stamp = (tmp_path / "truth.parquet").stat().st_mtime_ns
    assert generate_world(tmp_path, samples=40, seed=1).truth.equals(w.truth)
    assert (tmp_path / "truth.parquet").stat().st_mtime_ns == stamp
    assert generate_world(tmp_path, samples=41, seed=1).samples == 41
