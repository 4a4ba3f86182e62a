"""The warm start (curate/engine/warm.py): the driver downloads while Ray starts, and nothing else changes.

Two ``curate run`` processes (each starts its own local Ray, as a user's does) download the same
list from a real HTTP server on 127.0.0.1, with and without the warm start; their outputs must be
the same sample for sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.engine.plan import make_phases
from curate.engine.warm import light, wanted
from curate.recipe import Recipe
from curate.stages.base import StageConfig
from tests.conftest import jpeg_bytes, write_recipe

N = 700  # rows: 2 shards of 400 and 300, work units of 100 (7 units)


@pytest.fixture(scope="module")
def web():
    images = {f"/{i}.jpg": jpeg_bytes(size=(60 + i % 90, 50 + i % 70), color=(i % 251, (i * 7) % 253, 90))
              for i in range(N)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's API
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg" if body else "text/plain")
            body = body or b"not found"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _run(tmp: Path, base: str, warm: bool) -> tuple[Path, dict]:
    urls = [f"{base}/{i}.jpg" for i in range(N - 10)] + [f"{base}/missing-{i}.jpg" for i in range(10)]
    pq.write_table(pa.table({"url": urls, "caption": [f"photo number {i}" for i in range(N)]}), tmp / "in.parquet")
    out = tmp / f"out-{warm}"
    recipe = write_recipe(tmp / f"r-{warm}.yaml", {
        "source": {"path": str(tmp / "in.parquet"), "url_col": "url", "caption_col": "caption"},
        "stages": [{"use": "download", "image_size": 48, "allow_private_networks": True, "retries": 0,
                    "resources": {"batch_size": 100}},
                   {"use": "caption_length", "min_words": 3}],
        "write": {"output": str(out), "formats": ["webdataset", "parquet"], "samples_per_shard": 400},
        "runtime": {"num_cpus": 2, "warm_start": warm},
    })
    proc = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(recipe), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads((out / "manifest.json").read_text())


def _samples(out: Path) -> dict[str, tuple[str, str]]:
    got = {}
    for tar in sorted((out / "webdataset").glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            got[s["__key__"]] = (hashlib.sha256(s["jpg"]).hexdigest(), s["txt"].decode())
    return got


def _ledger(out: Path) -> list[tuple]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger").glob("*.parquet"))])
    return sorted(zip(t["key"].to_pylist(), t["status"].to_pylist(), t["reason"].to_pylist(),
                      t["sha256"].to_pylist(), strict=True))


def test_warm_start_output_equals_a_cold_run(tmp_path, web):
    warm_out, warm_manifest = _run(tmp_path, web, warm=True)
    cold_out, cold_manifest = _run(tmp_path, web, warm=False)
    # the driver ran at least the first work unit (it takes one before Ray starts); the cold run none
    assert warm_manifest["timings"]["warm_start_rows"] >= 100
    assert cold_manifest["timings"]["warm_start_rows"] == 0
    assert warm_manifest["complete"] and cold_manifest["complete"]
    assert warm_manifest["counts"] == cold_manifest["counts"]
    warm_ledger = _ledger(warm_out)
    assert warm_ledger == _ledger(cold_out) and len(warm_ledger) == N
    assert sum(r[1] == "kept" for r in warm_ledger) == N - 10
    samples = _samples(warm_out)
    assert samples == _samples(cold_out) and len(samples) == N - 10
    assert sorted(p.name for p in (warm_out / "webdataset").glob("*.tar")) == ["00000.tar", "00001.tar"]


def _cfg(use: str, **kw) -> StageConfig:
    return StageConfig.model_validate({"use": use, **kw})


def test_only_light_first_phases_are_run_by_the_driver():
    download, rules = _cfg("download"), _cfg("caption_length")
    assert light(make_phases([download, rules])[0])
    assert not light(make_phases([rules, download])[0])  # no I/O stage first: nothing to overlap
    assert not light(make_phases([download, _cfg("clip_score")])[0])  # a model stays on Ray
    assert not light(make_phases([_cfg("download", resources={"num_gpus": 1})])[0])
    assert light(make_phases([download, _cfg("dedup_exact")])[0])  # the phase before the global stage


def test_not_when_ray_runs_already_or_a_cluster_is_joined(ray_session):
    recipe = Recipe.model_validate({"source": {"path": "x.parquet"}, "stages": [{"use": "download"}]})
    phase = make_phases(recipe.stages)[0]
    assert not wanted(recipe, phase)  # this test session's Ray is up: ray.init would return at once
    joined = recipe.model_copy(update={"runtime": recipe.runtime.model_copy(update={"ray_address": "ray://h:1"})})
    assert not wanted(joined, phase)
