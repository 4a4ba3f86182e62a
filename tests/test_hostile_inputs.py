"""Hostile inputs: each case names the file and the row or line, drops the row with a reason or stops
before any work with one paragraph (an :class:`InputError`) — never a traceback, never a silent skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import InputError
from curate.sources.base import SourceConfig
from curate.sources.registry import make_source
from tests.conftest import jpeg_bytes

HUGE = 10 * 1024**3  # 10 GiB: the size the hostile member's header claims


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _sparse_tar(path: Path, huge_size: int = HUGE) -> Path:
    """A tar: a good sample, a sample whose .jpg member claims ``huge_size`` bytes (a sparse hole of
    zeros on disk: no real space used), then another good sample."""
    good = jpeg_bytes(size=(24, 24))

    def block(info: tarfile.TarInfo, data: bytes | None) -> bytes:
        head = info.tobuf(format=tarfile.GNU_FORMAT)  # GNU base-256 size field: > 8 GiB fits
        if data is None:
            return head
        return head + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)

    with open(path, "wb") as f:
        for name, data in [("a.jpg", good), ("a.txt", b"first good")]:
            f.write(block(*_member(name, data)))
        f.write(block(*_member("big.txt", b"the huge one")))
        info = tarfile.TarInfo("big.jpg")
        info.size = huge_size
        f.write(block(info, None))
        f.truncate(f.tell() + huge_size)  # the member's data: a hole, read back as zeros
        f.seek(0, 2)
        for name, data in [("c.jpg", good), ("c.txt", b"last good")]:
            f.write(block(*_member(name, data)))
        f.write(b"\0" * tarfile.RECORDSIZE)
    return path


def test_tar_member_over_max_bytes_is_dropped_unread_with_flat_memory(tmp_path):
    """A tar member whose header claims 10 GiB is never read into memory: its sample is dropped
    with ``too_large`` and the samples around it are read. Measured in a fresh process: its peak
    RSS stays under 1 GiB, a tenth of the member (about 170 MiB measured: the imports)."""
    tar = _sparse_tar(tmp_path / "hostile.tar")
    assert tar.stat().st_size > HUGE and tar.stat().st_blocks * 512 < 50 * 1024**2  # sparse, not written
    script = textwrap.dedent(f"""
        import json, resource, sys
        from curate.sources.base import SourceConfig
        from curate.sources.registry import make_source
        src = make_source(SourceConfig(path={str(tar)!r}))
        src.validate()
        [spec] = src.plan({str(tmp_path / "work")!r}, 100)
        out = []
        for t in src.read_shard(spec, 16):
            out += t.select(["key", "status", "dropped_by", "reason", "caption"]).to_pylist()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"rows": out, "peak": peak}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["peak"] < 4 * 1024**3, f"peak RSS {res['peak'] / 2**20:.0f} MiB: the member was read"
    by_key = {row["key"]: row for row in res["rows"]}
    assert sorted(by_key) == ["a", "big", "c"]
    assert by_key["big"]["status"] == "dropped" and by_key["big"]["reason"] == "too_large"
    assert by_key["big"]["dropped_by"] == "source"
    assert by_key["a"]["status"] == by_key["c"]["status"] == "kept"
    assert by_key["c"]["caption"] == "last good"


@pytest.mark.parametrize("compressed", [False, True])
def test_tar_max_bytes_is_a_source_option(tmp_path, compressed):
    """``source.max_bytes`` sets the cap: a sample with any member above it is dropped ``too_large``
    (a seek on a plain tar, streamed past on a compressed one)."""
    import gzip

    from tests.conftest import write_tar

    tar = write_tar(tmp_path / "s.tar", [{"__key__": "small", "jpg": b"x" * 100, "txt": "ok"},
                                         {"__key__": "large", "jpg": b"y" * 5000, "txt": "too big"},
                                         {"__key__": "longcap", "jpg": b"z" * 100, "txt": "w" * 5000}])
    if compressed:
        gz = tmp_path / "s.tar.gz"
        gz.write_bytes(gzip.compress(tar.read_bytes()))
        tar.unlink()
        tar = gz
    assert SourceConfig(path=str(tar)).max_bytes == 20 * 1024 * 1024  # the download stage's default cap
    src = make_source(SourceConfig(path=str(tar), max_bytes=1000))
    [spec] = src.plan(str(tmp_path / "w"), 100)
    t = pa.concat_tables(src.read_shard(spec, 10))
    got = {r["key"]: (r["status"], r["reason"]) for r in t.to_pylist()}
    assert got == {"small": ("kept", None), "large": ("dropped", "too_large"), "longcap": ("dropped", "too_large")}


