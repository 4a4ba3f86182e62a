"""Object storage: ``curate run`` reading from and writing to ``s3://`` on a real S3-compatible server.

The server is moto in server mode on 127.0.0.1 (:mod:`tests.s3_server`); the run is the
CLI in a subprocess, as a user would start it, with the standard AWS variables in its
environment — so its local Ray's workers see them too. Outputs are read back with the
readers a user would use on a bucket: s3fs file objects, tarfile, pyarrow.parquet.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import jpeg_bytes, write_recipe, write_tar
from tests.s3_server import S3Server

BUCKET = "curate-test"
N_TARS = 3
PER_TAR = 10
RUN_TIMEOUT_S = 240


def _image(t: int, i: int) -> bytes:
    """Distinct bytes per sample, except every 5th sample of tar t>0 repeats tar 0's image (a duplicate)."""
    return jpeg_bytes(color=((0 if t > 0 and i % 5 == 0 else t * 60), i * 20, 40))


def _caption(t: int, i: int) -> str:
    return "short" if i % 4 == 3 else f"a photo of sample {i} from tar {t}"


def expected_kept() -> list[str]:
    """caption_length drops i % 4 == 3; dedup_exact keeps tar 0's copy of each repeated image."""
    kept = []
    for t in range(N_TARS):
        for i in range(PER_TAR):
            if i % 4 == 3 or (t > 0 and i % 5 == 0):
                continue
            kept.append(f"t{t}/s{i:03d}")
    return sorted(kept)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, with the input tars uploaded to s3://BUCKET/in/."""
    server = S3Server().start()
    fs = server.filesystem()
    fs.mkdir(BUCKET)
    local = tmp_path_factory.mktemp("s3in")
    for t in range(N_TARS):
        samples = [{"__key__": f"t{t}/s{i:03d}", "jpg": _image(t, i), "txt": _caption(t, i),
                    "json": {"url": f"http://example.test/{t}/{i}.jpg", "tar": t}} for i in range(PER_TAR)]
        write_tar(local / f"{t:03d}.tar", samples)
        fs.put_file(str(local / f"{t:03d}.tar"), f"{BUCKET}/in/{t:03d}.tar")
    yield server, fs
    server.stop()


def _recipe(tmp_path: Path, out: str) -> Path:
    return write_recipe(tmp_path / "s3.yaml", {
        "source": {"path": f"s3://{BUCKET}/in/"},
        "stages": [{"use": "caption_length", "min_words": 3}, {"use": "dedup_exact", "by": ["image"]}],
        "write": {"output": out, "formats": ["webdataset", "parquet"]},
        "runtime": {"num_cpus": 2},
    })


