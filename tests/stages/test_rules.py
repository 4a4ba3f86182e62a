"""caption_rules and image_rules: every rule and reason, on small Arrow tables; the presets load."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate import rows
from curate.recipe import load_recipe
from curate.stages.caption_rules import (
    CaptionRules,
    CaptionRulesConfig,
    bundled_blacklist,
    is_filename,
    is_url,
    normalise,
)
from curate.stages.image_rules import ImageRules, ImageRulesConfig, header_size
from tests.conftest import jpeg_bytes, png_bytes


def make_table(captions: list[str | None], **columns: list[Any]) -> pa.Table:
    n = len(captions)
    data: dict[str, Any] = {
        rows.KEY: pa.array([f"{i:04d}" for i in range(n)], pa.string()),
        rows.URL: pa.array([f"http://x/{i}.jpg" for i in range(n)], pa.string()),
        rows.CAPTION: pa.array(captions, pa.string()),
        rows.STATUS: pa.array([rows.KEPT] * n, pa.string()),
        rows.DROPPED_BY: pa.nulls(n, pa.string()),
        rows.REASON: pa.nulls(n, pa.string()),
    }
    for name, values in columns.items():
        data[name] = pa.array(values, pa.binary()) if name == rows.IMAGE else pa.array(values)
    return pa.table(data)


def caption_reasons(captions: list[str | None], **options: Any) -> list[str | None]:
    out = CaptionRules(CaptionRulesConfig(**options))(make_table(captions))
    return out[rows.REASON].to_pylist()


# ------------------------------------------------------------------ caption_rules

DROPPED = {
    "caption_missing": [None, "", "   "],
    "caption_url": ["https://example.com/a.jpg", "http://foo.org", "www.example.com", "example.com/foo?x=1",
                    "Amazon.com"],
    "caption_filename": ["IMG_1234.JPG", "DSC0042", "image.png", "20190812_123456.jpg", "P1010023.JPG",
                         "IMG_20190812_123456", "PXL_20210101_123456789", "1234567_10152345_n", "dji_0001",
                         "Screen Shot 2020-01-01 at 10.00.00.png", "my photo.jpeg", "scan.pdf"],
    "caption_junk": ["image", "Image", "untitled", "Untitled-1", "IMAGE (3)", "image_02", "nan", "N/A",
                     "identicon", "captcha", "No Image Available!", "thumbnail", "IMG", "12345", "2019", "---", "🙂🙂", "…"],
}
KEPT_CAPTIONS = [
    "image of a dog", "a dog on the beach", "Nike logo", "GP 2019 Monaco", "Route 66", "Vol.II", "St.Louis",
    "New York New York", "Photo booth at the wedding", "東京タワーの夜景", "Visit https://example.com for more",
    "A photo of my holiday in Spain with all of my friends.jpg", "the cat and the dog and the bird",
]


@pytest.mark.parametrize("reason", sorted(DROPPED))
def test_caption_rules_reason(reason: str) -> None:
    assert caption_reasons(DROPPED[reason]) == [reason] * len(DROPPED[reason])


def test_caption_rules_keep_real_captions() -> None:
    assert caption_reasons(KEPT_CAPTIONS) == [None] * len(KEPT_CAPTIONS)


def test_caption_rules_marks_stage_and_drops_image_bytes() -> None:
    table = make_table(["IMG_1234.JPG", "a red car"], image=[b"x", b"y"])
    out = CaptionRules(CaptionRulesConfig(name="junk"))(table)
    assert out[rows.STATUS].to_pylist() == [rows.DROPPED, rows.KEPT]
    assert out[rows.DROPPED_BY].to_pylist() == ["junk", None]
    assert out[rows.IMAGE].to_pylist() == [None, b"y"]


def test_caption_rules_switches() -> None:
    captions = ["IMG_1234.JPG", "https://example.com", "untitled"]
    assert caption_reasons(captions, filenames=False, urls=False, junk=False) == [None, None, None]
    assert caption_reasons(captions, filenames=False) == [None, "caption_url", "caption_junk"]


def test_caption_rules_repetition() -> None:
    captions = ["buy buy buy buy cheap", "bye bye", "dog dog dog", "a b c d e f"]
    assert caption_reasons(captions) == [None] * 4  # off by default
    # "bye bye" and "dog dog dog" are too short to judge (MIN_WORDS_FOR_REPEAT)
    assert caption_reasons(captions, max_repeat_ratio=0.5) == ["caption_repetitive", None, None, None]


def test_blacklist_extended_from_recipe(tmp_path) -> None:
    extra = tmp_path / "junk.txt"
    extra.write_text("# my site's junk\nLorem Ipsum   # trailing comment\n\nsample-image\n")
    captions = ["lorem ipsum", "Sample Image 2", "my logo here", "My Logo Here!", "a real caption"]
    reasons = caption_reasons(captions, junk_words=["my logo here"], junk_file=str(extra))
    assert reasons == ["caption_junk", "caption_junk", "caption_junk", "caption_junk", None]
    assert caption_reasons(["lorem ipsum"]) == [None]  # the bundled list is not changed


def test_junk_file_must_exist(tmp_path) -> None:
    with pytest.raises(ValidationError, match="no such file"):
        CaptionRulesConfig(junk_file=str(tmp_path / "missing.txt"))


def test_bundled_blacklist_is_package_data() -> None:
    entries = bundled_blacklist()
    assert {"image", "nan", "identicon", "captcha", "untitled", "no image available"} <= entries
    assert all(e == normalise(e) for e in entries)


def test_helpers() -> None:
    assert normalise("  Untitled-1 ") == "untitled"
    assert is_url("https://a.b/c") and not is_url("image.png") and not is_url("Vol.II")
    assert is_filename("IMG_1234.JPG") and not is_filename("Route 66") and not is_filename("2019")


# ------------------------------------------------------------------ image_rules


def image_reasons(table: pa.Table, **options: Any) -> list[str | None]:
    return ImageRules(ImageRulesConfig(**options))(table)[rows.REASON].to_pylist()


def test_image_rules_each_reason_from_size_columns() -> None:
    sizes = [(300, 300), (150, 400), (700, 210), (200, 200), (4000, 3000)]
    table = make_table(["c"] * len(sizes), width=[w for w, _ in sizes], height=[h for _, h in sizes])
    reasons = image_reasons(table, min_side=200, max_aspect_ratio=3, min_pixels=50_000, max_pixels=10_000_000)
    assert reasons == [None, "image_too_small", "image_aspect_ratio", "image_too_few_pixels", "image_too_many_pixels"]


def test_image_rules_prefer_original_size() -> None:
    # Stored 224 px (resized by the download stage); served at 800x600: DataComp judges the original.
    table = make_table(["c", "c", "c"], width=[224, 224, 150], height=[168, 168, 150],
                       original_width=[800, 120, None], original_height=[600, 90, None])
    assert image_reasons(table, min_side=200) == [None, "image_too_small", "image_too_small"]
    assert image_reasons(table, min_side=200, use_original=False) == ["image_too_small"] * 3


def test_image_rules_read_header_when_no_size() -> None:
    images = [jpeg_bytes((300, 240)), png_bytes((100, 400)), jpeg_bytes((900, 250)), b"not an image", None]
    table = make_table(["c"] * 5, image=images)
    out = ImageRules(ImageRulesConfig(min_side=200, max_aspect_ratio=3))(table)
    assert out[rows.REASON].to_pylist() == [None, "image_too_small", "image_aspect_ratio",
                                            "image_unreadable", "image_missing"]
    # the stored size is recorded wherever the header could be read
    assert out["width"].to_pylist() == [300, 100, 900, None, None]
    assert out["height"].type == pa.int32()


def test_image_rules_original_size_with_bytes_only_source() -> None:
    # A WebDataset made by img2dataset: small stored image, original size in its json.
    table = make_table(["c"], image=[jpeg_bytes((64, 48))], original_width=[800], original_height=[600])
    out = ImageRules(ImageRulesConfig(min_side=200))(table)
    assert out[rows.REASON].to_pylist() == [None]
    assert (out["width"][0].as_py(), out["height"][0].as_py()) == (64, 48)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds no pixel data: only the header can be read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"") + _png_chunk(b"IEND", b"")


def test_image_rules_decompression_bomb() -> None:
    bomb = _png_header(40_000, 40_000)  # 1.6 gigapixels: PIL refuses to open it
    assert header_size(_png_header(640, 480)) == (640, 480)  # the header alone is enough
    assert image_reasons(make_table(["c"], image=[bomb])) == ["decompression_bomb"]


def test_image_rules_need_a_size_or_bytes() -> None:
    with pytest.raises(ValueError, match="after the download stage"):
        ImageRules(ImageRulesConfig(min_side=10))(make_table(["c"]))


def test_image_rules_config_bounds() -> None:
    with pytest.raises(ValidationError):
        ImageRulesConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(ValidationError):
        ImageRulesConfig(max_aspect_ratio=0.5)


# ------------------------------------------------------------------ presets


def test_presets_load(make_recipe) -> None:
    path = make_recipe({"source": {"path": "in.tar"},
                        "stages": [{"preset": "caption-junk"}, {"preset": "datacomp-basic"}]})
    recipe = load_recipe(path)
    by_name = {s.name: s for s in recipe.stages}
    assert list(by_name) == ["caption_junk", "datacomp_caption", "datacomp_image", "datacomp_language"]
    assert (by_name["datacomp_caption"].min_words, by_name["datacomp_caption"].min_chars) == (3, 6)
    assert (by_name["datacomp_image"].min_side, by_name["datacomp_image"].max_aspect_ratio) == (200, 3.0)
    assert by_name["datacomp_language"].keep == ["en"]


def test_presets_end_to_end_on_webdataset(tmp_path, make_recipe, ray_session) -> None:
    """caption-junk + datacomp-basic on a WebDataset that holds only bytes: every reason reaches the ledger."""
    import pyarrow.parquet as pq

    from curate.runner import run
    from tests.conftest import write_tar

    good = jpeg_bytes((256, 256))
    samples = [
        ("k00", "a red car parked on the street", good, None, None),
        ("k01", "two dogs playing in the snow", jpeg_bytes((120, 160)), None, ("datacomp_image", "image_too_small")),
        ("k02", "view of the mountains at sunset", jpeg_bytes((700, 210)), None,
         ("datacomp_image", "image_aspect_ratio")),
        ("k03", "red car", good, None, ("datacomp_caption", "caption_too_few_words")),
        ("k04", "ein rotes Auto auf der Straße", good, None, ("datacomp_language", "language:de")),
        ("k05", "IMG_1234.JPG", good, None, ("caption_junk", "caption_filename")),
        # stored at 64x48 (img2dataset resized it); served at 800x600: judged on the original
        ("k06", "a small boat on a calm lake", jpeg_bytes((64, 48)), {"original_width": 800, "original_height": 600},
         None),
        ("k07", "a white house with a garden", b"not an image", None, ("datacomp_image", "image_unreadable")),
        ("k08", "a tall tree in the field", None, None, ("source", "image_missing")),
    ]
    tar = []
    for key, caption, image, meta, _ in samples:
        s: dict[str, Any] = {"__key__": key, "txt": caption, "json": {"url": f"http://h/{key}.jpg", **(meta or {})}}
        if image is not None:
            s["jpg"] = image
        tar.append(s)
    write_tar(tmp_path / "src" / "000.tar", tar)
    recipe = load_recipe(make_recipe({
        "source": {"path": str(tmp_path / "src" / "000.tar")},
        "stages": [{"preset": "caption-junk"}, {"preset": "datacomp-basic"}],
        "write": {"output": str(tmp_path / "out"), "formats": ["parquet"]},
    }))
    manifest = run(recipe)

    ledger = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / "ledger").glob("*.parquet"))],
                              promote_options="permissive")
    by_key = {r["key"]: r for r in ledger.to_pylist()}
    for key, _, _, _, fate in samples:
        got = (by_key[key]["dropped_by"], by_key[key]["reason"]) if by_key[key]["status"] == rows.DROPPED else None
        assert got == fate, key
    assert manifest.counts.kept == 2
    assert by_key["k00"]["lang"] == "en" and by_key["k00"]["lang_score"] > 0.5
    assert (by_key["k00"]["width"], by_key["k00"]["height"]) == (256, 256)
    assert (by_key["k06"]["width"], by_key["k06"]["original_width"]) == (64, 800)
