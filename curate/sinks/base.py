"""Sinks: per committed shard, the kept rows go to WebDataset/Parquet shards, every row to the ledger.

Each file is written under a temporary name and renamed into place, so a file
with a final name is always complete. The shard's ``_done`` marker is written
last: it is what resume trusts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import IO

import fsspec
import pyarrow as pa

from curate import rows

NON_LEDGER = {rows.IMAGE}


def ledger_table(table: pa.Table) -> pa.Table:
    cols = [c for c in table.column_names
            if c not in NON_LEDGER and not rows.is_internal(c) and not rows.is_embedding(c)]
    return table.select(cols)


def kept_rows(table: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    kept = table.filter(pc.equal(table[rows.STATUS], rows.KEPT))
    return kept.take(pc.sort_indices(kept[rows.KEY]))


@contextlib.contextmanager
def atomic_open(path: str) -> Iterator[IO[bytes]]:
    """Write to ``path.tmp`` and rename on success; remove the temp file on failure."""
    fs, p = fsspec.core.url_to_fs(path)
    tmp = p + ".tmp"
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise

