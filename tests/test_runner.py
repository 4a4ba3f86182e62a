"""End-to-end runs on a real local Ray: round trips, ledger, manifest, resume, refusal, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.errors import InputError, OutputError
from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, png_bytes, write_tar


def _world(tmp_path: Path, n_tars=3, per_tar=20) -> dict[str, dict]:
    """Tars with some short captions, some duplicate captions, one sample without an image."""
    samples: dict[str, dict] = {}
    for t in range(n_tars):
        batch = []
        for i in range(per_tar):
            key = f"t{t}_{i:04d}"
            cap = f"a photo of object number {t * 100 + i}" if i % 6 else "x"
            if i == 5:
                cap = "a shared caption seen twice"
            s = {"__key__": key, "txt": cap, "json": {"url": f"http://h/{key}.jpg", "width": 32, "tag": t}}
            if not (t == 1 and i == 3):
                s["png" if i == 7 else "jpg"] = png_bytes(color=(i, t, 9, 255)) if i == 7 else jpeg_bytes(color=(i * 9, t * 50, 7))
            batch.append(s)
            samples[key] = s
        write_tar(tmp_path / "src" / f"{t:03d}.tar", batch)
    return samples


def _recipe(tmp_path, make_recipe, out="out", **write):
    return make_recipe({
        "source": {"path": str(tmp_path / "src" / "*.tar")},
        "stages": [
            {"use": "caption_length", "min_words": 2},
            {"use": "dedup_exact", "by": ["caption"]},
        ],
        "write": {"output": str(tmp_path / out), "samples_per_shard": 100, **write},
    })


def _read_ledger(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger").glob("*.parquet"))],
                            promote_options="permissive")


def test_webdataset_source_round_trip(tmp_path, make_recipe, ray_session):
    samples = _world(tmp_path)
    manifest = run(load_recipe(_recipe(tmp_path, make_recipe)))
    out = tmp_path / "out"
    ledger = _read_ledger(out)
    assert ledger.num_rows == len(samples) == manifest.counts.input
    assert sorted(ledger["key"].to_pylist()) == sorted(samples)
    assert "image" not in ledger.column_names
    by_key = {r["key"]: r for r in ledger.to_pylist()}
    assert by_key["t1_0003"]["reason"] == "image_missing" and by_key["t1_0003"]["dropped_by"] == "source"
    assert by_key["t0_0000"]["reason"] == "caption_too_few_words"
    # exact caption duplicate: smallest key kept, the others point at it
    dups = [r for r in ledger.to_pylist() if r["caption"] == "a shared caption seen twice"]
    kept = [r for r in dups if r["status"] == "kept"]
    assert [r["key"] for r in kept] == ["t0_0005"]
    assert {r["duplicate_of"] for r in dups if r["status"] == "dropped"} == {"t0_0005"}
    assert by_key["t2_0001"]["tag"] == 2  # carried-through source column

    kept_keys = sorted(r["key"] for r in ledger.to_pylist() if r["status"] == "kept")
    assert manifest.counts.kept == len(kept_keys)
    assert manifest.counts.input == manifest.counts.kept + sum(
        n for reasons in manifest.counts.dropped.values() for n in reasons.values())

    # WebDataset shards read back byte-identical with webdataset
    tars = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    seen = {}
    for sample in wds.WebDataset(tars, shardshuffle=False):
        ext = "jpg" if "jpg" in sample else "png"
        seen[sample["__key__"]] = sample
        assert sample[ext] == samples[sample["__key__"]][ext]
        assert sample["txt"].decode() == samples[sample["__key__"]]["txt"]
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and meta["url"].endswith(".jpg")
    assert sorted(seen) == kept_keys

    # Parquet shards read back byte-identical with pyarrow
    pq_tables = [pq.read_table(p) for p in sorted((out / "parquet").glob("*.parquet"))]
    table = pa.concat_tables(pq_tables)
    assert sorted(table["key"].to_pylist()) == kept_keys
    for row in table.select(["key", "image", "image_format"]).to_pylist():
        assert row["image"] == samples[row["key"]][row["image_format"]]

    # the manifest lists every file with its sample count, relative to the output root
    m = json.loads((out / "manifest.json").read_text())
    schemas = Path(__file__).resolve().parent.parent / "schemas"
    jsonschema.validate(m, json.loads((schemas / "manifest.schema.json").read_text()))
    row_schema = json.loads((schemas / "ledger-row.schema.json").read_text())
    for row in ledger.to_pylist():
        jsonschema.validate(row, row_schema)
    assert m["complete"] is True
    assert sum(s["num_samples"] for s in m["shards"] if s["format"] == "webdataset") == len(kept_keys)
    assert all((out / s["path"]).exists() for s in m["shards"])
    assert [s["name"] for s in m["stages"]] == ["source", "caption_length", "dedup_exact"]
    assert m["stages"][2]["info"]["caption"]["cluster_sizes"]["3"] == 1
    stats = json.loads((out / "shard_stats" / "00000_stats.json").read_text())
    assert stats["count"] == 20 and stats["successes"] + sum(
        v for k, v in stats["status_dict"].items() if k != "success") == 20


def test_rerun_is_a_noop_and_other_recipe_is_refused(tmp_path, make_recipe, ray_session):
    _world(tmp_path, n_tars=2, per_tar=10)
    recipe = _recipe(tmp_path, make_recipe)
    first = run(load_recipe(recipe))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.tar")}
    again = run(load_recipe(recipe))
    assert again.counts == first.counts
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.tar")} == before
    with pytest.raises(OutputError, match="different recipe"):
        run(load_recipe(recipe, overrides=["stages.0.min_words=6"]))
    third = run(load_recipe(recipe, overrides=["stages.0.min_words=6"]), overwrite=True)
    assert third.counts.kept < first.counts.kept


def test_output_with_foreign_files_is_refused(tmp_path, make_recipe, ray_session):
    _world(tmp_path, n_tars=1, per_tar=3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        run(load_recipe(_recipe(tmp_path, make_recipe)))
    assert (tmp_path / "out" / "precious.txt").exists()


def test_parquet_image_source_and_url_list_shards(tmp_path, make_recipe, ray_session):
    images = [jpeg_bytes(color=(i, 2 * i, 3)) for i in range(12)]
    pq.write_table(pa.table({"image": images, "caption": [f"two words {i}" for i in range(12)],
                             "url": [f"http://x/{i}" for i in range(12)]}), tmp_path / "imgs.parquet",
                   row_group_size=5)
    recipe = make_recipe({"source": {"path": str(tmp_path / "imgs.parquet")},
                          "stages": [{"use": "dedup_exact", "by": ["image"]}],
                          "write": {"output": str(tmp_path / "o"), "samples_per_shard": 5,
                                    "formats": ["parquet"]}})
    m = run(load_recipe(recipe))
    assert m.counts.input == 12 and m.counts.kept == 12
    t = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "o" / "parquet").glob("*.parquet"))])
    assert sorted(t["image"].to_pylist()) == sorted(images)
    assert not list((tmp_path / "o").glob("webdataset/*"))


def test_rows_are_never_lost_with_empty_and_tiny_shards(tmp_path, make_recipe, ray_session):
    write_tar(tmp_path / "src" / "000.tar", [])
    write_tar(tmp_path / "src" / "001.tar", [{"__key__": "only", "jpg": jpeg_bytes(), "txt": "one two three"}])
    m = run(load_recipe(_recipe(tmp_path, make_recipe)))
    assert m.counts.input == 1 and m.counts.kept == 1 and m.complete


SIGKILL_RECIPE = """\
source:
  path: {src}
