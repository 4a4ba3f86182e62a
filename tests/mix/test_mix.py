"""`curate mix`: two real curated outputs mixed at 70/30 by samples and by tokens, read back as users do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import RecipeError
from curate.mix import load_mixture, read_mixture_manifest, run_mix, select
from curate.pack.tokens import ApproximateCounter
from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_recipe, write_tar

RATIO_TOLERANCE = 0.01  # the bar: 70/30 ± 1 % by the chosen unit
N_WEB, N_BOOK = 300, 200


def _samples(name: str, n: int, *, num_tokens: bool) -> pa.Table:
    cols = {"key": [f"{name}{i:04d}" for i in range(n)],
            "caption": [" ".join([f"{name}{i}"] * (1 + (i * 7) % 40)) for i in range(n)],
            "image": pa.array([jpeg_bytes(size=(16, 16), color=(i % 256, len(name) * 20, 9)) for i in range(n)],
                              pa.binary())}
    if num_tokens:
        cols["num_tokens"] = pa.array([20 + 3 * (i % 11) for i in range(n)], pa.int32())
    return pa.table(cols)


def _curated_by_run(tmp, name: str, n: int) -> str:
    """A real curate run's output (manifest, parquet and webdataset shards) of ``n`` tiny samples."""
    src = tmp / f"{name}-src.parquet"
    pq.write_table(_samples(name, n, num_tokens=False), src, row_group_size=64)
    recipe = write_recipe(tmp / f"{name}.yaml", {
        "source": {"path": str(src), "key_col": "key"},
        "write": {"output": str(tmp / name), "samples_per_shard": 128}})
    run(load_recipe(recipe))
    return str(tmp / name)


def _curated_by_sinks(tmp, name: str, n: int, per_shard: int = 128) -> str:
    """The same layout written with the runner's own sinks and manifest model (no Ray: keeps the test fast)."""
    from curate import __version__, rows
    from curate.fsutil import write_json
    from curate.manifest import Counts, Manifest, ShardEntry
    from curate.sinks.parquet import write_parquet_shard
    from curate.sinks.webdataset import write_webdataset

    table = _samples(name, n, num_tokens=True)
    table = table.append_column(rows.STATUS, pa.array([rows.KEPT] * n, pa.string()))
    out, shards = tmp / name, []
    for i, lo in enumerate(range(0, n, per_shard)):
        part = table.slice(lo, per_shard)
        shards += [ShardEntry(path=f"webdataset/{i:05d}.tar", format="webdataset",
                              num_samples=write_webdataset(part, f"{out}/webdataset/{i:05d}.tar")),
                   ShardEntry(path=f"parquet/{i:05d}.parquet", format="parquet",
                              num_samples=write_parquet_shard(part, f"{out}/parquet/{i:05d}.parquet"))]
    write_json(f"{out}/manifest.json", Manifest(
        curate_version=__version__, recipe={}, recipe_fingerprint="test", complete=True, shards=shards, ledger=[],
        counts=Counts(input=n, kept=n), stages=[], elapsed_seconds=0.0).model_dump(mode="json"))
    return str(out)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("mix-inputs")
    return {"web": _curated_by_run(tmp, "web", N_WEB), "book": _curated_by_sinks(tmp, "book", N_BOOK)}


def _mixture(tmp_path, outputs, name="mix.yaml", **over) -> str:
    data = {"sources": [{"name": "web", "path": outputs["web"], "weight": 0.7},
                        {"name": "book", "path": outputs["book"], "weight": 0.3}],
            "unit": "samples", "total_samples": 200, "seed": 3,
            "write": {"output": str(tmp_path / "out"), "samples_per_shard": 64}}
    data.update(over)
    return str(write_recipe(tmp_path / name, data))


def _read_parquet(out: str) -> pa.Table:
    manifest = read_mixture_manifest(out)
    return pa.concat_tables([pq.read_table(f"{out}/{s['path']}") for s in manifest["shards"]
                             if s["format"] == "parquet"], promote_options="permissive")


