"""Thumbnail samples (write.thumbnails): which rows, whatever the workers; what the report shows.

Unit: real stages over real batches, cut and ordered differently over different "workers"
(each with its own sampler state), give the same merged sample, which is the bottom-k by
seeded key hash per (stage, reason). End to end: the known run's gallery, and a run that
fails on an unreadable shard then resumes merges the same sample as an uninterrupted run
with other batch sizes.
"""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CLEAN, DUPES, FOREIGN, SCRIPT_CAPTION, SHORT, TINY

import curate.stats.thumbnails as th
from curate import rows
from curate.engine.samples import DropSampler, sample_drops, split_samples
from curate.errors import SourceError
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.registry import stage_class
from tests.conftest import jpeg_bytes, write_tar

N = 240


def _input(n: int = N, shards: int = 4) -> pa.Table:
    captions, images = [], []
    for i in range(n):
        captions.append("one" if i % 5 == 1 else " ".join(["word"] * 30) if i % 7 == 2 else f"a photo of thing {i}")
        size = (8, 8) if i % 6 == 3 else (60, 12) if i % 11 == 4 else (24, 24)
        images.append(b"junk, no image" if i % 13 == 5 else jpeg_bytes(size=size, color=(i % 256, 80, 160)))
    return pa.table({
        rows.KEY: [f"r{i:04d}" for i in range(n)], rows.CAPTION: captions, rows.IMAGE: images,
        rows.URL: [f"http://example.test/{i}.jpg" for i in range(n)],
        rows.STATUS: [rows.KEPT] * n, rows.DROPPED_BY: pa.nulls(n, pa.string()), rows.REASON: pa.nulls(n, pa.string()),
        rows.SHARD: [i % shards for i in range(n)],
    })


def _stages():
    cfgs = [{"use": "caption_length", "min_words": 2, "max_words": 20},
            {"use": "image_rules", "min_side": 12, "max_aspect_ratio": 3}]
    out = []
    for c in cfgs:
        cls = stage_class(c["use"])
        st = cls(cls.Config(**c))
        st.setup(st.ctx)
        out.append(st)
    return out


def _run_split(table: pa.Table, *, workers: int, seed: int) -> tuple[pa.Table, pa.Table, int]:
    """The stages over ``table`` cut into random batches, in random order, on ``workers`` samplers.
    Returns (merged sample, every row's fate, records written before the merge)."""
    rng = random.Random(seed)
    stages = _stages()
    samplers = [{st.stage_name: DropSampler() for st in stages} for _ in range(workers)]
    cuts, i = [], 0
    while i < table.num_rows:
        n = rng.randint(1, 40)
        cuts.append(table.slice(i, n))
        i += n
    rng.shuffle(cuts)
    fates, records = [], []
    for batch in cuts:
        w = rng.randrange(workers)
        for st in stages:
            batch = sample_drops(batch, st(batch), st.stage_name, list(st.output_columns), samplers[w][st.stage_name])
        part, sample = split_samples(batch)
        fates.append(part.select([rows.KEY, rows.STATUS, rows.DROPPED_BY, rows.REASON]))
        if sample is not None:
            records.append(sample)
    return th.merge(records), pa.concat_tables(fates), sum(r.num_rows for r in records)


def _by_group(sample: pa.Table) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for r in sample.to_pylist():
        out.setdefault((r["stage"], r["reason"]), []).append((r["key"], r["thumbnail"]))
    return out


def test_sample_is_bottom_k_per_reason_whatever_the_batches_and_workers():
    table = _input()
    one, fates, written_one = _run_split(table, workers=1, seed=1)
    many, fates_many, written_many = _run_split(table, workers=3, seed=2)
    other, _, _ = _run_split(table, workers=5, seed=3)
    assert one.equals(many) and one.equals(other)  # keys, records and thumbnail bytes alike

    # the truth: per (stage, reason), the PER_REASON dropped keys with the smallest seeded hash
    truth: dict[tuple, list[str]] = {}
    for r in fates.to_pylist():
        if r[rows.STATUS] != rows.KEPT:
            truth.setdefault((r[rows.DROPPED_BY], r[rows.REASON]), []).append(r[rows.KEY])
    assert set(truth) == {("caption_length", "caption_too_few_words"), ("caption_length", "caption_too_many_words"),
                          ("image_rules", "image_too_small"), ("image_rules", "image_aspect_ratio"),
                          ("image_rules", "image_unreadable")}
    groups = _by_group(one)
    assert set(groups) == set(truth)
    for g, keys in truth.items():
        want = sorted(keys, key=lambda k: (th.sample_hash(k), k))[:th.PER_REASON]
        assert [k for k, _ in groups[g]] == want, g
        assert len(groups[g]) == min(th.PER_REASON, len(keys))  # the cap, per reason
    # rows with image bytes get a 96 px JPEG; bytes that are no image give a text-only entry
    from PIL import Image

    for entries in groups.values():
        for key, thumb in entries:
            if int(key[1:]) % 13 == 5:  # the junk bytes of _input
                assert thumb is None
            else:
                im = Image.open(io.BytesIO(thumb))
                assert im.format == "JPEG" and max(im.size) <= th.THUMB_PX


