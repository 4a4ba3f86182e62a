"""The stage contract.

A stage is one file holding a small class: a registry ``name``, a pydantic
``Config`` for its options (the base is generic over it, ``Stage[C]``, so
``self.config`` is typed), declared resources, an optional ``setup(ctx)`` that
loads a model once per worker, ``process(batch)`` that looks at the *live* rows
of a batch and returns new columns plus, per row, either ``None`` (keep) or a
drop reason, and an optional ``teardown()`` that the engine calls when the
worker is done. The base class merges the result back into the full batch, so
a stage never sees, nor can lose, rows that an earlier stage dropped.

``@register`` (:mod:`curate.stages.registry`) makes a class available as
``use: <name>``; the registry finds every module of this package, and of any
installed package that declares a ``curate.stages`` entry point, by itself.

Global stages (``kind = "global"``) see the whole dataset at once — but only
keys, hashes, scores and embeddings — and return a small decisions table. The
runner runs them between two per-sample phases.

Example (a complete filter, the whole of ``curate/stages/min_caption_chars.py``)::

    from typing import Literal

    import pyarrow as pa

    from curate.stages.base import Stage, StageConfig, StageResult
    from curate.stages.registry import register


    class MinCaptionCharsConfig(StageConfig):
        use: Literal["min_caption_chars"] = "min_caption_chars"
        min_chars: int = 5


    @register
    class MinCaptionChars(Stage[MinCaptionCharsConfig]):
        name = "min_caption_chars"
        Config = MinCaptionCharsConfig

        def process(self, batch: pa.Table) -> StageResult:
            chars = [len(c or "") for c in batch.column("caption").to_pylist()]
            return StageResult(
                columns={"caption_chars": pa.array(chars, pa.int32())},
                drop=[None if n >= self.config.min_chars else "too_short" for n in chars],
            )
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from curate import rows


class Resources(BaseModel):
    """What one worker of a stage needs. ``concurrency`` is the actor-pool size for model stages."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    concurrency: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)


class StageConfig(BaseModel):
    """Options common to every stage. Subclasses add their own and pin ``use``."""

    model_config = ConfigDict(extra="forbid")
    use: str
    name: str | None = Field(None, description="Name in the ledger's dropped_by; defaults to `use`.")
    resources: Resources = Field(default_factory=Resources)


C = TypeVar("C", bound=StageConfig)


@dataclass(frozen=True)
class StageContext:
    """What a worker tells a stage at ``setup``: where it may keep state of its own, what it holds.

    ``work_dir`` is the stage's folder under the run's ``_work/`` (e.g. the VLM stages keep
    their replies there for sample-level resume); None outside a run (tests, notebooks).
    """

    work_dir: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class StageResult:
    """What ``process`` returns for the live rows of a batch, in their order."""

    columns: dict[str, pa.Array] = field(default_factory=dict)
    drop: list[str | None] | None = None


class Stage(Generic[C]):
    """Per-sample stage: maps a batch of rows to the same rows with new columns and marks."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    kind: ClassVar[Literal["map", "global"]] = "map"
    #: Model stages run in an actor pool so ``setup()`` happens once per worker.
    stateful: ClassVar[bool] = False
    #: Batches one actor runs at once (threads). More than one only for I/O-bound stages whose
    #: ``process`` is thread-safe (``download``): a slow batch's tail then overlaps the next.
    batches_in_flight: ClassVar[int] = 1
    #: Column types of everything ``process`` may add, so empty batches stay typed.
    output_columns: ClassVar[dict[str, pa.DataType]] = {}

    def __init__(self, config: C) -> None:
        self.config: C = config
        self.stage_name = config.name or config.use
        self.ctx = StageContext()

    @classmethod
    def expand(cls, config: StageConfig) -> list[StageConfig]:
        """Recipe sugar: the stage configs this entry stands for (e.g. a score plus its global threshold)."""
        return [config]

    def check(self) -> None:
        """Fail on the driver, before any work, when the stage cannot run here (e.g. missing model)."""

    def setup(self, ctx: StageContext) -> None:
        """Load models or open clients. Called once per worker before the first batch."""

    def teardown(self) -> None:
        """Release what ``setup`` took (sessions, threads, buffered state). Called once per worker
        when its phase has no more batches for it; must be safe to call twice."""

    def process(self, batch: pa.Table) -> StageResult:  # pragma: no cover - contract
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> pa.Table:
        start = time.perf_counter()
        live = rows.live_mask(table)
        n_live = pc.sum(live.cast(pa.int64())).as_py() or 0
        columns: dict[str, pa.Array] = {}
        drop_full: list[str | None] = [None] * table.num_rows
        if n_live:
            live_idx = pc.indices_nonzero(live.combine_chunks() if isinstance(live, pa.ChunkedArray) else live)
            result = self.process(table.take(live_idx))
            idx = live_idx.to_pylist()
            for col, values in result.columns.items():
                if len(values) != n_live:
                    raise ValueError(f"stage {self.stage_name}: column {col} has {len(values)} values for {n_live} rows")
                columns[col] = _scatter(values, idx, table.num_rows, self.output_columns.get(col))
            if result.drop is not None:
                if len(result.drop) != n_live:
                    raise ValueError(f"stage {self.stage_name}: {len(result.drop)} drop marks for {n_live} rows")
                for i, r in zip(idx, result.drop, strict=True):
                    drop_full[i] = r
        for col, typ in self.output_columns.items():
            if col not in columns and col not in table.column_names:
                columns[col] = pa.nulls(table.num_rows, typ)
        for col, values in columns.items():
            table = rows.with_column(table, col, values)
        table = rows.mark_dropped(table, drop_full, self.stage_name)
        elapsed = time.perf_counter() - start
        per_row = elapsed / table.num_rows if table.num_rows else 0.0
        return rows.with_column(
            table, rows.timing_column(self.stage_name), pa.array([per_row] * table.num_rows, pa.float64())
        )


class GlobalStage(Stage[C]):
    """A stage that needs the whole dataset: fraction thresholds, dedup clusters.

    ``columns`` names what it reads from the committed work files (never image
    bytes); ``decide`` returns a table with ``key`` and ``reason`` (null = keep)
    and any extra columns (e.g. ``duplicate_of``) that are joined back to the rows.
    """

    kind: ClassVar[Literal["map", "global"]] = "global"
    columns: ClassVar[list[str]] = []

    def input_columns(self) -> list[str]:
        return list(self.columns)

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:  # pragma: no cover
        """Return (decisions, info): decisions has ``key``, ``reason`` and extra columns;
        info is a small JSON-able dict recorded in the manifest (thresholds, cluster sizes)."""
        raise NotImplementedError

    def process(self, batch: pa.Table) -> StageResult:  # pragma: no cover - not per-sample
        raise TypeError(f"{self.stage_name} is a global stage")


def _scatter(values: pa.Array | list, idx: list[int], n: int, typ: pa.DataType | None) -> pa.Array:
    """Place the live rows' values at their positions; dropped rows get null."""
    if not isinstance(values, pa.Array | pa.ChunkedArray):
        values = pa.array(values, type=typ)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if typ is not None and values.type != typ:
        values = values.cast(typ)
    if len(idx) == n:
        return values
    # positions[i] = index into values for live rows, null for others
    positions = [None] * n
    for j, i in enumerate(idx):
        positions[i] = j
    return values.take(pa.array(positions, pa.int64()))