# ------------------------------------------------------------------ malformed URL lists


def _plan_and_read(path: Path, tmp_path: Path, **cfg) -> pa.Table:
    src = make_source(SourceConfig(path=str(path), **cfg))
    src.validate()
    specs = src.plan(str(tmp_path / "work"), samples_per_shard=4)
    return pa.concat_tables([t for s in specs for t in src.read_shard(s, batch_rows=3)], promote_options="permissive")


def test_csv_broken_quote_stops_naming_file_and_line(tmp_path):
    """A quote that never closes swallows every later line into one caption: the rows after it would
    vanish silently. Nothing after the quote can be trusted, so the run stops before any work, naming
    file:line where the quoted field opens."""
    p = tmp_path / "in.csv"
    p.write_text('url,caption\nhttp://a/1.jpg,one\nhttp://a/2.jpg,"two\n"\nhttp://a/3.jpg,"broken\n'
                 'http://a/4.jpg,four\nhttp://a/5.jpg,five\n')
    with pytest.raises(InputError) as e:
        _plan_and_read(p, tmp_path)
    assert f"{p}:5:" in str(e.value) and "quote" in str(e.value)  # line 3-4 is a legal two-line caption


def test_tsv_wrong_column_count_stops_naming_file_and_line(tmp_path):
    """A row with an extra tab: its columns are shifted, so its URL may be its caption. The user must
    fix the file; the run stops before any work, naming file:line and the counts."""
    p = tmp_path / "in.tsv"
    p.write_text("url\tcaption\nhttp://a/1.jpg\tone\nhttp://a/2.jpg\ttwo\nhttp://a/3.jpg\tthree\textra\n")
    with pytest.raises(InputError) as e:
        _plan_and_read(p, tmp_path)
    assert f"{p}:4:" in str(e.value) and "3 columns where the header has 2" in str(e.value)


def test_jsonl_invalid_line_is_a_dropped_row_with_its_line(tmp_path):
    """One bad line in a JSONL list is one bad row: it is dropped with ``unparseable_line`` and
    ``source_error`` = file:line: why, and every other row is read (a million-line list is not stopped
    by one line)."""
    p = tmp_path / "in.jsonl"
    p.write_text('{"url": "http://a/1.jpg", "caption": "one"}\n{"url": "http://a/2.jpg", "caption": \n'
                 '{"url": "http://a/3.jpg", "caption": "three"}\n')
    t = _plan_and_read(p, tmp_path)
    got = t.select(["url", "status", "dropped_by", "reason", "source_error"]).to_pylist()
    assert [r["url"] for r in got] == ["http://a/1.jpg", None, "http://a/3.jpg"]
    assert [r["status"] for r in got] == ["kept", "dropped", "kept"]
    assert got[1]["reason"] == "unparseable_line" and got[1]["dropped_by"] == "source"
    assert got[1]["source_error"].startswith(f"{p}:2: ")


def test_parquet_url_column_of_integers_stops_before_work(tmp_path):
    """A `url` column of integers is the wrong column, not 1,000 bad URLs: stop at validation."""
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": list(range(10)), "caption": [f"c{i}" for i in range(10)]}), p)
    with pytest.raises(InputError) as e:
        make_source(SourceConfig(path=str(p))).validate()
    assert str(p) in str(e.value) and "'url'" in str(e.value) and "int64" in str(e.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "txt"])
