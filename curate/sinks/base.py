"""Sinks: per committed shard, the kept rows go to WebDataset/Parquet shards, every row to the ledger.

Each file is written under a temporary name and renamed into place, so a file
with a final name is always complete. The shard's ``_done`` marker is written
last: it is what resume trusts.
"""

from __future__ import annotations

import pyarrow as pa

from curate import rows
from curate.fsutil import atomic_open

NON_LEDGER = {rows.IMAGE}


def ledger_table(table: pa.Table) -> pa.Table:
    cols = [c for c in table.column_names
            if c not in NON_LEDGER and not rows.is_internal(c) and not rows.is_embedding(c)]
    return table.select(cols)


def kept_rows(table: pa.Table) -> pa.Table:
    """The kept rows, in the table's (key) order."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table[rows.STATUS], rows.KEPT))


__all__ = ["atomic_open", "kept_rows", "ledger_table"]
