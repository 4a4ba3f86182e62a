"""`curate mix` by tokens counts every source in one unit: a packed output (``num_tokens`` = 144 image tokens +
caption tokens from a tokenizer + BOS/EOS) and a download-only output (no ``num_tokens``) mixed 70/30, the shares
checked by recounting the written mixture with the tokenizer; and the refusals, one paragraph each."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import rows
from curate.errors import RecipeError
from curate.mix import load_mixture, read_mixture_manifest, run_mix
from curate.mix.tokens import Counting, Unit
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.base import StageContext
from curate.stages.pack import Pack, PackConfig
from tests.conftest import jpeg_bytes, write_recipe

RATIO_TOLERANCE = 0.01  # the bar: 70/30 ± 1 % in the chosen unit
IMAGE_TOKENS, SPECIAL_TOKENS = 144, 2
WORDS = ("a red circle on a white background two blue squares next to green triangle photo of small dog "
         "running the beach at sunset orange cat sleeping wooden chair near window").split()


def _train_tokenizer(path: Path) -> Path:
    """A tiny BPE trained here (no hub): a small vocabulary, so words split into several tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(vocab_size=70, special_tokens=["[UNK]"]))
    tok.save(str(path))
    return path


def _caption(i: int, salt: int) -> str:
    return " ".join(WORDS[(i * salt + j * 7) % len(WORDS)] for j in range(3 + (i * salt) % 17))


def _source_parquet(path: Path, name: str, n: int, salt: int, *, train_caption: bool) -> Path:
    cols = {"key": [f"{name}{i:04d}" for i in range(n)], "caption": [_caption(i, salt) for i in range(n)],
            "image": pa.array([jpeg_bytes(size=(16, 16), color=(i % 256, salt, 9)) for i in range(n)], pa.binary())}
    if train_caption:  # as the demo: the alt-text plus tags, what its pack stage counts
        cols["train_caption"] = [f"{c} {WORDS[i % 5]} {WORDS[i % 7]}" for i, c in enumerate(cols["caption"])]
    pq.write_table(pa.table(cols), path, row_group_size=64)
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_session):
    """Two real curate runs: `packed` as the demo (a pack stage, 144 image tokens, a tokenizer, counting
    train_caption) and `download` as a download-only run (no pack stage, no num_tokens)."""
    tmp = tmp_path_factory.mktemp("mix-token-inputs")
    tok = _train_tokenizer(tmp / "tokenizer.json")
    for name, n, stages in (
            ("packed", 240, [{"use": "pack", "max_tokens": 4096, "image_tokens": IMAGE_TOKENS,
                              "tokenizer": str(tok), "text_column": "train_caption"}]),
            ("download", 260, [])):
        src = _source_parquet(tmp / f"{name}.parquet", name, n, 3 if stages else 5, train_caption=bool(stages))
        run(load_recipe(write_recipe(tmp / f"{name}.yaml", {
            "source": {"path": str(src), "key_col": "key"}, "stages": stages,
            "write": {"output": str(tmp / name), "samples_per_shard": 100, "formats": ["webdataset", "parquet"]}})))
    return {"packed": str(tmp / "packed"), "download": str(tmp / "download"), "tokenizer": str(tok), "tmp": tmp}


def _mixture(tmp_path, sources: list[dict], name="mix.yaml", **over) -> str:
    data = {"sources": sources, "unit": "tokens", "total_tokens": 20000, "seed": 1,
            "write": {"output": str(tmp_path / name.replace(".yaml", "")), "samples_per_shard": 64,
                      "formats": ["parquet"]}}
    data.update(over)
    return str(write_recipe(tmp_path / name, data))


def _two(outputs, other="download", **extra) -> list[dict]:
    return [{"name": "packed", "path": outputs["packed"], "weight": 0.7},
            {"name": other, "path": outputs[other] if other in outputs else other, "weight": 0.3, **extra}]


def _read(out: str) -> pa.Table:
    m = read_mixture_manifest(out)
    return pa.concat_tables([pq.read_table(f"{out}/{s['path']}") for s in m["shards"] if s["format"] == "parquet"],
                            promote_options="permissive")