def test_samples_70_30_round_trips_through_webdataset_and_pyarrow(tmp_path, outputs):
    import webdataset as wds

    result = run_mix(load_mixture(_mixture(tmp_path, outputs)))
    m = result.manifest
    assert m["samples"] == 200 and m["seed"] == 3
    web, book = m["sources"]
    assert (web["samples"], book["samples"]) == (140, 60)
    assert abs(web["achieved_ratio"] - 0.7) <= RATIO_TOLERANCE and web["requested_ratio"] == 0.7
    assert web["unique_samples"] == 140 and web["available_samples"] == N_WEB and not web["capped"]

    table = _read_parquet(result.output)
    assert table.num_rows == 200 and len(set(table["key"].to_pylist())) == 200
    assert Counter(table["mix_source"].to_pylist()) == {"web": 140, "book": 60}
    # image bytes travel unchanged from the source shard to the mixture
    source_rows = {r["key"]: r for r in pq.read_table(f"{outputs['book']}/parquet").to_pylist()}
    for r in table.filter(pa.compute.equal(table["mix_source"], "book")).to_pylist()[:10]:
        assert r["key"] == f"book_{r['source_key']}"
        assert r["image"] == source_rows[r["source_key"]]["image"]
        assert r["caption"] == source_rows[r["source_key"]]["caption"]
    # sources are interleaved, not concatenated: both appear in the first shard
    first = pq.read_table(f"{result.output}/parquet/00000.parquet")
    assert set(first["mix_source"].to_pylist()) == {"web", "book"} and first.num_rows == 64

    tars = sorted(f"{result.output}/{s['path']}" for s in m["shards"] if s["format"] == "webdataset")
    assert len(tars) == math.ceil(200 / 64)
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert len(samples) == 200
    assert [s["__key__"] for s in samples] == table["key"].to_pylist()
    assert all(s["txt"] == s["json"]["caption"] and s["jpg"] is not None for s in samples)

    again = run_mix(load_mixture(_mixture(tmp_path, outputs), output=str(tmp_path / "again")))
    assert _read_parquet(again.output)["key"].to_pylist() == table["key"].to_pylist()  # seeded: same rows
    other = run_mix(load_mixture(_mixture(tmp_path, outputs, seed=4), output=str(tmp_path / "other")))
    assert set(_read_parquet(other.output)["key"].to_pylist()) != set(table["key"].to_pylist())


def _approx_unit(caption: str) -> int:
    """A sample in the default unit (no source records one): 144 image tokens + the pack stage's
    approximate caption count + 2 (BOS/EOS)."""
    return 144 + ApproximateCounter().count([caption])[0] + 2


def test_tokens_70_30_without_a_recorded_unit_recounts_or_trusts_a_declared_column(tmp_path, outputs):
    # neither output records a unit (no pack stage): both are counted in the default unit, book's
    # num_tokens column included (nothing says what it counted), unless the mixture vouches for it
    web_tokens = sum(_approx_unit(c) for c in pq.read_table(f"{outputs['web']}/parquet")["caption"].to_pylist())
    total = int(web_tokens * 0.5 / 0.7)  # web's share is half of what it has: feasible without repeats
    result = run_mix(load_mixture(_mixture(tmp_path, outputs, unit="tokens", total_samples=None,
                                           total_tokens=total)))
    m = result.manifest
    web, book = m["sources"]
    assert m["token_unit"]["tokenizer"] == "approximate" and m["token_unit"]["image_tokens"] == 144
    assert web["tokens_from"] == {"recount": web["files"]} and book["tokens_from"] == {"recount": book["files"]}
    assert not web["tokens_exact"] and web["token_count"].startswith("144 per image + caption tokens (approximate")
    assert abs(web["achieved_ratio"] - 0.7) <= RATIO_TOLERANCE
    assert abs(book["achieved_ratio"] - 0.3) <= RATIO_TOLERANCE
    assert abs(m["tokens"] - total) <= 400  # within about one sample's tokens per source
    # the manifest's token counts are the rows' own: recount them from the written shards
    table = _read_parquet(result.output)
    by_source: Counter[str] = Counter()
    for r in table.to_pylist():
        assert r["num_tokens"] == _approx_unit(r["caption"])
        by_source[r["mix_source"]] += r["num_tokens"]
    assert by_source == {"web": web["tokens"], "book": book["tokens"]}
    assert web["samples"] + book["samples"] == table.num_rows

    # `tokens: column`: book's num_tokens are taken as they are (the user says they are in the unit)
    declared = _mixture(tmp_path, outputs, name="declared.yaml", unit="tokens", total_samples=None,
                        total_tokens=12000)
    mix = load_mixture(declared, output=str(tmp_path / "declared"), overrides=["sources.1.tokens=column"])
    book = run_mix(mix).manifest["sources"][1]
    assert book["tokens_from"] == {"declared_column": book["files"]}
    rows_ = _read_parquet(str(tmp_path / "declared")).to_pylist()
    original = {f"book{i:04d}": 20 + 3 * (i % 11) for i in range(N_BOOK)}
    assert all(r["num_tokens"] == original[r["source_key"]] for r in rows_ if r["mix_source"] == "book")
    assert abs(book["achieved_ratio"] - 0.3) <= RATIO_TOLERANCE


def test_short_source_error_cap_repeat_and_replace(tmp_path, outputs, caplog):
    big = {"total_samples": 600}  # book's 30 % is 180 ≤ 200, web's 70 % is 420 > 300
    with pytest.raises(RecipeError, match="'web' has 300 samples but its share is 420.*if_short: cap"):
        run_mix(load_mixture(_mixture(tmp_path, outputs, **big)))

    capped = run_mix(load_mixture(_mixture(tmp_path, outputs, if_short="cap", **big),
                                  output=str(tmp_path / "cap"))).manifest
    web = capped["sources"][0]
    assert web["capped"] and web["samples"] == 300 and web["shortfall"] == 120
    assert "taking all of it" in caplog.text

    rep = run_mix(load_mixture(_mixture(tmp_path, outputs, if_short="repeat", **big),
                               output=str(tmp_path / "rep")))
    web = rep.manifest["sources"][0]
    assert (web["samples"], web["unique_samples"]) == (420, 300) and web["epochs_achieved"] == 1.4
    keys = _read_parquet(rep.output)["key"].to_pylist()
    assert len(keys) == 600 == len(set(keys)) and sum(k.endswith("_1") for k in keys) == 120

    drawn = run_mix(load_mixture(_mixture(tmp_path, outputs, replace=True, **big),
                                 output=str(tmp_path / "replace"))).manifest
    web = drawn["sources"][0]
    assert web["samples"] == 420 and web["unique_samples"] < 300  # i.i.d. draws repeat some rows