stages:
  - use: caption_length
    min_words: 2
  - use: dedup_exact
    by: [caption]
write:
  output: {out}
  samples_per_shard: 100
runtime:
  num_cpus: 2
"""


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "curate.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_same_keys(tmp_path):
    """Kill the driver (and its local Ray) mid-run; re-running yields the uninterrupted run's kept keys."""
    _world(tmp_path, n_tars=24, per_tar=30)
    # two-phase plan (dedup is global) so the kill lands inside the final phase's finalizing
    ref = tmp_path / "ref.yaml"
    ref.write_text(SIGKILL_RECIPE.format(src=tmp_path / "src" / "*.tar", out=tmp_path / "ref"))
    killed = tmp_path / "killed.yaml"
    killed.write_text(SIGKILL_RECIPE.format(src=tmp_path / "src" / "*.tar", out=tmp_path / "killed"))

    proc = _cli("run", str(killed), "--no-progress")
    done_dir = tmp_path / "killed" / "_done"
    deadline = time.time() + 240
    while time.time() < deadline:
        if done_dir.exists() and len(list(done_dir.glob("*.json"))) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("run finished before it could be killed:\n" + proc.stdout.read().decode())
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(done_dir.glob("*.json")))
    assert 0 < n_done < 24, n_done
    assert not (tmp_path / "killed" / "manifest.json").exists()

    for recipe in (killed, ref):
        p = _cli("run", str(recipe), "--no-progress")
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()

    def kept(root: Path) -> list[str]:
        keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (root / "webdataset").glob("*.tar")),
                                                    shardshuffle=False)]
        assert len(keys) == len(set(keys)), "a sample was written twice"
        return sorted(keys)

    assert kept(tmp_path / "killed") == kept(tmp_path / "ref")
    ledger = _read_ledger(tmp_path / "killed")
    assert ledger.num_rows == 24 * 30 and len(set(ledger["key"].to_pylist())) == 24 * 30
    assert not list((tmp_path / "killed").rglob("*.tmp*")) or all(
        "_work" in str(p) for p in (tmp_path / "killed").rglob("*.tmp*"))


