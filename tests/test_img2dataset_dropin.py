"""``curate img2dataset``: img2dataset 1.47's flags, layout, metadata and stats, checked against img2dataset itself.

The comparison runs the same flags through img2dataset (in ``.bench-venv``, as the benchmark
harness installs it) and through ``curate img2dataset`` on one loopback list of generated
JPEGs, 404s and a non-image, and compares file names, tar members, JSON fields and values,
the metadata Parquet and the stats. Locally it is skipped (with the reason) only when that
virtual environment cannot be created; under ``CI=true`` it must run.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.errors import RecipeError
from curate.img2dataset import FLAGS, build, parse_flags
from curate.sinks.base import ShardRows, SinkContext
from curate.sinks.img2dataset import Img2datasetOutput, Img2datasetSink, i2d_key, resolve_folder

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a loopback web


def _jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    size = (40 + 7 * i, 30 + 5 * (i % 4))
    Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, 120)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _Web:
    """A threaded http.server on 127.0.0.1 serving a dict path → (status, content type, body)."""

    def __init__(self, routes: dict[str, tuple[int, str, bytes]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's API
                status, ctype, body = routes.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def web():
    routes = {f"/img/{i}.jpg": (200, "image/jpeg", _jpeg(i)) for i in range(11)}
    routes["/page.html"] = (200, "text/html", b"<html><body>not an image</body></html>")
    routes["/half.jpg"] = (200, "image/jpeg", _jpeg(3)[:200])
    w = _Web(routes)
    yield w
    w.close()


def _dead_url() -> str:
    """A port nobody listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/gone.jpg"


def _url_rows(web: _Web) -> list[dict]:
    urls = [f"{web.base}/img/{i}.jpg" for i in range(11)]
    urls.insert(3, f"{web.base}/missing-1.jpg")
    urls.insert(8, f"{web.base}/missing-2.jpg")
    urls.insert(10, f"{web.base}/page.html")
    return [{"url": u, "caption": f"caption {i}", "extra": f"x{i}", "ignored": i} for i, u in enumerate(urls)]


# ---------------------------------------------------------------- img2dataset in its own venv


def _img2dataset_exe() -> Path:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _harness.img2dataset import ensure_bench_venv

        return ensure_bench_venv()
    except Exception as e:  # noqa: BLE001 - no PyPI: say why, fail under CI
        if os.environ.get("CI", "").lower() in ("1", "true"):
            raise
        pytest.skip(f"img2dataset's venv (.bench-venv, benchmarks/_harness/img2dataset.py) cannot be created: {e}")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _run_img2dataset(args: list[str]) -> None:
    exe = _img2dataset_exe()
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _harness.procs import tool_env
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, env=tool_env(), timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _run_curate(args: list[str]) -> str:
    from curate.cli import app

    r = CliRunner().invoke(app, ["img2dataset", *args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


# ---------------------------------------------------------------- reading a layout


def _layout(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] != "_curate")


def _samples(root: Path, fmt: str) -> dict[str, dict[str, bytes]]:
    """key → {extension: bytes} of every stored sample."""
    out: dict[str, dict[str, bytes]] = {}
    if fmt == "webdataset":
        for tar in sorted(root.glob("*.tar")):
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    key, ext = m.name.rsplit(".", 1)
                    out.setdefault(key, {})[ext] = t.extractfile(m).read()
    elif fmt == "files":
        for p in sorted(root.glob("[0-9]*/*")):
            key, ext = p.name.rsplit(".", 1)
            out.setdefault(key, {})[ext] = p.read_bytes()
    return out


def _tar_members(root: Path) -> dict[str, list[str]]:
    return {p.name: [m.name for m in tarfile.open(p).getmembers()] for p in sorted(root.glob("*.tar"))}


def _meta(root: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(root.glob("*.parquet"))])


def _stats(root: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(root.glob("*_stats.json"))}


#: Values that legitimately differ: exception texts vs curate's reasons, EXIF (not read yet), timings.
DIFFERENT_VALUES = {"error_message", "exif"}


# ---------------------------------------------------------------- the comparison