def test_select_is_deterministic_and_exact():
    amount = np.ones(1000, np.int64)
    a = select(amount, 700, np.random.default_rng([1, 0]), replace=False, if_short="error", name="x", unit="samples")
    b = select(amount, 700, np.random.default_rng([1, 0]), replace=False, if_short="error", name="x", unit="samples")
    assert len(a.rows) == 700 == len(np.unique(a.rows)) and (a.rows == b.rows).all()
    tokens = np.arange(1, 101, dtype=np.int64)  # 5050 tokens in all
    t = select(tokens, 2500, np.random.default_rng(0), replace=False, if_short="error", name="x", unit="tokens")
    assert abs(int(tokens[t.rows].sum()) - 2500) <= 100


def test_mixture_file_errors_name_the_line(tmp_path, outputs):
    p = tmp_path / "bad.yaml"
    p.write_text(f"sources:\n  - name: web\n    path: {outputs['web']}\n    weight: -1\nunit: samples\n"
                 "total_samples: 10\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:4: sources\[0\]\.weight: .*greater than 0"):
        load_mixture(p, output=str(tmp_path / "o"))
    p.write_text(f"sources:\n  - name: web\n    path: {outputs['web']}\n    weight: 1\n    epochs: 2\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:2: sources\[0\]: .*exactly one of `weight` or `epochs`"):
        load_mixture(p, output=str(tmp_path / "o"))
    p.write_text(f"sources:\n  - {{name: web, path: {outputs['web']}, weight: 1}}\nunit: tokens\n")
    with pytest.raises(RecipeError, match="weights need a total: set total_tokens"):
        load_mixture(p, output=str(tmp_path / "o"))
    p.write_text(f"sources:\n  - {{name: web, path: {outputs['web']}, weight: 1}}\ntotal_samples: 5\nsed: 1\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:4: sed: unknown key"):
        load_mixture(p, output=str(tmp_path / "o"))


def test_cli_mixes_tars_by_epochs(tmp_path, outputs):
    # a plain WebDataset folder (not a curate output) and a run's webdataset shards, by epochs
    write_tar(tmp_path / "tars" / "a.tar", [{"__key__": f"t{i:03d}", "jpg": jpeg_bytes(size=(8, 8)),
                                             "txt": f"tar caption {i}", "json": {"num_tokens": 10}}
                                            for i in range(20)])
    mixture = tmp_path / "epochs.yaml"
    mixture.write_text(f"sources:\n  - {{name: tars, path: {tmp_path / 'tars'}, epochs: 2.5}}\n"
                       f"  - {{name: web, path: {outputs['web']}, epochs: 0.1, format: webdataset}}\n"
                       "write: {formats: [webdataset]}\n")
    out = tmp_path / "mixed"
    r = subprocess.run([sys.executable, "-m", "curate.cli", "mix", str(mixture), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # the tars' num_tokens record no unit: recounted, 144 image tokens + 4 caption tokens + 2 each
    assert "tars: 50 samples (20 unique), 7500 tokens (approx.)" in r.stdout
    m = json.loads((out / "mixture_manifest.json").read_text())
    tars, web = m["sources"]
    assert tars["format"] == "webdataset" and tars["epochs_achieved"] == 2.5 and not tars["tokens_exact"]
    assert tars["tokens_from"] == {"recount": 1} and web["tokens_from"] == {"recount": web["files"]}
    assert web["samples"] == 30 and web["format"] == "webdataset"
    assert not (out / "parquet").exists()

    other = tmp_path / "other"  # a non-empty folder that is not a mixture
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for target, says in ((tmp_path / "tars", "holds files of mixture source 'tars'"),
                         (other, "holds no mixture_manifest.json")):
        r = subprocess.run([sys.executable, "-m", "curate.cli", "mix", str(mixture), "-o", str(target)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_example_mixture_loads_and_matches_its_schema():
    from pathlib import Path

    import jsonschema
    import yaml

    root = Path(__file__).resolve().parents[2]  # the repository (this file is tests/mix/test_mix.py)
    example = root / "pipelines" / "mixtures" / "example.yaml"
    jsonschema.validate(yaml.safe_load(example.read_text()),
                        json.loads((root / "schemas" / "mixture.schema.json").read_text()))
    mix = load_mixture(example, output="runs/mix", overrides=["total_tokens=1000"])
    assert mix.unit == "tokens" and mix.total == 1000 and [s.weight for s in mix.sources] == [0.7, 0.3]
    with pytest.raises(RecipeError, match=r"--set unit=pixels: unit"):
        load_mixture(example, output="runs/mix", overrides=["unit=pixels"])
