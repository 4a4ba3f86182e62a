"""The download stage: on a batch directly (fast), then end to end through the runner on Ray."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate import rows
from curate.errors import RecipeError
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.base import StageContext
from curate.stages.download import FAILED_TO_RESIZE, Download, DownloadConfig
from tests.net.hostile_server import GOOD_JPEG, HostileServer, bomb_png, jpeg, png

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
FAST = {"timeout": 1.5, "allow_private_networks": True, "retry_backoff": 0.05, "max_bytes": 1 << 20}


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer() as s:
        yield s


def _batch(urls: list[str | None], **extra: list) -> pa.Table:
    n = len(urls)
    return pa.table({
        rows.KEY: [f"{i:09d}" for i in range(n)], rows.URL: pa.array(urls, pa.string()),
        rows.CAPTION: [f"caption {i}" for i in range(n)], rows.STATUS: [rows.KEPT] * n,
        rows.DROPPED_BY: pa.nulls(n, pa.string()), rows.REASON: pa.nulls(n, pa.string()), **extra,
    })


def _run_stage(table: pa.Table, **options) -> pa.Table:
    stage = Download(DownloadConfig(**{**FAST, **options}))
    try:
        return stage(table)
    finally:
        stage.teardown()


def _hostile_world(s: HostileServer) -> dict[str, tuple[str | None, str | None]]:
    """name → (url, expected reason or None for kept), covering every hostile case."""
    big = jpeg((900, 600), (10, 120, 200))
    w: dict[str, tuple[str | None, str | None]] = {
        "good_big": (s.add("big.jpg", big), None),
        "good_small_upscaled": (s.add("small.jpg", jpeg((40, 30))), None),
        "rgba_png": (s.add("rgba.png", png((300, 200), (0, 0, 255, 0)), "image/png"), None),
        "jpeg_as_text": (s.add("jpeg.txt", GOOD_JPEG, "text/plain"), None),
        "chain_ok": (s.url("/chain/2"), None),
        "flaky_ok": (s.url(f"/flaky/e2e{time.monotonic_ns()}?fail=1&status=503"), None),
        "html_as_jpeg": (s.add("page.jpg", b"<!doctype html><html>nope</html>", "image/jpeg"), "not_an_image"),
        "corrupt_jpeg": (s.add("corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8), "decode_error"),
        "bomb": (s.add("bomb.png", bomb_png(20000), "image/png"), "decompression_bomb"),
        "tiny": (s.add("tiny.jpg", jpeg((8, 8))), "image_too_small"),
        "panorama": (s.add("pano.jpg", jpeg((400, 40))), "image_aspect_ratio"),
        "missing": (s.url("/static/nothing-here.jpg"), "http_404"),
        "server_error": (s.add("err.jpg", b"boom", "text/plain", status=500), "http_500"),
        "drip": (s.url("/drip"), "timeout"),
        "hang": (s.url("/hang"), "timeout"),
        "huge": (s.url("/huge"), "too_large"),
        "huge_chunked": (s.url("/huge-chunked"), "too_large"),
        "loop": (s.url("/loop/a"), "redirect_loop"),
        "too_many_redirects": (s.url("/chain/9"), "too_many_redirects"),
        "noai": (s.add("noai.jpg", GOOD_JPEG, headers={"X-Robots-Tag": "noai"}), "opt_out:noai"),
        "mybot_noimageai": (s.add("mybot.jpg", GOOD_JPEG, headers={"X-Robots-Tag": "mybot: noimageai"}),
                            "opt_out:noimageai"),
        "otherbot_noai": (s.add("otherbot.jpg", GOOD_JPEG, headers={"X-Robots-Tag": "otherbot: noai"}), None),
        "ftp": ("ftp://127.0.0.1/x.jpg", "bad_scheme"),
        "file": ("file:///etc/passwd", "bad_scheme"),
        "null_url": (None, "missing_url"),
        "empty_url": ("  ", "missing_url"),
    }
    return w


STAGE_OPTS = {"min_image_size": 16, "max_aspect_ratio": 3.0, "max_redirects": 5, "retries": 1,
              "user_agent_token": "mybot"}


def test_stage_on_a_batch_marks_every_row(server):
    world = _hostile_world(server)
    names = list(world)
    t0 = time.monotonic()
    out = _run_stage(_batch([world[n][0] for n in names]), **STAGE_OPTS)
    elapsed = time.monotonic() - t0
    got = dict(zip(names, out[rows.REASON].to_pylist(), strict=True))
    assert got == {n: world[n][1] for n in names}
    # hostile rows run concurrently: the batch costs about one deadline, not one per hostile row
    assert elapsed < 3 * FAST["timeout"] + 2
    table = {n: r for n, r in zip(names, out.to_pylist(), strict=True)}
    for n, r in table.items():
        kept = world[n][1] is None
        assert (r[rows.STATUS] == rows.KEPT) == kept
        assert (r[rows.IMAGE] is not None) == kept, n  # bytes only for kept rows
        if kept:
            assert (r["width"], r["height"]) == (256, 256) and r["image_format"] == "jpg"
            assert r["sha256"] == hashlib.sha256(r[rows.IMAGE]).hexdigest()
            assert r["http_status"] == 200 and len(r["original_sha256"]) == 64
    assert (table["good_big"]["original_width"], table["good_big"]["original_height"]) == (900, 600)
    assert table["missing"]["http_status"] == 404
    assert table["tiny"]["original_width"] == 8  # sizes known for filtered rows
    rgba = cv2.imdecode(np.frombuffer(table["rgba_png"][rows.IMAGE], np.uint8), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (256, 256, 3) and rgba.min() > 240  # transparent blue → white
    assert table["jpeg_as_text"]["original_sha256"] == hashlib.sha256(GOOD_JPEG).hexdigest()


def test_concurrent_batches_share_one_worker(server):
    """process() is thread-safe: two batches on one worker overlap their slow tails."""
    from concurrent.futures import ThreadPoolExecutor

    stage = Download(DownloadConfig(**FAST))
    stage.setup(StageContext())
    try:
        batch = _batch([server.url("/static/good.jpg")] * 20 + [server.url("/hang")])
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(stage, [batch, batch]))
        elapsed = time.monotonic() - t0
    finally:
        stage.teardown()
    for out in outs:
        assert out[rows.REASON].to_pylist() == [None] * 20 + ["timeout"]
    assert elapsed < 2 * FAST["timeout"]


def test_small_images_in_the_loop_large_ones_in_threads_same_output(server, monkeypatch):
    """Images up to INLINE_MAX_PIXELS are finished in the event loop's thread, larger ones in the
    decode threads; either way the output is exactly what the image processor makes of the bytes."""
    import threading

    from curate.net.image import ImageOptions, ImageProcessor
    from curate.stages import download as mod

    bodies = [jpeg((300, 200), (10, 20, 30)), jpeg((2000, 1500), (200, 120, 20)), png((640, 480)),
              jpeg((1700, 1300), (90, 90, 200))]  # 0.06, 3.0, 0.3 and 2.2 megapixels
    urls = [server.add(f"inline-{i}.bin", b) for i, b in enumerate(bodies)]
    threads: dict[int, str] = {}
    finish = mod.Download._finish

    def spy(self, fetched, expected, head):
        out = finish(self, fetched, expected, head)
        threads[out.original_width] = threading.current_thread().name
        return out

    monkeypatch.setattr(mod.Download, "_finish", spy)
    out = _run_stage(_batch(urls))
    assert out[rows.REASON].to_pylist() == [None] * 4
    ref = ImageProcessor(ImageOptions())  # the stage's defaults: 256 border, area, jpg 95
    assert out[rows.IMAGE].to_pylist() == [ref(b).image for b in bodies]
    assert threads[300].startswith("curate-download") and threads[640].startswith("curate-download")
    assert threads[2000].startswith("curate-decode") and threads[1700].startswith("curate-decode")


def test_guard_is_on_by_default(server):
    out = _run_stage(_batch([server.url("/static/good.jpg"), "http://169.254.169.254/latest/meta-data/"]),
                     allow_private_networks=False)
    assert out[rows.REASON].to_pylist() == ["private_address", "private_address"]


def test_verify_hash_uses_the_renamed_source_column(server):
    url = server.url("/static/good.jpg")
    good = hashlib.sha256(GOOD_JPEG).hexdigest()
    table = _batch([url, url, url], source_sha256=[good.upper(), "0" * 64, None])
    out = _run_stage(table, verify_hash=["sha256", "sha256"])
    assert out[rows.REASON].to_pylist() == [None, "hash_mismatch", None]
    with pytest.raises(ValueError, match="verify_hash names column 'md5'"):
        _run_stage(table, verify_hash=["md5", "md5"])


def test_compute_hash_names_the_original_hash_column(server):
    out = _run_stage(_batch([server.url("/static/good.jpg")]), compute_hash="md5")
    assert out["original_md5"].to_pylist() == [hashlib.md5(GOOD_JPEG).hexdigest()]
    assert "original_sha256" not in out.column_names and out["sha256"][0].as_py() is not None


def test_config_is_validated_early(make_recipe):
    with pytest.raises(ValueError, match="compression level"):
        DownloadConfig(encode_format="png")
    DownloadConfig(encode_format="png", encode_quality=9)
    path = make_recipe({"source": {"path": "x.parquet"},
                        "stages": [{"use": "download", "allowed_networks": ["not-a-cidr"]}]})
    with pytest.raises(RecipeError, match="allowed_networks"):
        load_recipe(path)


def test_shipped_download_recipe_loads():
    r = load_recipe(ROOT / "pipelines" / "download.yaml")
    assert [s.use for s in r.stages] == ["download"]
    cfg = r.stages[0]
    assert (cfg.image_size, cfg.resize_mode, cfg.encode_quality, cfg.compute_hash) == (256, "border", 95, "sha256")
    assert cfg.allow_private_networks is False


# ------------------------------------------------------------ end to end through the runner


def test_download_recipe_end_to_end(tmp_path, make_recipe, ray_session, server):
    """~50 rows of good and hostile URLs → every row in the ledger once, with its reason; tars read back."""
    world = _hostile_world(server)
    names = list(world)
    goods = [server.add(f"g{i}.jpg", jpeg((200 + 10 * i, 150), (i * 9, 80, 160))) for i in range(24)]
    urls = [world[n][0] for n in names] + goods
    expected = [world[n][1] for n in names] + [None] * len(goods)
    good_hash = hashlib.sha256(jpeg((200, 150), (0, 80, 160))).hexdigest()
    # an input `sha256` column (as DataComp ships) checked with verify_hash; one row carries a wrong one
    hashes = [None] * len(names) + [good_hash, "f" * 64] + [None] * (len(goods) - 2)
    expected[len(names) + 1] = "hash_mismatch"
    pq.write_table(pa.table({"url": pa.array(urls, pa.string()),
                             "caption": [f"a picture number {i}" for i in range(len(urls))],
                             "sha256": pa.array(hashes, pa.string())}), tmp_path / "urls.parquet")
    recipe = make_recipe({
        "source": {"path": str(tmp_path / "urls.parquet")},
        "stages": [{"use": "download", **FAST, **STAGE_OPTS, "verify_hash": ["sha256", "sha256"]}],
        "write": {"output": str(tmp_path / "out"), "samples_per_shard": 1000},
    })
    manifest = run(load_recipe(recipe))
    out = tmp_path / "out"
    ledger = pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger").glob("*.parquet"))],
                              promote_options="permissive")
    assert ledger.num_rows == len(urls) == manifest.counts.input
    assert len(set(ledger["key"].to_pylist())) == len(urls)
    by_url_index = sorted(ledger.to_pylist(), key=lambda r: r["key"])
    assert [r["reason"] for r in by_url_index] == expected
    assert all(r["dropped_by"] == ("download" if r["reason"] else None) for r in by_url_index)
    assert rows.IMAGE not in ledger.column_names

    kept = {r["key"]: r for r in by_url_index if r["status"] == rows.KEPT}
    assert manifest.counts.kept == len(kept) == sum(e is None for e in expected)
    tars = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    seen = set()
    for sample in wds.WebDataset(tars, shardshuffle=False):
        key = sample["__key__"]
        seen.add(key)
        img = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape[:2] == (256, 256)
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"]) == (256, 256)
        assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest() == kept[key]["sha256"]
        assert sample["txt"].decode() == kept[key]["caption"]
    assert seen == set(kept)

    stats = json.loads((out / "shard_stats" / "00000_stats.json").read_text())
    assert stats["count"] == len(urls) and stats["successes"] == len(kept)
    assert stats["failed_to_download"] + stats["failed_to_resize"] == len(urls) - len(kept)
    # img2dataset's failed_to_resize: at least the image_/decode reasons, at most all FAILED_TO_RESIZE ones
    by_prefix = sum(bool(e and e.startswith(("image_", "decode", "resize"))) for e in expected)
    assert by_prefix <= stats["failed_to_resize"] <= sum(e in FAILED_TO_RESIZE for e in expected)
