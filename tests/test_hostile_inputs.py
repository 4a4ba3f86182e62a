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
import pytest

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
    RSS stays far below the member's size (and below what reading even 1 GiB would take)."""
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
    assert res["peak"] < 400 * 1024**2, f"peak RSS {res['peak'] / 2**20:.0f} MiB: the member was read"
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
