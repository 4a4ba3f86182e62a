"""A phase's rows on their way in and out: shard reads, decision joins, part files.

In: the first phase reads input shards from the source; a later phase reads the
part files the previous phase committed and joins the decisions of the global
stages between them. Every batch carries its shard id (``_shard``); the last batch
of a shard carries the shard's row count (``_shard_rows``), so the driver knows
when a shard's rows are all back. Out: whatever rows reach the end of the phase
are stored as *part* files (Parquet), one per shard and batch, and reported to the
driver as a small :data:`PART_REPORT` table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import rows
from curate.engine.layout import writing
from curate.engine.samples import (
    read_global_picks,
    samples_dir,
    split_samples,
    thumbnail_wanted,
    write_table,
)
from curate.errors import CurateError, SourceError
from curate.fsutil import write_json
from curate.sources.base import Source

log = logging.getLogger(__name__)

#: Part files read at once. A shard has a part per block, or per batch where the last stage writes
#: its own parts (download: about 20 for 10,000 rows); on object storage each read is a round trip
#: or three, so they overlap.
PART_READ_THREADS = 16

#: What a part writer reports per part: the driver commits a shard once ``rows`` add up to ``total``.
PART_REPORT = pa.schema([("shard", pa.int64()), ("rows", pa.int64()), ("kept", pa.int64()),
                         ("total", pa.int64()), ("path", pa.string()), ("seconds", pa.string()),
                         ("first_at", pa.float64())])


# ------------------------------------------------------------------ in


def read_shards(items: pa.Table, *, source: Source | None, decisions_dir: str | None,
                global_names: list[str], batch_rows: int, errors_dir: str | None = None,
                on_source_error: str = "continue", thumbnails: bool = False) -> Iterator[pa.Table]:
    """Yield the rows of each work unit in ``items``; a whole shard's last batch carries its row count.

    A unit of a shard (``unit`` in its spec) carries no count: the driver knows the shard's size.
    A source shard that fails mid-read (truncated tar, corrupt Parquet) never gets that last
    batch, so it is never committed: its error is recorded under ``errors_dir`` for the driver,
    and the task goes on with its next shard — or, with ``on_source_error: fail``, raises.
    With ``thumbnails``, the rows the global stages sampled get their thumbnails before their
    decisions drop them (:mod:`curate.engine.samples`).
    """
    for spec_json in items["spec"].to_pylist():
        spec = json.loads(spec_json)
        shard = spec["shard"]
        if spec["kind"] == "parts":
            it = read_parts(spec["parts"], batch_rows)
            if global_names:
                it = join_decisions(it, shard, decisions_dir, global_names, thumbnails)
        else:
            assert source is not None
            it = source.read_shard(spec, batch_rows)
        total = 0
        prev: pa.Table | None = None
        try:
            for batch in it:
                if batch.num_rows == 0:
                    continue
                total += batch.num_rows
                if prev is not None:
                    yield tag(prev, shard, None)
                prev = batch
        except Exception as e:
            if spec["kind"] == "parts" or errors_dir is None:
                raise  # our own work files: a bug or lost storage, not bad input
            err = record_source_error(spec, e, total, errors_dir)
            if on_source_error == "fail":
                raise err from e
            continue
        if prev is not None:
            yield tag(prev, shard, None if "unit" in spec else total)


def record_source_error(spec: dict[str, Any], e: Exception, rows_read: int, errors_dir: str) -> SourceError:
    """Write why an input shard could not be read where the driver finds it; return the error."""
    where = str(spec.get("path") or spec.get("paths") or f"shard {spec['shard']}")
    detail = str(e) if isinstance(e, CurateError) else f"{type(e).__name__}: {e}"
    message = (f"input shard {spec['shard']}: {detail}" if detail.startswith(where)
               else f"{where}: cannot read input shard {spec['shard']}: {detail}")
    log.error("%s; the %d rows read before the error are not committed", message, rows_read)
    path = f"{errors_dir}/{spec['shard']:05d}.json"
    with writing(path):
        write_json(path, {"shard": spec["shard"], "path": where, "error": message, "rows_read": rows_read})
    return SourceError(message)


def tag(t: pa.Table, shard: int, total: int | None) -> pa.Table:
    """Mark a batch with its shard (and, on a shard's last batch, the shard's row count)."""
    t = rows.with_column(t, rows.SHARD, pa.array([shard] * t.num_rows, pa.int64()))
    return rows.with_column(t, rows.SHARD_ROWS, pa.array([total] * t.num_rows, pa.int64()))


def read_parts(paths: list[str], batch_rows: int) -> Iterator[pa.Table]:
    """Stream a committed shard's part files in batches."""
    for path in paths:
        with fsspec.open(path, "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                t = pa.Table.from_batches([b])
                yield t.drop([c for c in t.column_names if c in (rows.SHARD, rows.SHARD_ROWS)])


def join_decisions(it: Iterator[pa.Table], shard: int, decisions_dir: str | None,
                   global_names: list[str], thumbnails: bool = False) -> Iterator[pa.Table]:
    """Apply the global stages' decisions for this shard to each batch, in stage order."""
    wanted = read_global_picks(decisions_dir, shard) if thumbnails and decisions_dir else {}
    decided = []
    for name in global_names:
        with fsspec.open(f"{decisions_dir}/{name}.parquet", "rb") as f:
            d = pq.read_table(f, filters=[(rows.SHARD, "=", shard)])
        decided.append((name, d.drop([rows.SHARD])))
    for batch in it:
        if thumbnails:
            batch = thumbnail_wanted(batch, wanted)
        for name, d in decided:
            batch = apply_decisions(batch, d, name)
        yield batch


def apply_decisions(batch: pa.Table, decisions: pa.Table, stage: str) -> pa.Table:
    """Join a global stage's decisions (key, reason, extras) onto a batch and mark drops."""
    if decisions.num_rows == 0:
        extras = [c for c in decisions.column_names if c not in (rows.KEY, rows.REASON)]
        for c in extras:
            if c not in batch.column_names:
                batch = batch.append_column(c, pa.nulls(batch.num_rows, decisions.schema.field(c).type))
        return batch
    pos = pc.index_in(batch[rows.KEY].cast(pa.string()),
                      value_set=decisions[rows.KEY].combine_chunks().cast(pa.string()))
    for c in decisions.column_names:
        if c in (rows.KEY, rows.REASON):
            continue
        values = decisions[c].take(pos)
        if c in batch.column_names:  # an earlier global stage's value (e.g. its duplicate_of) stays
            values = pc.coalesce(values, batch[c].cast(values.type))
        batch = rows.with_column(batch, c, values)
    return rows.mark_dropped(batch, decisions[rows.REASON].take(pos), stage)


# ------------------------------------------------------------------ out


def write_parts(batch: pa.Table, *, parts_dir: str) -> pa.Table:
    """Store the batch as one part file per shard; report what was stored (:data:`PART_REPORT`)."""
    out: dict[str, list] = {name: [] for name in PART_REPORT.names}
    if batch.num_rows == 0:
        return PART_REPORT.empty_table()
    fs, root = fsspec.core.url_to_fs(parts_dir)
    fs.makedirs(root, exist_ok=True)
    shards = batch[rows.SHARD]
    for shard in pc.unique(shards).to_pylist():
        t = batch.filter(pc.equal(shards, shard))
        totals = [x for x in pc.unique(t[rows.SHARD_ROWS]).to_pylist() if x is not None]
        seconds = {c[3:]: pc.sum(t[c]).as_py() or 0.0 for c in t.column_names if c.startswith("_t_")}
        first_at = pc.min(t[rows.FIRST_AT]).as_py() if rows.FIRST_AT in t.column_names else None
        t = t.drop([c for c in t.column_names if c.startswith("_t_") or c in (rows.SHARD_ROWS, rows.FIRST_AT)])
        t, samples = split_samples(t)
        name = f"{shard:05d}-{uuid.uuid4().hex[:12]}.parquet"
        if samples is not None:  # before the part: a reported part never lacks its samples
            with writing(f"{samples_dir(parts_dir)}/{name}"):
                write_table(f"{samples_dir(parts_dir)}/{name}", samples)
        try:
            with writing(f"{parts_dir}/{name}"), fs.open(f"{root}/{name}", "wb") as f:
                pq.write_table(t, f, compression="none")  # temporary, mostly JPEG bytes: zstd only burns CPU
        except BaseException:
            with contextlib.suppress(Exception):  # never listed in a marker, but it holds space
                fs.rm(f"{root}/{name}")
            raise
        out["shard"].append(shard)
        out["rows"].append(t.num_rows)
        out["kept"].append(pc.sum(pc.equal(t[rows.STATUS], rows.KEPT).cast(pa.int64())).as_py() or 0
                           if rows.STATUS in t.column_names else t.num_rows)
        out["total"].append(totals[0] if totals else None)
        out["path"].append(with_protocol(parts_dir, f"{root}/{name}"))
        out["seconds"].append(json.dumps(seconds))
        out["first_at"].append(first_at)
    return pa.table(out, schema=PART_REPORT)


def with_protocol(like: str, path: str) -> str:
    """``path`` with ``like``'s URL scheme (fsspec strips it: s3://b/k -> b/k)."""
    if "://" in like and "://" not in path:
        return like.split("://", 1)[0] + "://" + path
    return path


def read_part_files(paths: list[str], wanted: set[str] | None = None,
                    each: Callable[[pa.Table], Any] | None = None) -> list[Any]:
    """Read part files (all columns, or those in ``wanted``), several at once; in order.

    ``each``, when given, is applied to each table in the thread that read it, and its results are
    returned instead: a caller that keeps a part's few rows or columns never holds every whole part.
    """

    def one(path: str) -> Any:
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = None if wanted is None else [c for c in pf.schema_arrow.names if c in wanted]
            table = pf.read(columns=cols)
        return table if each is None else each(table)

    if len(paths) <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(min(PART_READ_THREADS, len(paths)), thread_name_prefix="curate-parts") as pool:
        return list(pool.map(one, paths))