def _recount(tokenizer: str, text: str | None, image: bytes | None) -> int:
    """One sample in the unit, straight from the `tokenizers` library: what the pack stage adds up."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    return IMAGE_TOKENS * (image is not None) + len(tok.encode(text or "", add_special_tokens=False).ids) \
        + SPECIAL_TOKENS


def test_tokens_70_30_counts_a_packed_and_a_download_only_output_in_one_unit(tmp_path, outputs):
    result = run_mix(load_mixture(_mixture(tmp_path, _two(outputs))))
    m = result.manifest
    unit = m["token_unit"]
    assert (unit["tokenizer"], unit["image_tokens"], unit["special_tokens"]) == (outputs["tokenizer"], 144, 2)
    assert unit["exact"] and "'packed'" in unit["from"]["tokenizer"] and m["token_column"] == "num_tokens"
    packed, download = m["sources"]
    # the packed output keeps its num_tokens (recorded in this unit); the download-only one is recounted
    assert packed["tokens_from"] == {"recorded_column": packed["files"]}
    assert packed["recorded_units"][0]["image_tokens"] == 144 and packed["files"] >= 2
    assert download["tokens_from"] == {"recount": download["files"]} and download["recorded_units"] == []
    for s, text in ((packed, ["train_caption"]), (download, ["caption"])):
        assert s["token_unit"] == {"tokenizer": outputs["tokenizer"], "image_tokens": 144, "special_tokens": 2,
                                   "text_columns": text}
        assert s["tokens_exact"] and "144 per image" in s["token_count"]

    # recount the written mixture with the tokenizer itself: same unit for both sources, 70/30 within 1 %
    table = _read(result.output)
    by_source: Counter[str] = Counter()
    for r in table.to_pylist():
        text = r["train_caption"] if r["mix_source"] == "packed" else r["caption"]
        n = _recount(outputs["tokenizer"], text, r["image"])
        assert r["num_tokens"] == n  # the mixture's rows carry num_tokens in the unit
        by_source[r["mix_source"]] += n
    assert by_source == {"packed": packed["tokens"], "download": download["tokens"]}
    total = sum(by_source.values())
    assert abs(by_source["packed"] / total - 0.7) <= RATIO_TOLERANCE
    assert abs(by_source["download"] / total - 0.3) <= RATIO_TOLERANCE
    assert abs(packed["achieved_ratio"] - 0.7) <= RATIO_TOLERANCE and abs(m["tokens"] - 20000) <= 400
    # both sources are mostly image tokens: the sample shares follow the token shares (the bytes / 4 unit
    # without image tokens made a download sample ~6x cheaper, so 30 % of tokens took most of the samples)
    assert 0.2 <= download["samples"] / (packed["samples"] + download["samples"]) <= 0.4


def test_refuses_to_recount_without_the_tokenizer_and_says_why(tmp_path, outputs, caplog):
    moved = tmp_path / "packed-elsewhere"  # the packed output as made on another machine: its tokenizer is not here
    shutil.copytree(outputs["packed"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    missing = "/nonexistent/models/qwen2/tokenizer.json"
    manifest["recipe"]["stages"][-1]["tokenizer"] = missing
    (moved / "manifest.json").write_text(json.dumps(manifest))
    sources = [{"name": "packed", "path": str(moved), "weight": 0.7},
               {"name": "download", "path": outputs["download"], "weight": 0.3}]
    # by samples, tokens are only reported: the mix runs and says they are not counted
    by_samples = run_mix(load_mixture(_mixture(tmp_path, sources, unit="samples", total_tokens=None,
                                               total_samples=100))).manifest
    assert by_samples["samples"] == 100 and by_samples["tokens"] is None and by_samples["token_unit"] is None
    assert "tokens are not counted" in caplog.text

    # by tokens it stops, in one paragraph naming the source and why, before touching the earlier mixture
    with pytest.raises(RecipeError) as e:
        run_mix(load_mixture(_mixture(tmp_path, sources, name="tokens.yaml"), output=str(tmp_path / "mix")))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("mixture source 'download' has no `num_tokens` column and records "
                                              "no token unit")
    assert f"needs the mixture's tokenizer {missing} (recorded by source 'packed')" in msg
    assert "cannot be loaded here" in msg and "token_unit.tokenizer" in msg and "unit: samples" in msg
    assert _read(str(tmp_path / "mix")).num_rows == 100  # the earlier mixture's shards are still there

    # naming the tokenizer (the same file) recounts both in it: the packed source's recount equals its num_tokens
    named = run_mix(load_mixture(_mixture(tmp_path, sources, name="named.yaml",
                                          token_unit={"tokenizer": outputs["tokenizer"]}))).manifest
    packed, download = named["sources"]
    assert packed["tokens_from"] == {"recount": packed["files"]} and download["tokens_from"] == {"recount": download["files"]}
    assert named["token_unit"]["from"]["tokenizer"] == "declared in the mixture file (token_unit)"
    recorded = pq.read_table(f"{outputs['packed']}/parquet", columns=["key", "num_tokens"]).to_pylist()
    written = _read(str(tmp_path / "named"))
    got = {r["source_key"]: r["num_tokens"] for r in written.to_pylist() if r["mix_source"] == "packed"}
    assert got and all(got[r["key"]] == r["num_tokens"] for r in recorded if r["key"] in got)


def test_refuses_sources_recorded_in_different_units_until_the_mixture_picks_one(tmp_path, outputs):
    other = tmp_path / "packed64"  # the same shards, recorded as packed with 64 image tokens
    shutil.copytree(outputs["packed"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["recipe"]["stages"][-1]["image_tokens"] = 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    sources = _two({**outputs, "p64": str(other)}, other="p64")
    with pytest.raises(RecipeError) as e:
        run_mix(load_mixture(_mixture(tmp_path, sources)))
    msg = str(e.value)
    assert "\n" not in msg and "different units (image_tokens — 'packed': 144; 'p64': 64)" in msg
    assert "Set `token_unit.image_tokens`" in msg

    with pytest.raises(RecipeError, match=r"'p64' says `tokens: column`, but .* records its `num_tokens` in "
                                          r"another unit \(64 per image"):
        run_mix(load_mixture(_mixture(tmp_path, _two({**outputs, "p64": str(other)}, other="p64", tokens="column"),
                                      name="column.yaml", token_unit={"image_tokens": 144})))

    picked = run_mix(load_mixture(_mixture(tmp_path, sources, name="picked.yaml",
                                           token_unit={"image_tokens": 144}))).manifest
    packed, p64 = picked["sources"]
    assert packed["tokens_from"] == {"recorded_column": packed["files"]} and p64["tokens_from"] == {"recount": p64["files"]}
    assert p64["recorded_units"][0]["image_tokens"] == 64 and p64["token_unit"]["image_tokens"] == 144
    assert abs(packed["achieved_ratio"] - 0.7) <= RATIO_TOLERANCE


def test_recount_equals_the_pack_stage(tmp_path, outputs):
    """The recount is the pack stage's own sum, images (nulls included) and BOS/EOS, for a tokenizer and
    for the approximate counter, read from a Parquet file with and without null images per row group."""
    n = 150
    captions = [_caption(i, 11) if i % 13 else None for i in range(n)]
    images = [None if 40 <= i < 60 else jpeg_bytes(size=(8, 8)) for i in range(n)]
    table = pa.table({rows.KEY: [f"k{i:03d}" for i in range(n)], rows.URL: [None] * n,
                      rows.CAPTION: pa.array(captions, pa.string()), rows.STATUS: [rows.KEPT] * n,
                      rows.DROPPED_BY: pa.nulls(n, pa.string()), rows.REASON: pa.nulls(n, pa.string()),
                      rows.IMAGE: pa.array(images, pa.binary())})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=32)  # row group 1 has nulls, others none
    for tokenizer in (outputs["tokenizer"], None):
        stage = Pack(PackConfig(image_tokens=IMAGE_TOKENS, tokenizer=tokenizer))
        stage.setup(StageContext())
        expected = stage(table)["num_tokens"].to_pylist()
        unit = Unit(tokenizer or "approximate", IMAGE_TOKENS, SPECIAL_TOKENS)
        counting = Counting(unit, {"tokenizer": "test"}, "num_tokens", rows.CAPTION)
        got = counting.count_parquet(pq.ParquetFile(tmp_path / "rows.parquet"), rows.CAPTION, "test")
        assert got.tolist() == expected


def test_samples_mix_of_two_download_only_outputs_counts_in_the_default_unit(tmp_path, outputs, caplog):
    caplog.set_level(logging.WARNING)
    sources = [{"name": "a", "path": outputs["download"], "weight": 0.5},
               {"name": "b", "path": outputs["download"], "weight": 0.5, "format": "webdataset"}]
    m = run_mix(load_mixture(_mixture(tmp_path, sources, unit="samples", total_tokens=None,
                                      total_samples=80))).manifest
    assert m["token_unit"]["tokenizer"] == "approximate" and not m["token_unit"]["exact"]
    assert "caption tokens are approximate" in caplog.text
    a, b = m["sources"]
    # parquet and tar shards of the same output count alike
    assert a["available_tokens"] == b["available_tokens"] > 144 * a["available_samples"]
    assert np.isclose(a["available_tokens"] / a["available_samples"], b["available_tokens"] / b["available_samples"])