@pytest.mark.parametrize("output_format", ["webdataset", "files", "parquet"])
def test_same_flags_same_output_as_img2dataset(tmp_path, web, ray_session, output_format):
    rows = _url_rows(web)
    src = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    flags = ["--url_list", str(src), "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
             "--save_additional_columns", '["extra"]', "--output_format", output_format,
             "--number_sample_per_shard", "5", "--image_size", "64", "--resize_mode", "border",
             "--processes_count", "1", "--thread_count", "4", "--timeout", "5", "--enable_wandb", "False"]
    theirs, ours = tmp_path / "img2dataset", tmp_path / "curate"
    _run_img2dataset([*flags, "--output_folder", str(theirs)])
    out = _run_curate([*flags, "--output_folder", str(ours), "--allow_private_networks"])
    assert "success: 0.786" in out and "count: 14" in out  # 11 of 14, img2dataset's summary line

    # The same files: NNNNN.tar / NNNNN/KEY.* / NNNNN.parquet, NNNNN.parquet, NNNNN_stats.json.
    assert _layout(ours) == _layout(theirs)
    assert "00000_stats.json" in _layout(ours) and (ours / "_curate" / "manifest.json").exists()
    if output_format == "webdataset":  # members in key order here, in completion order there
        assert {k: sorted(v) for k, v in _tar_members(ours).items()} == \
            {k: sorted(v) for k, v in _tar_members(theirs).items()}

    # The same metadata: columns in the same order, every row (failures too), the same keys and statuses.
    mine, ref = _meta(ours), _meta(theirs)
    assert mine.column_names == ref.column_names
    assert mine.num_rows == ref.num_rows == len(rows)
    by_key = {r["key"]: r for r in ref.to_pylist()}
    for r in mine.to_pylist():
        t = by_key[r["key"]]
        for name in mine.column_names:
            if name in DIFFERENT_VALUES:
                continue
            if name == output_format == "parquet" or name == "jpg":  # re-encoded by a different encoder
                assert (r[name] is None) == (t[name] is None), (r["key"], name)
                continue
            assert r[name] == t[name], (r["key"], name, r[name], t[name])
        assert (r["error_message"] is None) == (t["error_message"] is None)

    # The same samples: KEY.jpg, KEY.txt, KEY.json with the same fields and values.
    got, want = _samples(ours, output_format), _samples(theirs, output_format)
    assert sorted(got) == sorted(want)
    assert len(got) == (0 if output_format == "parquet" else 11)
    for key, members in got.items():
        assert sorted(members) == sorted(want[key]) == ["jpg", "json", "txt"]
        assert members["txt"] == want[key]["txt"]
        mj, tj = json.loads(members["json"]), json.loads(want[key]["json"])
        assert list(mj) == list(tj)  # img2dataset's field order
        assert {k: v for k, v in mj.items() if k not in DIFFERENT_VALUES} == \
            {k: v for k, v in tj.items() if k not in DIFFERENT_VALUES}

    # The same counts in the stats files, shard by shard.
    s_mine, s_ref = _stats(ours), _stats(theirs)
    assert sorted(s_mine) == sorted(s_ref)
    for name, s in s_mine.items():
        for field in ("count", "successes", "failed_to_download", "failed_to_resize"):
            assert s[field] == s_ref[name][field], (name, field)
        assert sum(s["status_dict"].values()) == s["count"]


def test_hostile_endpoints_every_row_counted(tmp_path, web, ray_session):
    """Dead link, 404, HTML, a truncated JPEG, an empty line: every input row is in the stats and metadata."""
    urls = [f"{web.base}/img/0.jpg", _dead_url(), f"{web.base}/nope.jpg", f"{web.base}/page.html",
            f"{web.base}/half.jpg", f"{web.base}/img/1.jpg", "not a url", "ftp://127.0.0.1/x.jpg"]
    src = tmp_path / "urls.csv.gz"
    with gzip.open(src, "wt") as f:
        f.write("link,text\n" + "".join(f"{u},cap {i}\n" for i, u in enumerate(urls)))
    out = tmp_path / "out"
    _run_curate(["--url_list", str(src), "--input_format", "csv.gz", "--url_col", "link", "--caption_col", "text",
                 "--output_format", "webdataset", "--number_sample_per_shard", "3", "--timeout", "3",
                 "--output_folder", str(out), "--allow_private_networks", "True", "--enable_wandb", "True"])
    stats = _stats(out)
    assert sorted(stats) == ["00000_stats.json", "00001_stats.json", "00002_stats.json"]
    assert sum(s["count"] for s in stats.values()) == len(urls)
    for s in stats.values():
        assert s["successes"] + s["failed_to_download"] + s["failed_to_resize"] == s["count"]
        assert sum(s["status_dict"].values()) == s["count"]
    assert sum(s["successes"] for s in stats.values()) == 2
    meta = _meta(out).to_pylist()
    assert [m["url"] for m in meta] == urls
    assert [m["status"] for m in meta] == ["success", "failed_to_download", "failed_to_download",
                                           "failed_to_resize", "failed_to_resize", "success",
                                           "failed_to_download", "failed_to_download"]
    assert [m["key"] for m in meta] == ["000000", "000001", "000002", "000010", "000011", "000012",
                                        "000020", "000021"]
    assert meta[1]["error_message"] == "connect_error" and meta[2]["error_message"] == "http_404"
    assert meta[3]["error_message"] == "not_an_image"
    assert sorted(_tar_members(out)) == ["00000.tar", "00001.tar", "00002.tar"]
    assert _tar_members(out)["00002.tar"] == []  # a shard without a success still has its (empty) tar
    recipe = (out / "_curate" / "img2dataset_recipe.yaml").read_text()
    assert "use: download" in recipe and "img2dataset" in recipe


