"""image_hash and dedup_exact `by: pixels`: lossless re-encodes are exact copies; lineage; shard independence."""

from __future__ import annotations

import hashlib
import io
import random

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.errors import CurateError
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.dedup_exact import DedupExact, DedupExactConfig
from curate.stages.image_hash import ImageHash, ImageHashConfig
from tests.conftest import write_tar


def _scene(seed: int, size=(96, 72)) -> Image.Image:
    """A small image with structure (random rectangles), distinct per seed."""
    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    px = im.load()
    for _ in range(6):
        x0, y0 = rng.randrange(size[0] - 10), rng.randrange(size[1] - 10)
        w, h = rng.randrange(5, 40), rng.randrange(5, 30)
        c = tuple(rng.randrange(256) for _ in range(3))
        for x in range(x0, min(size[0], x0 + w)):
            for y in range(y0, min(size[1], y0 + h)):
                px[x, y] = c
    return im


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _table(images: list[bytes | None], keys: list[str] | None = None) -> pa.Table:
    n = len(images)
    return pa.table({"key": keys or [f"{i:04d}" for i in range(n)], "url": [None] * n, "caption": ["c"] * n,
                     "status": ["kept"] * n, "dropped_by": pa.nulls(n, pa.string()),
                     "reason": pa.nulls(n, pa.string()), "image": pa.array(images, pa.binary()),
                     "sha256": [hashlib.sha256(b).hexdigest() if b else None for b in images]})


def test_lossless_reencode_has_same_pixel_hash_and_phash_matches_imagehash():
    im = _scene(1)
    a, b = _png(im, compress_level=1), _png(im, compress_level=9, optimize=True)
    webp = io.BytesIO()
    im.save(webp, "WEBP", lossless=True)
    assert a != b
    out = ImageHash(ImageHashConfig())(_table([a, b, webp.getvalue(), _png(_scene(2)), _jpeg(im)]))
    pix = out["pixel_sha256"].to_pylist()
    assert pix[0] == pix[1] == pix[2]
    assert len({pix[0], pix[3], pix[4]}) == 3  # another image, and a lossy copy, are not pixel-equal
    ph = out["phash"].to_pylist()
    expected = int(str(imagehash.phash(im)), 16)
    assert ph[0] == np.array(expected, dtype=np.uint64).view(np.int64)
    assert out["phash"].type == pa.int64() and out["status"].to_pylist() == ["kept"] * 5


def test_transparency_is_composited_on_white_like_download():
    rgba = Image.new("RGBA", (40, 30), (10, 200, 10, 0))  # fully transparent: white once composited
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    out = ImageHash(ImageHashConfig())(_table([_png(rgba), _png(white)]))
    assert out["pixel_sha256"][0] == out["pixel_sha256"][1]


def test_undecodable_and_missing_images_are_dropped_with_a_reason():
    out = ImageHash(ImageHashConfig())(_table([_jpeg(_scene(3))[:40] + b"\x00" * 50, None, _png(_scene(3))]))
    assert out["reason"].to_pylist() == ["image_decode_error", "image_missing", None]
    assert out["dropped_by"].to_pylist() == ["image_hash", "image_hash", None]
    assert out["phash"].to_pylist()[:2] == [None, None]


def test_by_pixels_catches_reencodes_and_names_the_kept_key():
    im1, im2 = _scene(10), _scene(11)
    imgs = [_png(im1), _png(im2), _png(im1, compress_level=9), _png(im2, optimize=True), _jpeg(im1)]
    hashed = ImageHash(ImageHashConfig())(_table(imgs, ["b", "a", "c", "e", "d"]))
    d, info = DedupExact(DedupExactConfig(by=["image", "pixels"], hash_images=False)).decide(hashed)
    got = dict(zip(d["key"].to_pylist(), zip(d["reason"].to_pylist(), d["duplicate_of"].to_pylist(),
                                             strict=True), strict=True))
    assert got == {"a": (None, None), "b": (None, None), "c": ("duplicate:exact_pixels", "b"),
                   "e": ("duplicate:exact_pixels", "a"), "d": (None, None)}  # the lossy JPEG is no exact copy
    assert info["pixels"] == {"dropped": 2, "cluster_sizes": {"2": 2}} and info["image"]["dropped"] == 0


def test_missing_pixel_column_says_what_to_add():
    with pytest.raises(CurateError, match="use: image_hash"):
        DedupExact(DedupExactConfig(by=["pixels"], hash_images=False)).decide(_table([b"x"]))


def test_sugar_adds_an_image_hash_stage_only_when_needed(make_recipe):
    def uses(stages):
        r = load_recipe(make_recipe({"source": {"path": "x.parquet"}, "stages": stages}))
        return [(s.use, s.name) for s in r.stages]

    assert uses([{"use": "dedup_exact", "by": ["image", "pixels"]}]) == [
        ("image_hash", "dedup_exact_hash"), ("dedup_exact", None)]
    assert uses([{"use": "dedup_exact", "by": ["pixels"], "hash_images": False}]) == [("dedup_exact", None)]
    assert uses([{"use": "dedup_exact"}]) == [("dedup_exact", None)]


def _planted(tmp_path, n_shards: int):
    """40 distinct images, 8 byte-identical copies and 8 lossless PNG re-encodes, spread over shards."""
    samples, truth = [], {}
    for i in range(40):
        samples.append({"__key__": f"k{i:03d}", "png": _png(_scene(100 + i)), "txt": f"scene {i}"})
    for j in range(8):
        samples.append({"__key__": f"x{j:03d}", "png": _png(_scene(100 + j)), "txt": f"copy {j}"})
        truth[f"x{j:03d}"] = ("duplicate:exact_image", f"k{j:03d}")
    for j in range(8, 16):
        samples.append({"__key__": f"y{j:03d}", "png": _png(_scene(100 + j), compress_level=9, optimize=True),
                        "txt": f"re-encode {j}"})
        truth[f"y{j:03d}"] = ("duplicate:exact_pixels", f"k{j:03d}")
    random.Random(n_shards).shuffle(samples)
    src = tmp_path / f"src{n_shards}"
    per = -(-len(samples) // n_shards)
    for s in range(n_shards):
        write_tar(src / f"{s:02d}.tar", samples[s * per:(s + 1) * per])
    return src, truth


@pytest.mark.parametrize("n_shards", [1, 4])
def test_end_to_end_ledger_lineage_same_for_any_shard_count(tmp_path, make_recipe, ray_session, n_shards):
    src, truth = _planted(tmp_path, n_shards)
    recipe = make_recipe({"source": {"path": str(src)},
                          "stages": [{"use": "dedup_exact", "by": ["image", "pixels"]}],
                          "write": {"output": str(tmp_path / "out"), "formats": ["parquet"]}})
    m = run(load_recipe(recipe))
    assert m.counts.input == 56 and m.counts.kept == 40
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pylist()
    dropped = {r["key"]: (r["reason"], r["duplicate_of"]) for r in ledger if r["status"] == "dropped"}
    assert dropped == truth
    assert {r["dropped_by"] for r in ledger if r["status"] == "dropped"} == {"dedup_exact"}
    info = next(s for s in m.stages if s.name == "dedup_exact").info
    assert info["pixels"]["cluster_sizes"] == {"2": 8}
