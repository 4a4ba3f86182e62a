"""The sink contract: what a finalized shard's rows become, with a lifecycle as Ray Data's ``Datasink``.

For each committed input shard the engine hands every sink the shard's rows
(:class:`ShardRows`: all of them, in key order, and the kept ones) on a Ray
worker; a sink writes its files and returns a :class:`ShardWrite`: the files that
hold samples (for the manifest's shard list) and a few JSON-able facts for the
shard's ``_done`` marker. On the driver, ``on_start`` runs before the first shard,
``on_complete`` when the manifest is written (its dict is merged into it) and
``on_failed`` when the run stops on an error.

Each file is written under a temporary name and renamed into place, so a file
with a final name is always complete. The shard's ``_done`` marker is written
last, after every sink: it is what resume trusts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from curate import rows
from curate.fsutil import atomic_open

NON_LEDGER = {rows.IMAGE}


def ledger_table(table: pa.Table) -> pa.Table:
    cols = [c for c in table.column_names
            if c not in NON_LEDGER and not rows.is_internal(c) and not rows.is_embedding(c)]
    return table.select(cols)


def kept_rows(table: pa.Table) -> pa.Table:
    """The kept rows, in the table's (key) order."""
    return table.filter(pc.equal(table[rows.STATUS], rows.KEPT))


@dataclass(frozen=True)
class SinkContext:
    """What every sink of a run knows: the output root and the recipe's write options."""

    root: str
    caption_column: str = rows.CAPTION
    #: when the run started (epoch seconds): img2dataset's stats carry it
    started: float = 0.0
    #: the packed writer's options (:func:`curate.sinks.packed.packing_options`), or None
    packing: dict[str, Any] | None = None
    #: ``write.samples_per_shard``: rows per input shard (img2dataset's keys are built from it)
    samples_per_shard: int = 10000
    #: ``write.img2dataset`` as a dict (the img2dataset layout's options), or None for its defaults
    img2dataset: dict[str, Any] | None = None


@dataclass
class ShardRows:
    """One finalized shard: every row sorted by key (without image bytes), the kept rows (with
    them), and the drop counts."""

    shard: int
    table: pa.Table
    kept: pa.Table
    #: stage -> reason -> rows dropped
    dropped: dict[str, dict[str, int]]

    @property
    def name(self) -> str:
        return f"{self.shard:05d}"


@dataclass
class ShardWrite:
    """What a sink wrote for one shard."""

    #: files holding samples: {"path" (relative to the root), "format", "num_samples"}
    outputs: list[dict[str, Any]] = field(default_factory=list)
    #: facts for the shard's ``_done`` marker (e.g. the ledger's path, the packing totals)
    record: dict[str, Any] = field(default_factory=dict)


class Sink(ABC):
    """One output of a run. Subclasses set ``name`` and implement ``write``."""

    name: ClassVar[str]

    def __init__(self, ctx: SinkContext) -> None:
        self.ctx = ctx

    def on_start(self) -> None:  # noqa: B027 - an optional hook, as in Ray Data's Datasink
        """On the driver, before the first shard is finalized."""

    @abstractmethod
    def write(self, shard: ShardRows) -> ShardWrite:
        """On a worker: write this shard's files (each complete or absent)."""

    def on_complete(self, dones: list[dict[str, Any]]) -> dict[str, Any]:
        """On the driver, when the manifest is written: its fields from the ``_done`` markers (every
        shard's once the run is complete)."""
        return {}

    def on_failed(self, error: BaseException) -> None:  # noqa: B027 - an optional hook
        """On the driver, when the run stops on ``error``; committed shards stay as they are."""


__all__ = ["Sink", "SinkContext", "ShardRows", "ShardWrite", "atomic_open", "kept_rows", "ledger_table"]
