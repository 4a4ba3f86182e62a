"""Packed output end to end: a recipe run through Ray, read back with webdataset and pyarrow/polars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.pack.ffd import first_fit_decreasing
from curate.recipe import load_recipe
from curate.runner import run
from curate.sinks.packed import summarize_packing
from tests.conftest import jpeg_bytes, png_bytes, write_tar

WORDS = "a red circle on white two blue squares next to green triangle photo of small dog running beach".split()
MAX_TOKENS = 64
IMAGE_TOKENS = 16


def _world(root: Path, n_tars: int = 2, per_tar: int = 40) -> dict[str, dict]:
    """Captions of 1-12 words, every 9th one far too long; one PNG and one sample without an image."""
    rng = np.random.default_rng(5)
    samples: dict[str, dict] = {}
    for t in range(n_tars):
        batch = []
        for i in range(per_tar):
            key = f"t{t}_{i:04d}"
            n_words = 45 if i % 9 == 4 else int(rng.integers(1, 13))
            s = {"__key__": key, "txt": " ".join(rng.choice(WORDS, n_words)) + f" n{i}", "json": {"tag": t}}
            if not (t == 1 and i == 3):
                s["png" if i == 7 else "jpg"] = png_bytes(color=(i, t, 9, 255)) if i == 7 else \
                    jpeg_bytes(color=(i * 6, t * 90, 7))
            batch.append(s)
            samples[key] = s
        write_tar(root / "src" / f"{t:03d}.tar", batch)
    return samples


def _ledger(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger").glob("*.parquet"))],
                            promote_options="permissive")


def _check_sequence(seq: dict, kept: dict[str, dict], images: dict[str, bytes]) -> None:
    tokens = seq["num_tokens"]
    assert sum(tokens) == seq["total_tokens"] <= MAX_TOKENS
    assert seq["offsets"] == np.concatenate([[0], np.cumsum(tokens)[:-1]]).tolist()
    for key, text, n in zip(seq["keys"], seq["texts"], tokens, strict=True):
        assert kept[key]["num_tokens"] == n and kept[key]["caption"] == text


def test_packed_webdataset_and_parquet_round_trip(tmp_path, make_recipe, ray_session, tokenizer_file):
    import webdataset as wds
    from tokenizers import Tokenizer

    samples = _world(tmp_path)
    out = tmp_path / "out"
    recipe = load_recipe(make_recipe({
        "source": {"path": str(tmp_path / "src" / "*.tar")},
        "stages": [
            {"use": "caption_length", "min_words": 1},
            {"use": "dedup_exact", "by": ["caption"]},  # a global phase before packing
            {"use": "pack", "max_tokens": MAX_TOKENS, "image_tokens": IMAGE_TOKENS,
             "tokenizer": str(tokenizer_file)},
        ],
        "write": {"output": str(out), "formats": ["webdataset", "parquet", "packed"]},
    }))
    m = run(recipe)
    assert m.complete and m.counts.input == 80

    ledger = _ledger(out).to_pylist()
    kept = {r["key"]: r for r in ledger if r["status"] == "kept"}
    too_long = [r for r in ledger if r["reason"] == "too_long_for_sequence"]
    assert len(too_long) >= 8 and {r["dropped_by"] for r in too_long} == {"pack"}
    assert m.counts.dropped["pack"]["too_long_for_sequence"] == len(too_long)
    tok = Tokenizer.from_file(str(tokenizer_file))
    for key, r in kept.items():  # lengths: image tokens + the tokenizer's encode with its BOS/EOS
        assert r["num_tokens"] == IMAGE_TOKENS * ("jpg" in samples[key] or "png" in samples[key]) \
            + len(tok.encode(r["caption"]).ids)
    images = {r["key"]: r["image"] for r in pq.read_table(out / "parquet").select(["key", "image"]).to_pylist()}
    assert set(images) == set(kept)

    # WebDataset: one member group per sequence, read with the webdataset library
    tars = sorted(str(p) for p in (out / "packed" / "webdataset").glob("*.tar"))
    assert len(tars) == 2
    seen: list[str] = []
    n_seq = 0
    for sample in wds.WebDataset(tars, shardshuffle=False):
        seq = json.loads(sample["json"])
        assert seq["key"] == sample["__key__"] and seq["max_tokens"] == MAX_TOKENS
        assert seq["token_count"] == "exact"
        _check_sequence(seq, kept, images)
        for j, (key, fmt) in enumerate(zip(seq["keys"], seq["image_formats"], strict=True)):
            if images[key] is None:
                assert fmt is None and not any(k.startswith(f"{j}.") for k in sample)
            else:
                assert sample[f"{j}.{fmt}"] == images[key]
                assert fmt == ("png" if "png" in samples[key] else "jpg")
        seen += seq["keys"]
        n_seq += 1
    assert sorted(seen) == sorted(kept)  # every kept sample in exactly one sequence

    # Parquet: one row per sequence, read with polars
    df = pl.read_parquet(out / "packed" / "parquet" / "*.parquet")
    assert df.height == n_seq
    assert df.schema["images"] == pl.List(pl.Binary) and df.schema["offsets"] == pl.List(pl.Int32)
    pq_keys: list[str] = []
    for seq in df.to_dicts():
        _check_sequence(seq, kept, images)
        assert seq["images"] == [images[k] for k in seq["keys"]]
        pq_keys += seq["keys"]
    assert sorted(pq_keys) == sorted(kept)

    # the _done markers report the packing; it is FFD over each shard's kept rows in key order
    dones = [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]
    for d in dones:
        p = d["packed"]
        shard_keys = sorted(k for k in kept if k.startswith(f"t{d['shard']}_"))
        ffd = first_fit_decreasing([kept[k]["num_tokens"] for k in shard_keys], MAX_TOKENS)
        assert p["sequences"] == ffd.num_bins and p["capacity"] == ffd.num_bins * MAX_TOKENS
        assert p["tokens"] == sum(kept[k]["num_tokens"] for k in shard_keys)
        assert p["efficiency"] == pytest.approx(p["tokens"] / p["capacity"], abs=1e-6)
        assert {o["path"] for o in p["outputs"]} == {f"packed/webdataset/{d['shard']:05d}.tar",
                                                      f"packed/parquet/{d['shard']:05d}.parquet"}
    total = summarize_packing(dones)
    assert total["sequences"] == n_seq and total["samples"] == len(kept)
    assert 0.5 < total["efficiency"] <= 1.0


def test_truncate_approximate_parquet_only(tmp_path, make_recipe, ray_session):
    _world(tmp_path, n_tars=1, per_tar=20)
    out = tmp_path / "out"
    recipe = load_recipe(make_recipe({
        "source": {"path": str(tmp_path / "src" / "*.tar")},
        "stages": [{"use": "pack", "max_tokens": MAX_TOKENS, "image_tokens": IMAGE_TOKENS,
                    "on_overflow": "truncate"}],
        "write": {"output": str(out), "formats": ["packed"], "packed_formats": ["parquet"]},
    }))
    m = run(recipe)
    assert m.complete and m.counts.kept == 20  # nothing dropped: the long captions were cut
    assert not (out / "webdataset").exists() and not (out / "packed" / "webdataset").exists()
    ledger = {r["key"]: r for r in _ledger(out).to_pylist()}
    cut = {k for k, r in ledger.items() if r["pack_truncated"]}
    assert cut == {"t0_0004", "t0_0013"}
    table = pq.read_table(out / "packed" / "parquet" / "00000.parquet")
    assert table.schema.metadata[b"token_count"] == b"approximate"
    assert table.schema.metadata[b"max_tokens"] == str(MAX_TOKENS).encode()
    for seq in table.to_pylist():
        assert seq["total_tokens"] <= MAX_TOKENS
        for key, text in zip(seq["keys"], seq["texts"], strict=True):
            full = ledger[key]["caption"]
            assert text == full if key not in cut else (full.startswith(text) and len(text) < len(full))
    done = json.loads((out / "_done" / "00000.json").read_text())
    assert done["packed"]["token_count"] == "approximate" and done["packed"]["samples"] == 20


def test_packed_without_a_pack_stage_fails_before_any_work(tmp_path, make_recipe):
    _world(tmp_path, n_tars=1, per_tar=2)
    recipe = load_recipe(make_recipe({
        "source": {"path": str(tmp_path / "src" / "*.tar")},
        "stages": [{"use": "caption_length", "min_words": 1}],
        "write": {"output": str(tmp_path / "out"), "formats": ["parquet", "packed"]},
    }))
    with pytest.raises(CurateError, match="needs exactly one `use: pack` stage"):
        run(recipe)
    assert not (tmp_path / "out" / "_work" / "plan.json").exists()
