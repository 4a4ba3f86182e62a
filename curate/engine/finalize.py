"""The end of a row's way: a committed shard through every sink, then the run's manifest.

``finalize_shard`` runs once per shard of the last phase (in a driver thread on a local
Ray, as a Ray task on a cluster: :class:`curate.engine.phases.Finalizer`): it reads the
shard's part files, sorts the rows by key, hands them to each sink and writes the
shard's ``_done`` marker last. ``write_manifest`` sums the markers on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import __version__, rows
from curate.engine.layout import DONE, Layout, ShardMarker, writing
from curate.engine.parts import read_part_files
from curate.engine.plan import Phase, stage_name
from curate.engine.samples import merge_run, sample_shard, write_table
from curate.fsutil import write_json
from curate.manifest import Counts, Manifest, ShardEntry, SourceErrorEntry, StageCounters
from curate.recipe import Recipe
from curate.sinks.base import ShardRows, Sink, SinkContext
from curate.sinks.registry import make_sinks
from curate.stages.registry import stage_class


def finalize_shard(*, marker: ShardMarker, formats: list[str], ctx: SinkContext,
                   kept_samples_dir: str | None = None, part_samples: list[str] | None = None) -> dict[str, Any]:
    """Write one committed shard through every sink; the ``_done`` marker last. Returns the marker.

    With ``kept_samples_dir`` (``write.thumbnails``) the shard's sample, its kept rows' and its parts'
    (``part_samples``), is thumbnailed there."""
    tables = read_part_files(marker.parts)
    # A part holds one work unit's rows in key order and units are disjoint ranges of keys, so in
    # the order of their first keys the parts are usually the shard sorted already (they arrive in
    # the order their units finished): then the sort below copies no image.
    tables.sort(key=_first_key)
    table = rows.concat(tables) if tables else pa.table({})
    del tables
    table = table.drop([c for c in table.column_names if c == rows.SHARD])
    kept = table
    if table.num_rows:
        # Sort once by key; image bytes are copied only for the kept rows (the sinks that read every
        # row, the ledger and the stats, never read them), and not at all when the rows are in key
        # order and all kept (a shard of 12,500 downloaded images: ~300 MB not copied).
        order = pc.sort_indices(table[rows.KEY])
        is_kept = pc.fill_null(rows.live_mask(table), False)
        image_cols = [c for c in table.column_names if c == rows.IMAGE]
        if np.array_equal(order.to_numpy(), np.arange(table.num_rows)):
            kept = table if pc.all(is_kept).as_py() else table.filter(is_kept)
            table = table.drop(image_cols)
        else:
            kept = table.take(order.filter(is_kept.take(order)))
            table = table.drop(image_cols).take(order)
    dropped: dict[str, dict[str, int]] = {}
    if table.num_rows:
        for by, reason in zip(table[rows.DROPPED_BY].to_pylist(), table[rows.REASON].to_pylist(), strict=True):
            if by is not None:
                per = dropped.setdefault(by, {})
                per[reason or "unknown"] = per.get(reason or "unknown", 0) + 1
    shard = ShardRows(shard=marker.shard, table=table, kept=kept, dropped=dropped)
    done: dict[str, Any] = {"shard": marker.shard, "rows": table.num_rows, "kept": shard.kept.num_rows,
                            "dropped": dropped, "seconds": marker.seconds, "outputs": []}
    for sink in make_sinks(formats, ctx):
        with writing(f"{ctx.root} ({sink.name} of shard {shard.name})"):
            wrote = sink.write(shard)
        done["outputs"] += wrote.outputs
        done.update(wrote.record)
    sample = sample_shard(kept, part_samples or []) if kept_samples_dir is not None else None
    if sample is not None:
        with writing(f"{kept_samples_dir}/{shard.name}.parquet"):
            write_table(f"{kept_samples_dir}/{shard.name}.parquet", sample)
    path = f"{ctx.root}/{DONE}/{shard.name}.json"
    with writing(path):
        write_json(path, done)
    return done


def _first_key(table: pa.Table) -> tuple[bool, str]:
    """A part's place in the shard: its first key (an empty part first; a null key, which no source
    writes, last, where the sort puts it)."""
    key = table[rows.KEY][0].as_py() if table.num_rows else ""
    return key is None, key or ""


@dataclass
class Timings:
    """Where a run's wall-clock time went (seconds), reported in ``manifest.json``."""

    #: process start to the engine's ``run()`` (interpreter start-up, imports, recipe loading)
    process_start_to_run: float = 0.0
    #: ``ray.init`` (0 when Ray was already running in this process)
    ray_start: float = 0.0
    #: process start to the first row out of the first stage that says when (the first image
    #: downloaded), else to the first rows back at the driver
    first_row: float | None = None
    #: process start to the first part file reported back to the driver (a whole batch done)
    first_part: float | None = None
    #: rows the driver ran itself while Ray started (:mod:`curate.engine.warm`)
    warm_start_rows: int = 0
    #: wall-clock seconds per phase that ran, in order
    phases: list[float] = field(default_factory=list)
    #: the global stages between phases
    globals: float = 0.0
    #: after the last rows came back: the last shards' finalize, the manifest, the statistics
    finalize: float = 0.0
    #: process start to the manifest
    total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v] if isinstance(v, list) else v)
                for k, v in self.__dict__.items()}