def test_resume_and_overwrite(tmp_path, web, ray_session):
    src = tmp_path / "urls.txt"
    src.write_text("".join(f"{web.base}/img/{i}.jpg\n" for i in range(4)))
    out = tmp_path / "out"
    args = ["--url_list", str(src), "--output_folder", str(out), "--number_sample_per_shard", "2",
            "--allow_private_networks"]
    _run_curate(args)
    assert _layout(out) == ["00000.parquet", "00000/000000.jpg", "00000/000000.json", "00000/000001.jpg",
                            "00000/000001.json", "00000_stats.json", "00001.parquet", "00001/000010.jpg",
                            "00001/000010.json", "00001/000011.jpg", "00001/000011.json", "00001_stats.json"]
    meta = json.loads((out / "00000" / "000000.json").read_text())
    assert list(meta) == ["url", "key", "status", "error_message", "width", "height", "original_width",
                          "original_height", "exif", "sha256"]  # txt input: no caption, as img2dataset
    before = (out / "00001_stats.json").stat().st_mtime_ns
    _run_curate(args)  # incremental: everything is done, nothing is rewritten
    assert (out / "00001_stats.json").stat().st_mtime_ns == before
    (out / "stale.tar").write_bytes(b"")
    _run_curate([*args, "--incremental_mode", "overwrite"])
    assert not (out / "stale.tar").exists() and "00001_stats.json" in _layout(out)


# ---------------------------------------------------------------- flags, keys, the sink alone


def test_flags_are_img2dataset_147s_signature():
    """Names and defaults of img2dataset 1.47.0's download(), read from its source when it is installed."""
    venv_main = sorted((REPO / ".bench-venv").glob("lib/python*/site-packages/img2dataset/main.py"))
    if venv_main:
        import ast

        tree = ast.parse(venv_main[0].read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "download")
        names = [a.arg for a in fn.args.args]
        defaults = [None] * (len(names) - len(fn.args.defaults)) + [
            ast.literal_eval(d) if not isinstance(d, ast.Call) else float("inf") for d in fn.args.defaults]
        assert list(FLAGS) == names
        assert {n: f.default for n, f in FLAGS.items()} == dict(zip(names, defaults, strict=True))
    assert FLAGS["thread_count"].default == 256 and FLAGS["output_format"].default == "files"


def test_fire_style_parsing():
    f = parse_flags(["urls.txt", "--output-folder=out", "--resize_only_if_bigger", "--noextract_exif",
                     "--save_additional_columns", "[a,b]", "--disallowed_header_directives", "[]",
                     "--max_image_area", "inf", "--compute_hash", "None", "--skip_reencode", "False",
                     "--verify_hash", '["h","md5"]', "--timeout", "2.5", "--enable_wandb"])
    assert f == {"url_list": "urls.txt", "output_folder": "out", "resize_only_if_bigger": True,
                 "extract_exif": False, "save_additional_columns": ["a", "b"], "disallowed_header_directives": [],
                 "max_image_area": math.inf, "compute_hash": None, "skip_reencode": False,
                 "verify_hash": ["h", "md5"], "timeout": 2.5, "enable_wandb": True}
    assert parse_flags(["--save_additional_columns", "a,b"])["save_additional_columns"] == ["a", "b"]
    with pytest.raises(RecipeError, match="did you mean --url_list"):
        parse_flags(["--url_lst", "x"])
    with pytest.raises(RecipeError, match="--image_size"):
        parse_flags(["--image_size", "big"])