def test_workers_thumbnail_only_rows_that_may_be_in_the_sample():
    """Per shard, a worker keeps the k smallest hashes it has seen: later rows rarely enter them."""
    table = _input(1200, shards=1)
    sample, fates, written = _run_split(table, workers=1, seed=4)
    drops = sum(1 for s in fates[rows.STATUS].to_pylist() if s != rows.KEPT)
    assert sample.num_rows == 5 * th.PER_REASON
    assert written < drops / 3, (written, drops)


def test_only_rows_the_merge_chooses_are_thumbnailed(monkeypatch):
    """Workers store a candidate's bytes; the merge thumbnails only the rows it keeps (a larger image
    than th.RAW_BYTES is thumbnailed on the worker, so the bytes stored stay small)."""
    table = _input(600, shards=1)
    calls = []
    real = th.make_thumbnail
    monkeypatch.setattr(th, "make_thumbnail", lambda data, *a, **kw: calls.append(data) or real(data, *a, **kw))
    stages = _stages()
    records = []
    for start in range(0, table.num_rows, 50):  # one worker, twelve parts of one shard
        batch = table.slice(start, 50)
        for st in stages:
            batch = sample_drops(batch, st(batch), st.stage_name, list(st.output_columns), DropSampler())
        _, sample = split_samples(batch)
        if sample is not None:
            records.append(sample)
    assert not calls and all(r["thumbnail"] is None for t in records for r in t.to_pylist())
    assert sum(r["image"] is not None for t in records for r in t.to_pylist()) > 0
    merged = th.merge(records)
    assert merged.num_rows == 5 * th.PER_REASON and len(calls) <= merged.num_rows
    assert merged["image"].null_count == merged.num_rows  # the merge keeps thumbnails, not bytes

    big = jpeg_bytes(size=(8, 8)) + b"\0" * (th.RAW_BYTES + 1)  # a JPEG's trailing bytes are ignored
    assert th.image_or_thumbnail(big)["image"] is None and th.image_or_thumbnail(big)["thumbnail"]


def test_merge_caps_kept_rows_and_keeps_each_chosen_copy_with_its_original():
    def rec(key, role, stage=None, reason=None, pair=None):
        return {"key": key, "hash": th.sample_hash(key), "stage": stage, "reason": reason, "role": role,
                "pair": pair, "fields": "{}", "thumbnail": None}

    kept = [rec(f"k{i}", th.KEPT_ROLE) for i in range(40)]
    dups = [rec(f"d{i}", th.DROPPED, "dedup", "duplicate:x", pair=f"o{i}") for i in range(30)]
    origs = [rec(f"o{i}", th.ORIGINAL, "dedup", "duplicate:x", pair=f"d{i}") for i in range(30)]
    tables = [th.records_table(x) for x in (kept[:25], dups[:12] + origs[5:], kept[25:] + dups[12:] + origs[:5])]
    merged = th.merge(tables)
    assert th.merge(list(reversed(tables))).equals(merged)
    roles = merged["role"].to_pylist()
    assert roles.count(th.KEPT_ROLE) == th.KEPT and roles.count(th.DROPPED) == th.PER_REASON
    chosen = {r["key"] for r in merged.to_pylist() if r["role"] == th.DROPPED}
    assert {r["pair"] for r in merged.to_pylist() if r["role"] == th.ORIGINAL} == chosen


def test_known_run_gallery_in_stats_and_report(known_run):
    out = known_run.output
    sample = pq.read_table(out / th.SAMPLES_FILE)
    stats = json.loads((out / "stats.json").read_text())
    groups = {(g["stage"], g["reason"]): g for g in stats["gallery"]}
    assert len(groups[("caption_length", "caption_too_few_words")]["entries"]) == SHORT
    assert len(groups[("image_rules", "image_too_small")]["entries"]) == TINY
    assert sum(len(g["entries"]) for (s, _), g in groups.items() if s == "language") == FOREIGN
    assert len(groups[(None, None)]["entries"]) == min(th.KEPT, CLEAN) and groups[(None, None)]["rows"] == CLEAN
    dups = groups[("dedup_exact", "duplicate:exact_image")]
    assert len(dups["entries"]) == DUPES and dups["rows"] == DUPES
    thumbs = {r["key"]: r["thumbnail"] for r in sample.to_pylist()}
    for e in dups["entries"]:
        # the copy beside the kept row it was dropped against: the same picture
        assert e["original"]["key"] == e["duplicate_of"] and e["thumbnail"] and e["original"]["thumbnail"]
        assert thumbs[e["key"]] == thumbs[e["duplicate_of"]]
        assert e["caption"].startswith("another photo of the same house")
    assert all(e["thumbnail"] for g in stats["gallery"] for e in g["entries"])
    assert any(e["caption"] == SCRIPT_CAPTION for e in groups[("caption_length", "caption_too_few_words")]["entries"])
    assert "caption_words" in groups[("caption_length", "caption_too_few_words")]["entries"][0]["fields"]

    html = (out / "report.html").read_text()
    gallery = html.split('id="gallery"', 1)[1].split("<h2", 1)[0]
    n_thumbs = gallery.count('<img class="thumb" src="data:image/jpeg;base64,')
    assert n_thumbs == SHORT + TINY + FOREIGN + 2 * DUPES + min(th.KEPT, CLEAN)
    assert "caption_too_few_words" in gallery and "copy of" in gallery
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in gallery
    assert "<script" not in html.lower()


