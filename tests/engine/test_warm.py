"""A local download run: the warm start (curate/engine/warm.py) and the worker processes it starts.

Two ``curate run`` processes (each starts its own local Ray, as a user's does) download the same
list from a real HTTP server on 127.0.0.1, with and without the warm start; their outputs must be
the same sample for sample. A download-only run starts its actors and no other worker process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

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


def _recipe(tmp: Path, base: str, warm: bool, name: str) -> tuple[Path, Path]:
    urls = [f"{base}/{i}.jpg" for i in range(N - 10)] + [f"{base}/missing-{i}.jpg" for i in range(10)]
    pq.write_table(pa.table({"url": urls, "caption": [f"photo number {i}" for i in range(N)]}), tmp / "in.parquet")
    out = tmp / f"out-{name}"
    recipe = write_recipe(tmp / f"r-{name}.yaml", {
        "source": {"path": str(tmp / "in.parquet"), "url_col": "url", "caption_col": "caption"},
        "stages": [{"use": "download", "image_size": 48, "allow_private_networks": True, "retries": 0,
                    "resources": {"batch_size": 100}},
                   {"use": "caption_length", "min_words": 3}],
        "write": {"output": str(out), "formats": ["webdataset", "parquet"], "samples_per_shard": 400},
        "runtime": {"num_cpus": 2, "warm_start": warm},
    })
    return recipe, out


def _cli(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "curate.cli", "run", str(recipe), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _run(tmp: Path, base: str, warm: bool, name: str | None = None) -> tuple[Path, dict]:
    recipe, out = _recipe(tmp, base, warm, name or str(warm))
    proc = _cli(recipe)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log.decode()
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


@pytest.fixture(scope="module")
def cold(tmp_path_factory, web):
    """The reference: the same list downloaded without the warm start."""
    return _run(tmp_path_factory.mktemp("cold"), web, warm=False)


def test_warm_start_output_equals_a_cold_run(tmp_path, web, cold):
    warm_out, warm_manifest = _run(tmp_path, web, warm=True)
    cold_out, cold_manifest = cold
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


def test_killed_during_the_warm_start_resumes_to_the_same_output(tmp_path, web, cold):
    """SIGKILL the run (driver and its Ray) once the first part file is written, then run it again."""
    recipe, out = _recipe(tmp_path, web, True, "killed")
    proc = _cli(recipe)
    parts = out / "_work" / "p0" / "parts"
    deadline = time.time() + 120
    while not (parts.is_dir() and any(parts.glob("*.parquet"))):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no part file within 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    resumed_out, manifest = _run(tmp_path, web, True, "killed")
    assert manifest["complete"] and manifest["counts"] == cold[1]["counts"]
    assert _ledger(resumed_out) == _ledger(cold[0])
    assert _samples(resumed_out) == _samples(cold[0])


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


def test_a_local_download_run_starts_no_worker_but_its_actors(tmp_path, web, cold):
    """The download actors read their own work units and write their own parts, and a local run
    finalizes its shards in the driver: no Ray task runs, so no task worker process starts (each
    would import Ray, Ray Data and curate). Counted from Ray's per-process core-worker logs."""
    recipe, out = _recipe(tmp_path, web, True, "lean")
    r = yaml.safe_load(recipe.read_text())
    r["stages"] = r["stages"][:1]  # download only: the caption rule would run as Ray tasks
    write_recipe(recipe, r)
    ray_tmp = tempfile.mkdtemp(prefix="crl")  # short: Ray's socket paths must stay under 107 characters
    try:
        proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "run", str(recipe), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "RAY_TMPDIR": ray_tmp})
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log.decode()
        # one log per worker process, named ..._PID.log (session_latest links to the one session)
        workers = {p.stem.rsplit("_", 1)[1] for p in Path(ray_tmp).glob("ray/session_2*/logs/python-core-worker-*.log")}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["kept"] == N - 10
    assert _samples(out) == _samples(cold[0])
    assert 1 <= len(workers) <= 2, workers  # the actor pool (2 CPUs): nothing else
