"""The row contract: one Arrow row per sample, from source to ledger.

Every sample keeps its row through the whole pipeline. A stage never deletes a
row; it marks it dropped (``status``, ``dropped_by``, ``reason``) and the image
bytes are released. Columns that start with ``_`` are internal bookkeeping of the
runner and never reach the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

KEY = "key"
URL = "url"
CAPTION = "caption"
STATUS = "status"
DROPPED_BY = "dropped_by"
REASON = "reason"
IMAGE = "image"
IMAGE_FORMAT = "image_format"
SHA256 = "sha256"

KEPT = "kept"
DROPPED = "dropped"

SHARD = "_shard"  # input shard id (int64)
SHARD_ROWS = "_shard_rows"  # set on the last batch of a shard: the shard's row count
FIRST_AT = "_first_at"  # epoch seconds a batch's first row was ready (download): the run's time to first row

#: Columns the pipeline owns; a source column with one of these names is renamed ``source_<name>``.
RESERVED = frozenset({KEY, URL, CAPTION, STATUS, DROPPED_BY, REASON, IMAGE, IMAGE_FORMAT, SHA256})

BASE_FIELDS = [
    pa.field(KEY, pa.string()),
    pa.field(URL, pa.string()),
    pa.field(CAPTION, pa.string()),
    pa.field(STATUS, pa.string()),
    pa.field(DROPPED_BY, pa.string()),
    pa.field(REASON, pa.string()),
]


EMBEDDING_SUFFIX = "_emb"  # vector columns: kept in Parquet shards and work files, not in ledger or JSON


def is_embedding(column: str) -> bool:
    return column.endswith(EMBEDDING_SUFFIX)


_UNSAFE_KEY = __import__("re").compile(r"[./\\\s]")


def safe_key(key: str) -> str:
    """A key usable as a WebDataset member stem: no dots (they start the extension), no path parts."""
    return _UNSAFE_KEY.sub("_", key)


def timing_column(stage_name: str) -> str:
    return f"_t_{stage_name}"


def is_internal(column: str) -> bool:
    return column.startswith("_")


def live_mask(table: pa.Table) -> pa.ChunkedArray:
    return pc.equal(table[STATUS], KEPT)


def with_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Set or replace a column."""
    idx = table.schema.get_field_index(name)
    if idx >= 0:
        return table.set_column(idx, name, values)
    return table.append_column(name, values)


def mark_dropped(table: pa.Table, reasons: Sequence[str | None] | pa.Array | pa.ChunkedArray,
                 stage_name: str) -> pa.Table:
    """Mark rows whose reason is not None as dropped by ``stage_name``; drop their image bytes.

    Rows already dropped keep their first reason: the ledger says who dropped a
    sample first, which is the stage that decided its fate. Vectorised (Arrow
    kernels): the global phase calls this on every row of the run.
    """
    if len(reasons) != table.num_rows:
        raise ValueError(f"{stage_name}: {len(reasons)} reasons for {table.num_rows} rows")
    r = reasons if isinstance(reasons, (pa.Array, pa.ChunkedArray)) else pa.array(list(reasons), pa.string())
    r = r.cast(pa.string())
    if r.null_count == len(r):
        return table
    newly = pc.and_(pc.is_valid(r), pc.equal(table[STATUS], KEPT))
    newly = pc.fill_null(newly, False)
    table = with_column(table, STATUS, pc.if_else(newly, pa.scalar(DROPPED), table[STATUS].cast(pa.string())))
    table = with_column(table, DROPPED_BY, pc.if_else(newly, pa.scalar(stage_name),
                                                      table[DROPPED_BY].cast(pa.string())))
    table = with_column(table, REASON, pc.if_else(newly, r, table[REASON].cast(pa.string())))
    if IMAGE in table.column_names:
        table = with_column(table, IMAGE, pc.if_else(newly, pa.nulls(table.num_rows, pa.binary()),
                                                     table[IMAGE].cast(pa.binary())))
    return table


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    """Concatenate batches whose column sets or null-typed columns differ."""
    tables = [t for t in tables if t is not None]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")
