"""Parquet shards (kept rows with image bytes) and the ledger (every row, no bytes)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from curate import rows
from curate.sinks.base import ShardRows, ShardWrite, Sink, atomic_open, ledger_table


def write_parquet_shard(kept: pa.Table, path: str) -> int:
    cols = [c for c in kept.column_names
            if c not in (rows.STATUS, rows.DROPPED_BY, rows.REASON) and not rows.is_internal(c)]
    with atomic_open(path) as f:
        # Image bytes are already compressed: large row groups, no extra compression on them.
        pq.write_table(kept.select(cols), f, row_group_size=1024, use_dictionary=False,
                       compression={c: ("none" if c == rows.IMAGE else "zstd") for c in cols})
    return kept.num_rows


def write_ledger(table: pa.Table, path: str) -> int:
    led = ledger_table(table)
    with atomic_open(path) as f:
        pq.write_table(led, f, compression="zstd")
    return led.num_rows


class ParquetSink(Sink):
    """``parquet/NNNNN.parquet``: the kept samples of a shard, image bytes included."""

    name = "parquet"

    def write(self, shard: ShardRows) -> ShardWrite:
        if not shard.kept.num_rows:
            return ShardWrite()
        rel = f"parquet/{shard.name}.parquet"
        n = write_parquet_shard(shard.kept, f"{self.ctx.root}/{rel}")
        return ShardWrite(outputs=[{"path": rel, "format": "parquet", "num_samples": n}])


class LedgerSink(Sink):
    """``ledger/NNNNN.parquet``: every row of a shard, kept or dropped, with its reason (no bytes)."""

    name = "ledger"

    def write(self, shard: ShardRows) -> ShardWrite:
        if not shard.table.num_rows:
            return ShardWrite(record={"ledger": None})
        rel = f"ledger/{shard.name}.parquet"
        write_ledger(shard.table, f"{self.ctx.root}/{rel}")
        return ShardWrite(record={"ledger": rel})
