"""Round trips through the readers users train with, on the outputs of one real `curate` run.

- Hugging Face ``datasets``: ``load_dataset("webdataset")`` on ``webdataset/*.tar`` and
  ``load_dataset("parquet")`` on ``parquet/*.parquet``;
- Ray Data: ``ray.data.read_webdataset`` and ``ray.data.read_parquet``;
- polars: the packed sequences (``packed/parquet/*.parquet``) scanned lazily and exploded back into
  samples, and the plain Parquet.

open_clip's loaders (evaluation and training) are in ``test_open_clip_loader.py``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_recipe, write_tar

N_TARS, PER_TAR = 2, 8
SIZE = (64, 48)  # width, height
MAX_TOKENS, IMAGE_TOKENS = 64, 16


def _color(t: int, i: int) -> tuple[int, int, int]:
    return (i * 30, t * 120, 60)


def _close(image: Image.Image | np.ndarray, color: tuple[int, int, int]) -> bool:
    """A flat JPEG decodes to (nearly) its colour."""
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    return bool(np.all(np.abs(pixels.mean(axis=0) - color) < 6))


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_session) -> dict:
    """One run writing every layout: webdataset, parquet and packed (webdataset + parquet)."""
    root = tmp_path_factory.mktemp("roundtrip")
    samples = {}
    for t in range(N_TARS):
        batch = []
        for i in range(PER_TAR):
            key = f"t{t}_{i:03d}"
            caption = " ".join(["photo of a small dog"] * (1 + i % 4)) + f" {t} {i}"  # 5..17 words
            batch.append({"__key__": key, "jpg": jpeg_bytes(size=SIZE, color=_color(t, i)), "txt": caption,
                          "json": {"tag": f"tar{t}"}})
            samples[key] = {"caption": caption, "color": _color(t, i)}
        write_tar(root / "src" / f"{t:03d}.tar", batch)
    recipe = write_recipe(root / "recipe.yaml", {
        "source": {"path": str(root / "src" / "*.tar")},
        "stages": [{"use": "pack", "max_tokens": MAX_TOKENS, "image_tokens": IMAGE_TOKENS}],
        "write": {"output": str(root / "out"), "formats": ["webdataset", "parquet", "packed"]},
    })
    m = run(load_recipe(recipe), progress=False)
    assert m.complete and m.counts.kept == len(samples)
    out = root / "out"
    return {"out": out, "samples": samples, "cache": root / "hf_cache",
            "tars": sorted(str(p) for p in (out / "webdataset").glob("*.tar")),
            "parquets": sorted(str(p) for p in (out / "parquet").glob("*.parquet"))}


# ---------------------------------------------------------------- Hugging Face datasets


def test_hf_datasets_loads_our_webdataset(curated):
    from datasets import Image as HFImage
    from datasets import load_dataset

    assert len(curated["tars"]) == N_TARS
    ds = load_dataset("webdataset", data_files={"train": curated["tars"]}, split="train",
                      cache_dir=str(curated["cache"]))
    samples = curated["samples"]
    assert ds.num_rows == len(samples)
    assert isinstance(ds.features["jpg"], HFImage)
    assert {"jpg", "txt", "json", "__key__", "__url__"} <= set(ds.column_names)
    for row in ds:
        s = samples[row["__key__"]]
        assert row["txt"] == s["caption"] == row["json"]["caption"]
        assert row["json"]["key"] == row["__key__"] and row["json"]["tag"] == f"tar{row['__key__'][1]}"
        assert row["jpg"].size == SIZE and _close(row["jpg"].convert("RGB"), s["color"])
    assert sorted(ds["__key__"]) == sorted(samples)


def test_hf_datasets_loads_our_parquet(curated):
    from datasets import Image as HFImage
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files={"train": curated["parquets"]}, split="train",
                      cache_dir=str(curated["cache"]))
    samples = curated["samples"]
    assert ds.num_rows == len(samples) and sorted(ds["key"]) == sorted(samples)
    assert {row["key"]: row["caption"] for row in ds.select_columns(["key", "caption"])} == \
        {k: s["caption"] for k, s in samples.items()}
    # `image` is plain binary in our Parquet; datasets' Image feature decodes it once cast
    ds = ds.cast_column("image", HFImage())
    for row in ds:
        assert row["image_format"] == "jpg"
        assert row["image"].size == SIZE and _close(row["image"].convert("RGB"), samples[row["key"]]["color"])


# ---------------------------------------------------------------- Ray Data


def test_ray_read_webdataset_reads_our_tars(curated):
    import ray

    rows = ray.data.read_webdataset(curated["tars"]).take_all()
    samples = curated["samples"]
    assert sorted(r["__key__"] for r in rows) == sorted(samples)
    for r in rows:
        s = samples[r["__key__"]]
        assert r["txt"] == s["caption"] == r["json"]["caption"]
        assert r["jpg"].shape == (SIZE[1], SIZE[0], 3) and r["jpg"].dtype == np.uint8  # decoded by Ray
        assert _close(r["jpg"], s["color"])


def test_ray_read_parquet_reads_our_parquet(curated):
    import ray

    ds = ray.data.read_parquet(curated["parquets"])
    assert ds.count() == len(curated["samples"])
    rows = ds.select_columns(["key", "caption", "image"]).take_all()
    samples = curated["samples"]
    assert {r["key"]: r["caption"] for r in rows} == {k: s["caption"] for k, s in samples.items()}
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.size == SIZE and _close(img.convert("RGB"), samples[r["key"]]["color"])


# ---------------------------------------------------------------- polars


def test_polars_reads_packed_sequences_back_into_samples(curated):
    out: Path = curated["out"]
    samples = curated["samples"]
    files = sorted((out / "packed" / "parquet").glob("*.parquet"))
    assert len(files) == N_TARS
    assert pq.read_schema(files[0]).metadata[b"max_tokens"] == str(MAX_TOKENS).encode()

    seqs = pl.scan_parquet(out / "packed" / "parquet" / "*.parquet")
    totals = seqs.select(pl.col("total_tokens"), pl.col("num_tokens").list.sum().alias("sum")).collect()
    assert (totals["total_tokens"] == totals["sum"]).all() and totals["total_tokens"].max() <= MAX_TOKENS
    # one row per sample: explode the parallel lists; the offsets are the exclusive running sum
    per_sample = (
        seqs.with_columns(pl.int_range(pl.len()).alias("seq"))
        .explode(["keys", "texts", "images", "image_formats", "num_tokens", "offsets"])
        .with_columns((pl.col("num_tokens").cum_sum().over("seq") - pl.col("num_tokens")).alias("expected_offset"))
        .collect()
    )
    assert per_sample.height == len(samples) and sorted(per_sample["keys"]) == sorted(samples)
    assert (per_sample["offsets"] == per_sample["expected_offset"]).all()
    assert per_sample["num_tokens"].min() > IMAGE_TOKENS  # every sample has an image and a caption
    plain = pl.read_parquet(out / "parquet" / "*.parquet").select("key", "caption", "image")
    assert plain.height == len(samples)
    joined = per_sample.join(plain, left_on="keys", right_on="key", how="inner")
    assert joined.height == len(samples)
    assert (joined["texts"] == joined["caption"]).all() and (joined["images"] == joined["image"]).all()
    assert set(joined["image_formats"]) == {"jpg"}
    for row in joined.select("keys", "images").iter_rows():
        assert _close(Image.open(io.BytesIO(row[1])).convert("RGB"), samples[row[0]]["color"])