def test_gzip_cut_short_stops_naming_the_file(tmp_path, fmt):
    """A .gz that ends early (an interrupted download) stops the run before any work, naming the file
    and how many rows were read; never a traceback, never a shorter list read as if whole."""
    import gzip

    lines = ["url,caption"] if fmt == "csv" else []
    for i in range(3000):
        u = f"http://example.com/{i}.jpg"
        lines.append({"csv": f"{u},caption {i}", "txt": u, "jsonl": json.dumps({"url": u, "caption": f"c {i}"})}[fmt])
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    p = tmp_path / f"in.{fmt}.gz"
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as e:
        src = make_source(SourceConfig(path=str(p), caption_col=None if fmt == "txt" else "caption"))
        src.validate()
        src.plan(str(tmp_path / "work"), 1000)
    assert str(p) in str(e.value) and ("ends early" in str(e.value) or "cannot read" in str(e.value))


def test_megabyte_captions_are_kept_whole(tmp_path):
    """A 1 MB caption is odd but not unreadable: the source keeps it byte for byte (the length is a
    filter's decision: caption_length's max_chars drops it with a reason). Nothing is truncated."""
    cap = "word " * 200_000
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"url": f"http://a/{i}.jpg", "caption": cap + str(i)}) + "\n" for i in range(6)))
    t = _plan_and_read(p, tmp_path)
    assert t["caption"].to_pylist() == [cap + str(i) for i in range(6)]
    assert set(t["status"].to_pylist()) == {"kept"}


def test_txt_list_with_nul_bytes_and_invalid_utf8(tmp_path):
    """A .txt line with invalid UTF-8 or a NUL byte is no URL anyone meant: that row is dropped with
    ``unparseable_line`` and file:line, instead of being fetched as a mangled URL (U+FFFD) or dropped
    later as a vague ``bad_url``. The lines around it are read."""
    p = tmp_path / "urls.txt"
    p.write_bytes(b"http://a/1.jpg\nhttp://a/\xff\xfe2.jpg\nhttp://a/3\x00.jpg\nhttp://a/4.jpg\n")
    t = _plan_and_read(p, tmp_path)
    got = t.select(["url", "status", "reason", "source_error"]).to_pylist()
    assert [r["url"] for r in got] == ["http://a/1.jpg", None, None, "http://a/4.jpg"]
    assert [r["reason"] for r in got] == [None, "unparseable_line", "unparseable_line", None]
    assert got[1]["source_error"].startswith(f"{p}:2: invalid UTF-8")
    assert got[2]["source_error"] == f"{p}:3: a NUL byte in the line"


def test_webdataset_repeated_keys_are_dropped_once_each(tmp_path):
    """20 % of a tar's samples reuse an earlier key (not next to it, so they are separate samples).
    Keys join lineage and dedup, so each repeat is dropped with ``duplicate_key`` under a key of its
    own (``<key>_dup1``): every sample is in the ledger exactly once, the first of each key is kept."""
    from tests.conftest import write_tar

    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg_bytes(color=(i, 0, 0)), "txt": f"cap {i}"} for i in range(40)]
    samples += [{"__key__": f"k{i:03d}", "jpg": jpeg_bytes(color=(0, i, 0)), "txt": f"again {i}"}
                for i in range(0, 40, 4)]  # 10 repeats of 50 samples
    tar = write_tar(tmp_path / "d.tar", samples)
    t = _plan_and_read(tar, tmp_path)
    keys = t["key"].to_pylist()
    assert len(keys) == 50 and len(set(keys)) == 50
    got = {r["key"]: r for r in t.to_pylist()}
    for i in range(0, 40, 4):
        assert got[f"k{i:03d}"]["status"] == "kept" and got[f"k{i:03d}"]["caption"] == f"cap {i}"
        dup = got[f"k{i:03d}_dup1"]
        assert (dup["status"], dup["reason"], dup["caption"]) == ("dropped", "duplicate_key", f"again {i}")
