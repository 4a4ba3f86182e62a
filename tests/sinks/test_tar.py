"""curate's TarWriter writes the archive tarfile writes, and webdataset reads it back."""

from __future__ import annotations

import io
import random
import tarfile

import pyarrow as pa
import pytest
import webdataset as wds

from curate import rows
from curate.sinks.tar import TarWriter
from curate.sinks.webdataset import write_webdataset


def _tarfile_bytes(members: list[tuple[str, bytes]], mtime: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o444
            info.uname = info.gname = "curate"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _writer_bytes(members: list[tuple[str, bytes]], mtime: int) -> bytes:
    buf = io.BytesIO()
    with TarWriter(buf, mtime=mtime) as tar:
        for name, data in members:
            tar.add(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("mtime", [0, 1_764_000_000, 8**11 - 1])
def test_same_bytes_as_tarfile(mtime):
    rnd = random.Random(7)
    members = [(f"{i:09d}.{ext}", rnd.randbytes(rnd.choice([0, 1, 511, 512, 513, 30_000])))
               for i in range(40) for ext in ("jpg", "txt", "json")]
    members += [
        ("clé-unicode.txt", b"non-ASCII name: a PAX header"),  # not ustar-safe
        ("a" * 100, b"exactly 100 bytes of name"),
        ("b" * 101 + ".json", b"{}"),  # too long for ustar's name field
        ("dir/" + "c" * 150 + ".jpg", b"\xff\xd8"),
    ]
    assert _writer_bytes(members, mtime) == _tarfile_bytes(members, mtime)


def test_empty_archive_is_what_tarfile_writes():
    assert _writer_bytes([], 5) == _tarfile_bytes([], 5)


def test_a_failed_write_does_not_end_the_archive():
    buf = io.BytesIO()
    with pytest.raises(RuntimeError), TarWriter(buf, mtime=0) as tar:
        tar.add("x.txt", b"x")
        raise RuntimeError("disk full")
    assert len(buf.getvalue()) == 1024  # one header and one data block, no end-of-archive blocks


def test_webdataset_reads_a_shard(tmp_path):
    keys = ["000000000", "000000001", "000000002"]
    table = pa.table({
        rows.KEY: keys,
        rows.URL: [f"http://x/{k}.jpg" for k in keys],
        rows.CAPTION: ["a red cube", "ünïcode caption", None],
        rows.IMAGE: [b"\xff\xd8jpeg-" + k.encode() for k in keys],
        rows.IMAGE_FORMAT: ["jpg", "png", None],
        "width": pa.array([256, 128, 64], pa.int32()),
    })
    path = tmp_path / "00000.tar"
    assert write_webdataset(table, str(path)) == 3
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys
    assert samples[0]["jpg"] == b"\xff\xd8jpeg-000000000"
    assert samples[1]["png"] == b"\xff\xd8jpeg-000000001"
    assert samples[2]["jpg"] == b"\xff\xd8jpeg-000000002"  # no format: jpg, as img2dataset names it
    assert [s["txt"].decode() for s in samples] == ["a red cube", "ünïcode caption", ""]
    assert b'"width": 128' in samples[1]["json"]
    with tarfile.open(path) as tar:  # every member read-only, owned by curate, whole-second time
        for m in tar.getmembers():
            assert (m.mode, m.uname, m.gname, m.isreg()) == (0o444, "curate", "curate", True)
            assert m.pax_headers == {}