def write_manifest(recipe: Recipe, layout: Layout, phases: list[Phase], specs: list[dict[str, Any]],
                   global_info: dict[str, dict[str, Any]], sinks: list[Sink], *, elapsed: float,
                   timings: Timings | None = None) -> Manifest:
    """Sum the ``_done`` markers into ``manifest.json``; ``complete`` once every shard has one."""
    if not global_info:
        for ph in phases:
            p = f"{layout.decisions_dir(ph.index)}/_info.json"
            if layout.exists(p):
                global_info.update(layout.read_json(p))
    done_shards = layout.shards_in(layout.path(DONE))
    dones = sorted((layout.read_json(layout.done(s["shard"])) for s in specs if s["shard"] in done_shards),
                   key=lambda d: d["shard"])
    total = sum(d["rows"] for d in dones)
    dropped: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for d in dones:
        for by, reasons in d["dropped"].items():
            for reason, n in reasons.items():
                dropped.setdefault(by, {})[reason] = dropped.get(by, {}).get(reason, 0) + n
        for k, v in d["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
    counters: list[StageCounters] = []
    alive = total
    order = [("source", "source", "source")] + [(stage_name(c), c.use, stage_class(c.use).kind)
                                                 for c in recipe.stages]
    for name, use, kind in order:
        d = dropped.get(name, {})
        n_drop = sum(d.values())
        if name == "source" and not d:
            continue
        info = dict(global_info.get(name, {}))
        secs = info.pop("seconds", None) if kind == "global" else seconds.get(name, 0.0)
        counters.append(StageCounters(name=name, use=use, kind=kind, rows_in=alive, kept=alive - n_drop,
                                      dropped=d, seconds=round(secs or 0.0, 3), info=info))
        alive -= n_drop
    complete = len(dones) == len(specs)
    extra: dict[str, Any] = {}
    for sink in sinks:
        extra.update(sink.on_complete(dones))
    errors_dir = layout.source_errors()
    source_errors = [SourceErrorEntry(**layout.read_json(f"{errors_dir}/{name}"))
                     for name in sorted(layout.listdir_names(errors_dir)) if name.endswith(".json")]
    manifest = Manifest(
        curate_version=__version__, recipe=recipe.resolved(), recipe_fingerprint=recipe.fingerprint(),
        complete=complete, shards=[ShardEntry(**o) for d in dones for o in d["outputs"]],
        ledger=[d["ledger"] for d in dones if d.get("ledger")],
        counts=Counts(input=total, kept=sum(d["kept"] for d in dones), dropped=dropped), stages=counters,
        stats={}, packing=extra.get("packing"), source_errors=source_errors, elapsed_seconds=round(elapsed, 3),
        timings=timings.as_dict() if timings else {},
    )
    if complete and recipe.write.thumbnails:  # the report's thumbnails: committed parts' and shards' samples
        merge_run(layout, specs)
    layout.write_json(layout.path("manifest.json"), manifest.model_dump(mode="json"))
    return manifest


def cleanup_work(layout: Layout, phases: list[Phase]) -> None:
    """After a complete run, part files are no longer needed (the outputs hold everything)."""
    for ph in phases:
        parts = layout.parts_dir(ph.index)
        if layout.exists(parts):
            layout.fs.rm(parts, recursive=True)