def _tars(src, bad: int | None = None) -> None:
    """3 tars of 40 rows: short captions dropped, tiny images dropped, and copies across tars."""
    for t in range(3):
        samples = []
        for i in range(40):
            copy = i % 9 == 0 and t > 0  # the same picture as tar 0's row i
            color = (i, 0 if copy else t * 70, 7)
            size = (6, 6) if i % 8 == 6 else (24, 24)
            samples.append({"__key__": f"t{t}_{i:03d}", "jpg": jpeg_bytes(size=size, color=color),
                            "txt": "x" if i % 4 == 1 else f"a photo of thing {i} in tar {t}"})
        write_tar(src / f"{t:03d}.tar", samples)
    if bad is not None:
        p = src / f"{bad:03d}.tar"
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] + b"\x07" * 3000)


def _recipe(make_recipe, src, out, batch: int, name: str):
    return make_recipe({"source": {"path": str(src)},
                        "stages": [{"use": "caption_length", "min_words": 2}, {"use": "image_rules", "min_side": 12},
                                   {"use": "dedup_exact", "by": ["image"]}],
                        "write": {"output": str(out), "samples_per_shard": 100},
                        "runtime": {"batch_size": batch, "read_batch_rows": batch}}, name)


def _sample_rows(out) -> list[tuple]:
    t = pq.read_table(out / th.SAMPLES_FILE)
    return sorted((r["stage"] or "", r["reason"] or "", r["role"], r["key"], r["pair"] or "", r["thumbnail"] or b"")
                  for r in t.to_pylist())


def test_resumed_run_merges_the_same_sample_as_an_uninterrupted_one(tmp_path, make_recipe, ray_session):
    clean_src, src = tmp_path / "clean", tmp_path / "src"
    _tars(clean_src)
    m = run(load_recipe(_recipe(make_recipe, clean_src, tmp_path / "a", 7, "a.yaml")))
    assert m.complete

    _tars(src, bad=1)
    recipe = _recipe(make_recipe, src, tmp_path / "b", 16, "b.yaml")
    with pytest.raises(SourceError):
        run(load_recipe(recipe))  # shards 0 and 2 are committed with their samples, then the run stops
    assert not (tmp_path / "b" / th.SAMPLES_FILE).exists()
    _tars(src)  # the file fixed: the re-run reads shard 1 only, then runs dedup and finalizes
    assert run(load_recipe(recipe)).complete

    a, b = _sample_rows(tmp_path / "a"), _sample_rows(tmp_path / "b")
    assert a == b
    fates = {(s, r) for s, r, *_ in a}
    assert {("caption_length", "caption_too_few_words"), ("image_rules", "image_too_small"),
            ("dedup_exact", "duplicate:exact_image"), ("", "")} <= fates
    assert sum(1 for s, r, role, *_ in a if (s, r, role) == ("caption_length", "caption_too_few_words", "dropped")) \
        == th.PER_REASON
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert sum(len(g["entries"]) for g in stats["gallery"]) == sum(1 for x in b if x[2] != th.ORIGINAL)


def test_thumbnails_off_writes_no_samples(tmp_path, make_recipe, ray_session):
    src = tmp_path / "src"
    _tars(src)
    path = _recipe(make_recipe, src, tmp_path / "off", 16, "off.yaml")
    recipe = load_recipe(path, overrides=["write.thumbnails=false"])
    assert recipe.fingerprint() != load_recipe(path).fingerprint()
    assert run(recipe).complete
    out = tmp_path / "off"
    assert not (out / th.SAMPLES_FILE).exists() and not (out / "_work" / "kept").exists()
    assert not list((out / "_work").glob("p*/samples"))
    assert json.loads((out / "stats.json").read_text())["gallery"] == []
    assert 'id="gallery"' not in (out / "report.html").read_text()