def test_flag_mapping_and_clear_errors(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"")
    (tmp_path / "c.csv").write_bytes(b"")
    recipe, run, notes = build(parse_flags([
        "--url_list", str(tmp_path), "--input_format", "parquet", "--caption_col", "text", "--processes_count", "3",
        "--thread_count", "64", "--output_folder", str(tmp_path / "o"), "--incremental_mode", "overwrite",
        "--distributor", "ray", "--ray_address", "ray://head:10001", "--wandb_project", "p"]))
    assert recipe["source"]["path"] == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert recipe["source"]["caption_col"] == "text" and recipe["source"]["columns"] == []
    assert recipe["stages"][0]["concurrency_per_worker"] == 64
    assert recipe["stages"][0]["max_image_area"] is None and recipe["stages"][0]["timeout"] == 10
    assert recipe["runtime"] == {"ray_address": "ray://head:10001", "num_cpus": None}
    assert recipe["write"]["output"] == f"{tmp_path / 'o'}/_curate"
    assert recipe["write"]["formats"] == ["img2dataset"] and recipe["write"]["samples_per_shard"] == 10000
    assert run == {"output_folder": str(tmp_path / "o"), "overwrite": True}
    assert len(notes) == 1 and "wandb" in notes[0]
    local, _, notes = build(parse_flags(["--url_list", "u.txt", "--processes_count", "3"]))
    assert local["runtime"]["num_cpus"] == 3 and not notes
    for argv, message in [
        (["--url_list", "u", "--output_format", "tfrecord"], "tfrecord.*writes files, webdataset, parquet"),
        (["--url_list", "u", "--output_format", "dummy"], "not written by curate"),
        (["--url_list", "u", "--input_format", "xlsx"], "--input_format"),
        (["--url_list", "u", "--save_additional_columns", "[status]"], "reserves"),
        (["--url_list", "u", "--verify_hash", "[h,md5]"], "must be the same"),
        (["--url_list", "u", "--incremental_mode", "extend"], "incremental_mode"),
        (["--url_list", "u", "--bbox_col", "box"], "not supported"),
        ([], "--url_list is required"),
    ]:
        with pytest.raises(RecipeError, match=message):
            build(parse_flags(argv))


def _compute_key(key, shard_id, oom_sample_per_shard, oom_shard_count):
    """img2dataset 1.47's downloader.compute_key, verbatim."""
    true_key = (10**oom_sample_per_shard) * shard_id + key
    key_format = oom_sample_per_shard + oom_shard_count
    return "{true_key:0{key_format}d}".format(key_format=key_format, true_key=true_key)


@pytest.mark.parametrize("per_shard", [1, 2, 5, 10, 11, 999, 1000, 10000, 12345])
def test_keys_follow_img2datasets_scheme(per_shard):
    for shard in (0, 3, 123):
        for index in {0, per_shard // 2, per_shard - 1}:
            assert i2d_key(index, shard, per_shard, 5) == _compute_key(
                index, shard, math.ceil(math.log10(per_shard)), 5)


def test_resolve_folder():
    assert resolve_folder("/data/out/_curate", "..") == "/data/out"
    assert resolve_folder("s3://bucket/out/_curate", "..") == "s3://bucket/out"
    assert resolve_folder("/data/out", None) == "/data/out"
    assert resolve_folder("/data/out", "/elsewhere/") == "/elsewhere"


def test_sink_alone_writes_failures_to_metadata_only(tmp_path):
    table = pa.table({
        "key": ["000000000", "000000001"], "url": ["http://a/0.jpg", "http://a/1.jpg"], "caption": ["c0", None],
        "status": ["kept", "dropped"], "dropped_by": [None, "download"], "reason": [None, "image_too_small"],
        "width": pa.array([8, None], pa.int32()), "height": pa.array([8, None], pa.int32()),
        "original_width": pa.array([16, 4], pa.int32()), "original_height": pa.array([16, 4], pa.int32()),
        "original_md5": ["abc", "def"],
    })
    kept = table.slice(0, 1).append_column("image", pa.array([b"JPEG"], pa.binary()))
    opts = Img2datasetOutput(output_format="parquet", compute_hash="md5", extract_exif=False)
    sink = Img2datasetSink(SinkContext(root=str(tmp_path), samples_per_shard=10000, img2dataset=opts.model_dump()))
    wrote = sink.write(ShardRows(shard=7, table=table, kept=kept, dropped={"download": {"image_too_small": 1}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00007.parquet", "00007_stats.json"]
    assert wrote.record["img2dataset"]["successes"] == 1 and not wrote.outputs
    got = pq.read_table(tmp_path / "00007.parquet").to_pylist()
    assert got == [
        {"caption": "c0", "url": "http://a/0.jpg", "key": "000070000", "status": "success", "error_message": None,
         "width": 8, "height": 8, "original_width": 16, "original_height": 16, "md5": "abc", "jpg": b"JPEG"},
        {"caption": None, "url": "http://a/1.jpg", "key": "000070001", "status": "failed_to_resize",
         "error_message": "image_too_small", "width": None, "height": None, "original_width": None,
         "original_height": None, "md5": None, "jpg": None}]
    stats = json.loads((tmp_path / "00007_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_resize"]) == (2, 1, 1)
    assert stats["status_dict"] == {"success": 1, "image_too_small": 1}