def curate_run(server: S3Server, recipe: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **server.env(), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(recipe), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def _read_json(fs, path: str):
    with fs.open(path, "rb") as f:
        return json.load(f)


def _tar_samples(fs, path: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _outputs(fs, out: str) -> dict:
    """Everything a user reads back from the bucket, as plain data."""
    manifest = _read_json(fs, f"{out}/manifest.json")
    tars = {}
    for s in manifest["shards"]:
        if s["format"] == "webdataset":
            tars.update(_tar_samples(fs, f"{out}/{s['path']}"))
    parquet = [pq.read_table(f"{out}/{s['path']}".removeprefix("s3://"), filesystem=fs)
               for s in manifest["shards"] if s["format"] == "parquet"]
    ledger = [pq.read_table(f"{out}/{p}".removeprefix("s3://"), filesystem=fs) for p in manifest["ledger"]]
    return {"manifest": manifest, "tars": tars, "parquet": parquet, "ledger": ledger}


@pytest.mark.slow  # two `curate run` processes, each starting its own Ray: ~25-35 s apiece on 2 busy cores
def test_s3_source_to_s3_output_then_resume(s3, tmp_path):
    """WebDataset tars in a bucket → rules + exact dedup → tars, Parquet, ledger, manifest in the bucket.

    Then shard 1 is lost (markers, outputs, stats; the manifest too) and the same command
    is run again: it redoes shard 1 alone and the final manifest is complete — which also
    checks that the driver sees ``_done`` markers its workers wrote after it listed the folder.
    """
    server, fs = s3
    out = f"s3://{BUCKET}/out"
    recipe = _recipe(tmp_path, out)
    curate_run(server, recipe)

    got = _outputs(fs, out)
    m = got["manifest"]
    assert m["complete"] and m["counts"]["input"] == N_TARS * PER_TAR
    kept = expected_kept()
    assert m["counts"]["kept"] == len(kept)
    assert sorted(got["tars"]) == kept
    for key, sample in got["tars"].items():
        t, i = int(key[1]), int(key.split("/s")[1])
        assert sample["jpg"] == _image(t, i) and sample["txt"].decode() == _caption(t, i)
        assert json.loads(sample["json"])["url"] == f"http://example.test/{t}/{i}.jpg"
    assert sorted(k for t in got["parquet"] for k in t["key"].to_pylist()) == kept
    ledger = {r["key"]: r for t in got["ledger"] for r in t.to_pylist()}
    assert len(ledger) == N_TARS * PER_TAR
    assert ledger["t1/s005"]["reason"] == "duplicate:exact_image" and ledger["t0/s003"]["reason"] == "caption_too_few_words"
    assert fs.exists(f"{BUCKET}/out/report.html") and not fs.exists(f"{BUCKET}/out/_work/p0/parts")

    # shard 1 lost after the others were committed: its markers and outputs are gone
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/out") if "/00001" not in p}
    for p in fs.find(f"{BUCKET}/out"):
        if p.rsplit("/", 1)[-1].startswith("00001") or p.endswith("manifest.json"):
            fs.rm(p)
    curate_run(server, recipe)
    again = _outputs(fs, out)
    assert again["tars"] == got["tars"]
    assert again["manifest"]["counts"] == m["counts"] and again["manifest"]["complete"]
    assert sorted(k for t in again["ledger"] for k in t["key"].to_pylist()) == sorted(ledger)
    untouched = [p for p in before if "/_done/" in p or "/webdataset/" in p or "/parquet/" in p]
    assert len(untouched) == 2 * 3  # shards 0 and 2: marker, tar, parquet
    assert all(fs.info(p)["ETag"] == before[p] for p in untouched)  # committed shards were not redone


class _Images(BaseHTTPRequestHandler):
    """GET /<i>.jpg → a distinct JPEG; anything else → 404 (a dead link)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        if not (name.endswith(".jpg") and name[:-4].isdigit()):
            self.send_error(404)
            return
        body = jpeg_bytes(size=(64, 48), color=(int(name[:-4]) * 20 % 256, 90, 30))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.mark.slow  # one `curate run` process with its own Ray: ~25-35 s on 2 busy cores
def test_url_list_in_s3_downloaded_from_loopback_into_s3(s3, tmp_path):
    """The img2dataset use: a Parquet URL list in the bucket, images from HTTP, shards back to the bucket."""
    server, fs = s3
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{http.server_address[1]}"
    n = 12
    urls = [f"{base}/{i}.jpg" if i % 6 else f"{base}/missing-{i}" for i in range(n)]
    with fs.open(f"{BUCKET}/urls/list.parquet", "wb") as f:
        pq.write_table(pa.table({"url": urls, "caption": [f"picture number {i}" for i in range(n)]}), f)
    out = f"s3://{BUCKET}/dl"
    recipe = write_recipe(tmp_path / "dl.yaml", {
        "source": {"path": f"s3://{BUCKET}/urls/list.parquet"},
        "stages": [{"use": "download", "allow_private_networks": True, "image_size": 32, "resize_mode": "center_crop",
                    "timeout": 5}],
        "write": {"output": out, "formats": ["webdataset"], "samples_per_shard": 5},
        "runtime": {"num_cpus": 2},
    })
    try:
        curate_run(server, recipe)
    finally:
        http.shutdown()
    got = _outputs(fs, out)
    assert got["manifest"]["complete"] and got["manifest"]["counts"] == {
        "input": n, "kept": n - 2, "dropped": {"download": {"http_404": 2}}}
    assert len(got["manifest"]["ledger"]) == 3  # 12 rows at 5 per shard
    assert sorted(got["tars"]) == sorted(f"{i // 5:05d}{i % 5:04d}" for i in range(n) if i % 6)
    from PIL import Image

    assert all(Image.open(io.BytesIO(s["jpg"])).size == (32, 32) for s in got["tars"].values())
    stats = _read_json(fs, f"{BUCKET}/dl/shard_stats/00000_stats.json")
    assert stats["count"] == 5 and stats["status_dict"]["http_404"] == 1