def test_metadata_null_in_one_batch_and_numeric_in_the_next(tmp_path, make_recipe, ray_session):
    write_tar(tmp_path / "src" / "0.tar", [
        {"__key__": f"k{i}", "jpg": jpeg_bytes(color=(i, 1, 1)), "txt": "one two three",
         "json": {"punsafe": None if i < 2 else 0.1 * i}} for i in range(4)])
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "write": {"output": str(tmp_path / "out")}, "runtime": {"read_batch_rows": 2}})
    m = run(load_recipe(recipe))
    assert m.counts.kept == 4
    assert _read_ledger(tmp_path / "out")["punsafe"].to_pylist() == [None, None, 0.2, pytest.approx(0.3)]


def test_global_stage_column_typo_fails_before_any_download(tmp_path, make_recipe):
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a b c"]}), tmp_path / "u.parquet")
    recipe = make_recipe({"source": {"path": str(tmp_path / "u.parquet")},
                          "stages": [{"use": "download", "allow_private_networks": True},
                                     {"use": "keep_fraction", "column": "clip_scor", "fraction": 0.3}],
                          "write": {"output": str(tmp_path / "out")}})
    from curate.errors import CurateError

    with pytest.raises(CurateError, match=r"keep_fraction reads column\(s\) \['clip_scor'\]"):
        run(load_recipe(recipe))
    assert not (tmp_path / "out").exists()


def test_global_stage_refuses_keys_repeated_across_shards(tmp_path, make_recipe, ray_session):
    """Decisions join on keys, so a key in two shards stops the global phase naming it, even when one
    of the two rows was already dropped (the global phase reads only kept rows' columns, all keys)."""
    for t in range(2):
        write_tar(tmp_path / "src" / f"{t:03d}.tar",
                  [{"__key__": f"k{i}", "jpg": jpeg_bytes(color=(i * 40, t * 90, 3)),
                    "txt": "x" if (t, i) == (1, 0) else f"caption words {t} {i}"} for i in range(3)])
    recipe = make_recipe({"source": {"path": str(tmp_path / "src" / "*.tar")},
                          "stages": [{"use": "caption_length", "min_words": 2},
                                     {"use": "dedup_exact", "by": ["caption"]}],
                          "write": {"output": str(tmp_path / "o")}})
    with pytest.raises(InputError, match=r"unique keys; repeated: \['k0', 'k1', 'k2'\]"):
        run(load_recipe(recipe))


def test_the_reports_imports_wait_until_rays_workers_hand_rows_back(tmp_path, make_recipe, ray_session,
                                                                     monkeypatch):
    """The report's imports (about a second of the driver's CPU) run while the stages work, not while
    Ray Data starts its operators and the first actors are created."""
    import curate.stats.report as report
    from curate.engine.events import RowsDone

    _world(tmp_path)
    events: list[tuple[str, float]] = []
    monkeypatch.setattr(report, "preload", lambda: events.append(("preload", time.monotonic())))

    def on_progress(event):
        if isinstance(event, RowsDone):
            events.append(("rows", time.monotonic()))

    run(load_recipe(_recipe(tmp_path, make_recipe)), on_progress=on_progress)
    for _ in range(50):  # the preload thread may still be on its way once the run returns
        if any(name == "preload" for name, _ in events):
            break
        time.sleep(0.1)
    names = [name for name, _ in sorted(events, key=lambda e: e[1])]
    assert names.count("preload") == 1 and names.index("preload") > names.index("rows")
