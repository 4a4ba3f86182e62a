"""The image layer: sniffing, pixel limit, filters, img2dataset's resize modes, RGBA on white, encoding."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from curate.net.image import ImageOptions, ImageProcessor, plan_resize, sniff
from tests.net.hostile_server import bomb_png, jpeg, png


def process(data: bytes, **opts):
    return ImageProcessor(ImageOptions(**opts))(data)


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_sniff():
    assert sniff(jpeg()) == "jpeg" and sniff(png()) == "png"
    assert sniff(b"<!DOCTYPE html><html>") is None and sniff(b"") is None and sniff(b'{"a": 1}') is None
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "WEBP")
    assert sniff(buf.getvalue()) == "webp"
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "GIF")
    assert sniff(buf.getvalue()) == "gif"


def test_html_is_not_an_image():
    assert process(b"<html><body>404</body></html>").error == "not_an_image"


def test_corrupt_jpeg_is_a_decode_error():
    rng = np.random.default_rng(0)
    corrupt = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    assert process(corrupt).error == "decode_error"
    assert process(jpeg()[:20]).error == "decode_error"  # truncated inside the header


def test_decompression_bomb_is_refused_from_the_header():
    bomb = bomb_png(20000)
    assert len(bomb) < 200_000
    assert process(bomb).error == "decompression_bomb"
    # under Pillow's own hard limit, ours applies
    r = process(bomb_png(3000), max_pixels=1_000_000)
    assert r.error == "decompression_bomb" and r.original_width == 3000


# 1000 x 750 source, image_size 256: expected (width, height) per mode, as img2dataset gives them
@pytest.mark.parametrize("mode,size", [
    ("no", (1000, 750)),
    ("border", (256, 256)),
    ("keep_ratio", (341, 256)),
    ("keep_ratio_largest", (256, 192)),
    ("center_crop", (256, 256)),
])
def test_resize_modes_downscale(mode, size):
    r = process(jpeg((1000, 750)), resize_mode=mode)
    assert r.error is None and (r.width, r.height) == size
    assert (r.original_width, r.original_height) == (1000, 750)
    assert decode(r.image).shape[:2] == (size[1], size[0]) and r.format == "jpg"


@pytest.mark.parametrize("mode,size", [
    ("border", (256, 256)),
    ("keep_ratio", (256, 512)),
    ("keep_ratio_largest", (128, 256)),
    ("center_crop", (256, 256)),
])
def test_resize_modes_upscale(mode, size):
    r = process(jpeg((50, 100)), resize_mode=mode)
    assert (r.width, r.height) == size


def test_resize_only_if_bigger_leaves_small_images_alone():
    r = process(jpeg((50, 100)), resize_mode="border", resize_only_if_bigger=True)
    assert (r.width, r.height) == (50, 100)
    r = process(jpeg((1000, 750)), resize_mode="border", resize_only_if_bigger=True)
    assert (r.width, r.height) == (256, 256)


def test_border_pads_with_white():
    r = process(jpeg((400, 100), color=(0, 0, 0)), resize_mode="border", encode_format="png", encode_quality=3)
    img = decode(r.image)
    assert img.shape == (256, 256, 3)
    assert (img[0, 128] == 255).all() and (img[255, 128] == 255).all()  # padding top/bottom
    assert (img[128, 128] < 10).all()  # the black image in the middle


def test_rounding_matches_albumentations():
    # albumentations: new side = round(side * scale)
    assert plan_resize(333, 500, ImageOptions(resize_mode="keep_ratio")).size == (256, round(500 * 256 / 333))
    assert plan_resize(256, 100, ImageOptions(resize_mode="keep_ratio_largest")).size == (256, 100)


def test_rgba_is_composited_on_white():
    transparent_red = png((40, 40), (255, 0, 0, 0))
    half_red = png((40, 40), (255, 0, 0, 128))
    for data, expected in ((transparent_red, (255, 255, 255)), (half_red, (127, 127, 255))):
        r = process(data, resize_mode="no", encode_format="png", encode_quality=1)
        img = decode(r.image)
        assert img.shape == (40, 40, 3)
        assert np.abs(img[20, 20].astype(int) - np.array(expected)).max() <= 1  # BGR


def test_grayscale_and_16_bit():
    r = process(png((30, 30), 128, mode="L"), resize_mode="no", encode_format="png", encode_quality=1)
    assert decode(r.image).shape == (30, 30)
    buf = io.BytesIO()
    Image.new("I;16", (30, 30), 40000).save(buf, "PNG")
    r = process(buf.getvalue(), resize_mode="no", encode_format="png", encode_quality=1)
    assert r.error is None and decode(r.image).dtype == np.uint8


def test_filters_use_img2dataset_order_and_names():
    assert process(jpeg((100, 300)), min_image_size=200).error == "image_too_small"
    assert process(jpeg((100, 300)), max_image_area=10_000).error == "image_too_large_area"
    assert process(jpeg((100, 301)), max_aspect_ratio=3).error == "image_aspect_ratio"
    assert process(jpeg((100, 300)), max_aspect_ratio=3).error is None
    r = process(jpeg((100, 300)), min_image_size=200)
    assert (r.original_width, r.original_height) == (100, 300)  # known even for dropped rows


def test_encode_formats():
    for fmt, q, magic in (("jpg", 90, "jpeg"), ("png", 9, "png"), ("webp", 80, "webp")):
        r = process(jpeg((300, 200)), encode_format=fmt, encode_quality=q)
        assert r.format == fmt and sniff(r.image) == magic
    with pytest.raises(ValueError):
        ImageProcessor(ImageOptions(encode_format="png", encode_quality=95))


def test_skip_reencode_and_disable_all_reencoding():
    src = jpeg((100, 80))
    assert process(src, resize_mode="no", skip_reencode=True).image == src
    assert process(src, resize_mode="no").image != src
    r = process(png((100, 80)), disable_all_reencoding=True)
    assert r.format == "png" and (r.width, r.height) == (100, 80)


def _real_photo_mosaic(width: int, height: int) -> np.ndarray:
    """Real photographs at their native resolution (scikit-learn's china/flower, matplotlib's
    grace_hopper: dependencies of curate), tiled without resampling to ``width`` x ``height``."""
    import importlib.util
    from pathlib import Path

    def package_dir(name: str) -> Path:  # without importing the package (scikit-learn's import is slow)
        return Path(importlib.util.find_spec(name).submodule_search_locations[0])

    files = [package_dir("sklearn") / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    files.append(package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    tiles = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
    assert all(t is not None for t in tiles)
    rows, k = [], 0
    while sum(r.shape[0] for r in rows) < height:
        row = []
        while sum(t.shape[1] for t in row) < width:
            row.append(tiles[k % len(tiles)])
            k += 1
        hh = min(t.shape[0] for t in row)
        rows.append(np.hstack([t[:hh] for t in row])[:, :width])
    return np.ascontiguousarray(np.vstack(rows)[:height])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# The draft decode's quality floor on real photos: the resized pixels (what the final encode gets)
# within 40 dB PSNR of img2dataset's full decode + INTER_AREA, and the final JPEG no further from
# those reference pixels than the full path's own JPEG is, but for 1 dB (the q95 encode alone is at
# 35-40 dB on such detailed pictures). benchmarks/jpeg_quality.py measures it over 512-4000 px.
# Each case sits just above the smallest margin JPEG_DRAFT_GAP lets through (the worst case), at
# odd sizes (a partial last DCT block), for 1/2 and 1/4 scale decodes and two targets.
@pytest.mark.parametrize("r,target,quality", [(2, 256, 75), (2, 512, 95), (4, 256, 90)])
def test_jpeg_draft_keeps_the_quality_floor_on_real_photos(r, target, quality):
    from curate.net import image as image_mod

    gap = image_mod.JPEG_DRAFT_GAP
    width = int(np.ceil(r * target * gap * 1.02)) | 1
    height = int(np.ceil(width * 0.75)) | 1
    data = cv2.imencode(".jpg", _real_photo_mosaic(width, height), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
    opts = ImageOptions(image_size=target)  # the download recipe's defaults: border, area, jpg 95
    assert opts.jpeg_draft and opts.downscale_interpolation == "area"
    plan = plan_resize(width, height, opts)
    assert image_mod._jpeg_reduction(width, height, plan.size) == r  # the draft decode is used
    tw, th = plan.size
    top = (target - th) // 2  # border pads top and bottom here: compare the picture, not the white

    def picture(res):
        assert res.error is None and (res.width, res.height) == (target, target)
        return decode(res.image)[top:top + th]

    draft_px = picture(process(data, image_size=target, encode_format="png", encode_quality=1))
    full_px = picture(process(data, image_size=target, encode_format="png", encode_quality=1, jpeg_draft=False,
                              fast_area=False))
    assert draft_px.shape == (th, tw, 3)
    assert _psnr(draft_px, full_px) >= 40.0
    draft_out = picture(ImageProcessor(opts)(data))
    full_out = picture(process(data, image_size=target, jpeg_draft=False, fast_area=False))
    assert _psnr(draft_out, full_px) >= _psnr(full_out, full_px) - 1.0


# The fast area path's floor on real photos (native detail: the hardest case): a shrink by 1.6-2x
# done as a 2x linear upscale + an exact 2:1 INTER_AREA, against OpenCV's fractional INTER_AREA
# (img2dataset's path). At the smallest factor it takes (the worst case) and near 2, odd sizes,
# three targets: resized pixels and final q95 JPEGs both within 40 dB PSNR of the exact path's.
@pytest.mark.parametrize("target,quality,above", [(256, 75, 0.01), (384, 90, 0.01), (512, 95, 0.01), (256, 95, 0.33)])
def test_fast_area_keeps_the_quality_floor_on_real_photos(target, quality, above):
    from curate.net import image as image_mod

    factor = image_mod.FAST_AREA_MIN + above
    assert factor < 2
    width = int(np.ceil(target * factor)) | 1
    height = int(np.ceil(width * 0.75)) | 1
    data = cv2.imencode(".jpg", _real_photo_mosaic(width, height), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
    opts = ImageOptions(image_size=target)  # the download recipe's defaults: border, area, jpg 95
    assert opts.fast_area and opts.downscale_interpolation == "area"
    tw, th = plan_resize(width, height, opts).size
    assert image_mod._jpeg_reduction(width, height, (tw, th)) == 1  # a full decode: no draft involved
    top = (target - th) // 2

    def picture(**kw):
        res = process(data, image_size=target, **kw)
        assert res.error is None and (res.width, res.height) == (target, target)
        return decode(res.image)[top:top + th]

    fast_px, exact_px = (picture(encode_format="png", encode_quality=1, fast_area=f) for f in (True, False))
    assert not np.array_equal(fast_px, exact_px)  # the fast path was taken
    assert _psnr(fast_px, exact_px) >= 40.0
    assert _psnr(picture(), picture(fast_area=False)) >= 40.0


@pytest.mark.parametrize("factor", [1.3, 1.55, 2.0, 2.4])
def test_fast_area_only_between_its_bounds(factor):
    """Outside [FAST_AREA_MIN, 2) the shrink is OpenCV's INTER_AREA itself, pixel for pixel."""
    width = int(round(256 * factor))
    img = _real_photo_mosaic(width, width)
    data = cv2.imencode(".png", img)[1].tobytes()
    fast, exact = (decode(process(data, image_size=256, encode_format="png", encode_quality=1,
                                         fast_area=f).image) for f in (True, False))
    assert np.array_equal(fast, exact)
    assert np.array_equal(exact, cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA))


def test_jpeg_draft_resizes_on_the_full_decodes_grid():
    """An odd-sized JPEG's 1/2-scale decode has a partial last column; the output must not be stretched."""
    from curate.net.image import _resize_reduced

    ramp = np.ascontiguousarray(np.broadcast_to(np.arange(1001, dtype=np.float32)[None, :], (8, 1001)))
    # what the scaled IDCT gives: 2x2 means of the source padded to whole blocks by edge replication
    half = cv2.resize(cv2.copyMakeBorder(ramp, 0, 0, 0, 1, cv2.BORDER_REPLICATE), (501, 4), interpolation=cv2.INTER_AREA)
    ref = cv2.resize(ramp, (100, 1), interpolation=cv2.INTER_AREA)  # full decode + INTER_AREA
    out = _resize_reduced(half, 1001, 8, 2, (100, 1), cv2.INTER_AREA)
    assert out.shape == ref.shape and np.abs(out - ref).max() < 0.1  # in source pixels
    naive = cv2.resize(half, (100, 1), interpolation=cv2.INTER_AREA)
    assert np.abs(naive - ref).max() > 0.5  # the plain resize drifts by up to a source pixel
