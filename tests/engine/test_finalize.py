"""finalize_shard: a shard's outputs are in key order whatever order its part files arrived in."""

from __future__ import annotations

import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import rows
from curate.engine.finalize import finalize_shard
from curate.engine.layout import ShardMarker
from curate.sinks.base import SinkContext

#: Ten rows of one shard, cut into three work units' parts as the download actors write them.
KEYS = [f"00000{i:04d}" for i in range(10)]
UNITS = [KEYS[0:4], KEYS[4:7], KEYS[7:10]]
DROPPED = {"000000005"}


def write_part(path, keys: list[str]) -> str:
    status = ["dropped" if k in DROPPED else "kept" for k in keys]
    pq.write_table(pa.table({
        rows.KEY: keys, rows.URL: [f"http://x/{k}.jpg" for k in keys], rows.CAPTION: [f"caption {k}" for k in keys],
        rows.STATUS: status,
        rows.DROPPED_BY: ["download" if s == "dropped" else None for s in status],
        rows.REASON: ["http_404" if s == "dropped" else None for s in status],
        rows.IMAGE: [None if s == "dropped" else f"jpeg of {k}".encode() for k, s in zip(keys, status, strict=True)],
    }), path)
    return str(path)


def finalize(root, parts: list[str]) -> tuple[list[str], list[bytes], list[str]]:
    finalize_shard(marker=ShardMarker(shard=0, rows=len(KEYS), parts=parts), formats=["webdataset"],
                   ctx=SinkContext(root=str(root), samples_per_shard=len(KEYS)))
    with tarfile.open(root / "webdataset" / "00000.tar") as tar:
        members = tar.getmembers()
        images = [tar.extractfile(m).read() for m in members if m.name.endswith(".jpg")]
    ledger = pq.read_table(root / "ledger" / "00000.parquet")
    return [m.name for m in members], images, ledger[rows.KEY].to_pylist()


@pytest.mark.parametrize("arrival", [[0, 1, 2], [2, 0, 1], [1, 2, 0]], ids=["in order", "last first", "rotated"])
def test_outputs_are_in_key_order_whatever_order_the_parts_arrived_in(tmp_path, arrival):
    parts = [write_part(tmp_path / f"part-{u}.parquet", UNITS[u]) for u in arrival]
    names, images, ledger = finalize(tmp_path / "out", parts)
    kept = [k for k in KEYS if k not in DROPPED]
    assert names == [f"{k}.{ext}" for k in kept for ext in ("jpg", "txt", "json")]
    assert images == [f"jpeg of {k}".encode() for k in kept]
    assert ledger == KEYS


def test_rows_out_of_order_inside_a_part_are_sorted_too(tmp_path):
    """Parts whose key ranges overlap (not what the engine writes, but what finalize must survive)."""
    parts = [write_part(tmp_path / "a.parquet", KEYS[5:] + KEYS[:2]), write_part(tmp_path / "b.parquet", KEYS[2:5])]
    names, images, ledger = finalize(tmp_path / "out", parts)
    assert ledger == KEYS
    assert images == [f"jpeg of {k}".encode() for k in KEYS if k not in DROPPED]
    assert names[::3] == [f"{k}.jpg" for k in KEYS if k not in DROPPED]
