"""Which sinks a run writes: the formats of ``write.formats``, then the ledger and the shard stats.

The ledger and img2dataset's shard stats are always written: the ledger is how every
input row is accounted for, and the stats are what img2dataset's users read.
"""

from __future__ import annotations

from curate.errors import RecipeError
from curate.sinks.base import Sink, SinkContext
from curate.sinks.img2dataset import Img2datasetSink
from curate.sinks.packed import PackedSink
from curate.sinks.parquet import LedgerSink, ParquetSink
from curate.sinks.shard_stats import ShardStatsSink
from curate.sinks.webdataset import WebDatasetSink

FORMATS: dict[str, type[Sink]] = {"webdataset": WebDatasetSink, "parquet": ParquetSink, "packed": PackedSink,
                                  "img2dataset": Img2datasetSink}
ALWAYS: tuple[type[Sink], ...] = (LedgerSink, ShardStatsSink)


def make_sinks(formats: list[str], ctx: SinkContext) -> list[Sink]:
    """The sinks for ``write.formats`` (in that order), then the ledger and the shard stats."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise RecipeError(f"unknown output format(s) {unknown}; known: {', '.join(FORMATS)}", key="write.formats")
    return [FORMATS[f](ctx) for f in formats] + [cls(ctx) for cls in ALWAYS]
