"""stats.json against a run whose truth is known, the schema, the CLI, the report's escaping, scale."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pytest
from conftest import CLEAN, DUPES, FOREIGN, SCRIPT_CAPTION, SHORT, TINY, TOTAL

from curate.stats import compute_stats, write_stats
from curate.stats.report import render_report

ROOT = Path(__file__).resolve().parents[2]


def _stats(known_run) -> dict:
    return json.loads((known_run.output / "stats.json").read_text())


def test_run_writes_stats_and_report_and_names_them_in_the_manifest(known_run):
    manifest = json.loads((known_run.output / "manifest.json").read_text())
    assert manifest["stats"] == {"stats": "stats.json", "report": "report.html"}
    assert (known_run.output / "report.html").stat().st_size > 10_000


def test_funnel_adds_up_in_recipe_order_with_the_known_drops(known_run):
    s = _stats(known_run)
    assert s["rows"] == {"input": TOTAL, "kept": CLEAN, "dropped": TOTAL - CLEAN}
    assert [f["name"] for f in s["funnel"]] == ["caption_length", "image_rules", "language", "dedup_exact"]
    by_stage = {f["name"]: f for f in s["funnel"]}
    assert by_stage["caption_length"]["dropped"] == {"caption_too_few_words": SHORT}
    assert by_stage["image_rules"]["dropped"] == {"image_too_small": TINY}
    lang = by_stage["language"]["dropped"]
    assert sum(lang.values()) == FOREIGN and all(r.startswith("language:") and r != "language:en" for r in lang)
    assert by_stage["dedup_exact"]["dropped"] == {"duplicate:exact_image": DUPES}
    assert by_stage["dedup_exact"]["kind"] == "global"
    # each stage's rows_in is the previous stage's kept; the last kept is the run's kept
    alive = TOTAL
    for f in s["funnel"]:
        assert f["rows_in"] == alive and f["kept"] == alive - sum(f["dropped"].values())
        alive = f["kept"]
    assert alive == s["rows"]["kept"]
    assert all(s["checks"].values()) and "parquet_samples_equal_kept" in s["checks"]


def test_sources_and_tokens_match_the_input(known_run):
    s = _stats(known_run)
    rows = known_run.input.to_pylist()
    kept = set(range(CLEAN))  # the clean rows come first and are the only ones kept
    expected = {}
    for i, r in enumerate(rows):
        e = expected.setdefault(r["source"], {"rows": 0, "kept": 0, "tokens": 0, "kept_tokens": 0})
        e["rows"] += 1
        e["tokens"] += r["num_tokens"]
        if i in kept:
            e["kept"] += 1
            e["kept_tokens"] += r["num_tokens"]
    assert {x["source"]: {k: x[k] for k in ("rows", "kept", "tokens", "kept_tokens")} for x in s["sources"]} == expected
    assert s["tokens"] == {"column": "num_tokens", "total": sum(r["num_tokens"] for r in rows),
                           "kept": sum(rows[i]["num_tokens"] for i in kept)}


def test_score_distributions_before_and_after(known_run):
    s = _stats(known_run)
    scores = {d["column"]: d for d in s["scores"]}
    assert set(scores) == {"similarity", "lang_score"}  # sizes, tokens, codes are not scores
    sim = scores["similarity"]
    values = np.array(known_run.input["similarity"].to_pylist())
    assert sim["all"]["count"] == TOTAL and sim["kept"]["count"] == CLEAN
    assert sim["all"]["quantiles"]["p50"] == pytest.approx(np.percentile(values, 50))
    assert sim["kept"]["quantiles"]["p25"] == pytest.approx(np.percentile(values[:CLEAN], 25))
    assert sim["all"]["min"] == pytest.approx(values.min()) and sim["all"]["max"] == pytest.approx(values.max())
    for d in [*s["scores"], s["caption_chars"], s["caption_words"], s["image_sizes"]["aspect_ratio"]]:
        h = d["histogram"]
        assert len(h["edges"]) == len(h["all"]) + 1 == len(h["kept"]) + 1
        assert sum(h["all"]) == d["all"]["count"] and sum(h["kept"]) == d["kept"]["count"]
        assert all(k <= a for a, k in zip(h["all"], h["kept"], strict=True))
    # the language stage scored only the rows that reached it
    assert scores["lang_score"]["all"]["count"] == TOTAL - SHORT - TINY


def test_caption_language_size_and_duplicate_sections(known_run):
    s = _stats(known_run)
    captions = known_run.input["caption"].to_pylist()
    words = s["caption_words"]
    assert words["all"]["count"] == TOTAL
    assert words["kept"]["min"] == words["kept"]["max"] == len(captions[0].split())
    assert s["caption_chars"]["all"]["max"] == max(len(c) for c in captions)
    langs = {c["value"]: c for c in s["languages"]["counts"]}
    assert s["languages"]["column"] == "lang"
    assert langs["en"] == {"value": "en", "rows": CLEAN + DUPES, "kept": CLEAN}
    assert sum(c["rows"] for c in langs.values()) == TOTAL - SHORT - TINY
    sizes = s["image_sizes"]
    assert (sizes["width_column"], sizes["height_column"]) == ("width", "height")
    assert sizes["width"]["all"]["count"] == TOTAL - SHORT  # image_rules read every row that reached it
    assert sizes["width"]["kept"]["min"] == sizes["width"]["kept"]["max"] == 64
    assert sizes["aspect_ratio"]["kept"]["quantiles"]["p50"] == pytest.approx(64 / 48)
    assert s["duplicates"] == [{"stage": "dedup_exact", "level": "image", "cluster_sizes": {"2": DUPES},
                                "clusters": DUPES, "rows_in_clusters": 2 * DUPES, "removed": DUPES}]
    # examples: the kept rows with the smallest keys, then a few per drop reason
    fates = {(e["stage"], e["reason"]) for e in s["examples"]}
    assert (None, None) in fates and ("caption_length", "caption_too_few_words") in fates
    assert any(e["caption"] == SCRIPT_CAPTION for e in s["examples"])


def test_stats_json_validates_against_the_committed_schema(known_run):
    schema = json.loads((ROOT / "schemas" / "stats.schema.json").read_text())
    jsonschema.validate(_stats(known_run), schema)
    broken = _stats(known_run)
    broken["rows"]["kept"] = "twenty"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_report_escapes_captions_and_embeds_every_plot(known_run):
    html = (known_run.output / "report.html").read_text()
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in html
    assert "<script" not in html.lower()  # the page has no script at all, so none can have been injected
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) >= 10  # funnel, reasons, sources, tokens, 2 scores, 2 caption, languages, 3 sizes, dups
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.width > 100 and img.height > 100
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from anywhere
    assert "default-src 'none'" in html


def test_cli_stats_rewrites_the_files_and_fails_clearly_without_a_manifest(known_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(known_run.output, out)
    (out / "stats.json").unlink()
    (out / "report.html").unlink()
    r = subprocess.run([sys.executable, "-m", "curate.cli", "stats", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{TOTAL} rows in, {CLEAN} kept" in r.stdout and "report.html" in r.stdout
    assert json.loads((out / "stats.json").read_text())["rows"]["input"] == TOTAL
    assert (out / "report.html").exists()

    r = subprocess.run([sys.executable, "-m", "curate.cli", "stats", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"{tmp_path / 'nothing'}: no manifest.json" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ a large synthetic output


def _synthetic_output(root: Path, files: int, rows_per_file: int) -> dict:
    """A run's output written with curate's own ledger sink and manifest model, without running stages.

    Shard 0 lacks the clip_score column and holds a null-typed column, as a shard
    whose rows never reached a stage would; ``tag`` is int in odd shards and text in
    even ones; markers carry the packed sink's block.
    """
    from curate.fsutil import write_json
    from curate.manifest import Counts, Manifest, StageCounters
    from curate.sinks.parquet import write_ledger

    rng = np.random.default_rng(0)
    truth = {"input": 0, "kept": 0, "scored": 0, "dropped": {}}
    ledger = []
    for f in range(files):
        n = rows_per_file
        score = rng.random(n).astype(np.float32)
        is_source_drop = rng.random(n) < 0.01
        status = np.where(is_source_drop, "dropped", np.where(score >= 0.3, "kept", "dropped"))
        by = np.where(is_source_drop, "source", np.where(score >= 0.3, None, "clip_score"))
        reason = np.where(is_source_drop, "image_missing", np.where(score >= 0.3, None, "clip_score_low"))
        cols = {
            "key": pa.array([f"{f:05d}{i:06d}" for i in range(n)]), "url": pa.array([f"http://h/{f}/{i}" for i in range(n)]),
            "caption": pa.array(["word " * (i % 7 + 1) for i in range(n)]), "status": pa.array(status.tolist()),
            "dropped_by": pa.array(by.tolist(), pa.string()), "reason": pa.array(reason.tolist(), pa.string()),
            "source": pa.array(["a" if i % 3 else "b" for i in range(n)]),
        }
        cols["tag"] = pa.array([f] * n) if f % 2 else pa.array([str(f)] * n)  # int here, text there
        if f == 0:
            cols["later_column"] = pa.nulls(n)
        else:
            cols["clip_score"] = pa.array(np.where(is_source_drop, np.nan, score), pa.float32())
            truth["scored"] += int((~is_source_drop).sum())
        write_ledger(pa.table(cols), str(root / "ledger" / f"{f:05d}.parquet"))
        ledger.append(f"ledger/{f:05d}.parquet")
        write_json(str(root / "_done" / f"{f:05d}.json"),
                   {"shard": f, "packed": {"sequences": 10, "samples": 300, "tokens": 3900 * 10, "capacity": 4096 * 10,
                                         "efficiency": round(3900 / 4096, 6), "outputs": []}})
        truth["input"] += n
        truth["kept"] += int((status == "kept").sum())
        for b, r in zip(by.tolist(), reason.tolist(), strict=True):
            if b is not None:
                truth["dropped"].setdefault(b, {}).setdefault(r, 0)
                truth["dropped"][b][r] += 1
    stages = [StageCounters(name="clip_score", use="clip_score", kind="map", rows_in=0, kept=0, seconds=0.0)]
    manifest = Manifest(curate_version="0", recipe={}, recipe_fingerprint="x", complete=True, shards=[],
                        ledger=ledger, counts=Counts(input=truth["input"], kept=truth["kept"],
                                                     dropped=truth["dropped"]), stages=stages, elapsed_seconds=0)
    write_json(str(root / "manifest.json"), manifest.model_dump(mode="json"))
    return truth


def test_large_ledger_with_differing_shard_schemas(tmp_path):
    truth = _synthetic_output(tmp_path, files=5, rows_per_file=20_000)
    t0 = time.perf_counter()
    stats = write_stats(str(tmp_path))
    elapsed = time.perf_counter() - t0
    assert stats.rows.input == truth["input"] == 100_000 and stats.rows.kept == truth["kept"]
    assert all(stats.checks.values()), stats.checks
    assert [f.name for f in stats.funnel] == ["source", "clip_score"]  # unreadable input first
    assert stats.funnel[0].dropped == truth["dropped"]["source"]
    clip = next(d for d in stats.scores if d.column == "clip_score")
    assert clip.all.count == sum(clip.histogram.all) == truth["scored"]  # NaN and absent columns are nulls
    assert clip.kept.min >= 0.3 and clip.all.nulls == 100_000 - clip.all.count
    assert {s.source for s in stats.sources} == {"a", "b"} and sum(s.rows for s in stats.sources) == 100_000
    assert stats.packing is not None and stats.packing.efficiency == pytest.approx(3900 / 4096)
    assert stats.packing.sequences == 50
    assert {d.column for d in stats.scores} == {"clip_score"}  # not the null-typed or int/text-conflicting ones
    assert elapsed < 60, f"stats over 100k rows took {elapsed:.1f}s (1M rows take ~8 s on 2 idle cores)"
    assert "<img" in render_report(compute_stats(str(tmp_path)))


def test_histogram_of_a_huge_constant_column_does_not_fail():
    """Values near ±2**63 (a 64-bit hash read as a number) leave a bin width of 0.0 in float."""
    import polars as pl

    from curate.stats.compute import _bin_counts, _edges

    v = -(2**63) + 5
    lf = pl.LazyFrame({"v": [v] * 4, "k": [True, False, True, True]})
    edges = _edges(float(v), float(v), integer=True)
    assert _bin_counts(lf, "v", edges, pl.col("k")) == ([4], [3])
