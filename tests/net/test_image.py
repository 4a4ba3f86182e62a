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


def test_jpeg_draft_gives_the_same_geometry_and_close_pixels():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 255, 1600)[None, :, None] * np.ones((1200, 1, 3))
    noisy = np.clip(x + rng.normal(0, 5, (1200, 1600, 3)), 0, 255).astype(np.uint8)
    data = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    fast = process(data, jpeg_draft=True, encode_format="png", encode_quality=1)
    full = process(data, jpeg_draft=False, encode_format="png", encode_quality=1)
    assert (fast.width, fast.height) == (full.width, full.height) == (256, 256)
    diff = np.abs(decode(fast.image).astype(int) - decode(full.image).astype(int))
    assert diff.mean() < 2.0
