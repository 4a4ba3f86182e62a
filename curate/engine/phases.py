"""Run the phases of a plan: stream a per-sample phase and commit its shards, run the global stages.

A per-sample phase's dataset yields part reports; when a shard's rows are all
back (their count equals the shard's row count, carried by its last batch) the
driver commits the shard with a marker listing its parts. In the final phase a
committed shard is handed at once to the finalizer (:mod:`curate.engine.finalize`).
The global stages after a phase read only the columns they need from the
committed parts and write a decisions table that the next phase joins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import rows
from curate.engine.dataset import build_dataset
from curate.engine.events import GlobalsDone, OnProgress, PhaseEnded, PhaseStarted, RowsDone
from curate.engine.finalize import Timings, finalize_shard
from curate.engine.layout import Layout, ShardMarker, pending
from curate.engine.parts import read_part_files
from curate.engine.plan import Phase, Plan, stage_name
from curate.engine.samples import (
    GLOBAL_SAMPLES,
    pick_global,
    shard_sample_paths,
    write_global_picks,
)
from curate.engine.session import cluster_cpus, joins_cluster
from curate.engine.warm import WarmStart, wanted
from curate.errors import InputError
from curate.fsutil import atomic_open
from curate.recipe import Recipe
from curate.sinks.base import SinkContext
from curate.sources.base import Source
from curate.stages.base import GlobalStage
from curate.stages.registry import stage_class

log = logging.getLogger(__name__)

#: Shards finalized at once (at most one per CPU); each holds one shard's parts in memory.
MAX_FINALIZE_IN_FLIGHT = 8


@dataclass
class RunState:
    """What every phase of one run shares."""

    recipe: Recipe
    source: Source
    plan: Plan
    specs: list[dict[str, Any]]
    layout: Layout
    sink_ctx: SinkContext
    on_progress: OnProgress
    timings: Timings
    process_started: float
    global_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: when (perf_counter) the last phase's rows were all back: what follows is finalize time
    rows_back_at: float | None = None
    #: the driver's own work on phase 0 while Ray starts (:mod:`curate.engine.warm`), if any
    warm: WarmStart | None = None
    #: set when Ray's workers first hand rows back: the driver's background work that can wait (the
    #: report's imports) waits for it, so it does not take the driver's CPU from Ray's start-up and the
    #: first actors' creation (``curate run`` sets it too when its phases end)
    workers_busy: threading.Event = field(default_factory=threading.Event)


def begin_warm_start(run: RunState) -> None:
    """Before Ray starts: let a driver thread run phase 0's first work units (:mod:`curate.engine.warm`)."""
    phase = run.plan.phases[0]
    if not wanted(run.recipe, phase):
        return
    todo = pending(run.layout, phase=phase.index, final=phase.final, specs=run.specs)
    if todo.to_run:
        units, _ = work_units(run, phase, todo.to_run)
        run.warm = WarmStart(run.recipe, run.source, run.layout, phase, units).start()


class Finalizer:
    """Finalize committed shards of the last phase, a bounded number at once.

    On a Ray of this machine's own (no ``--ray-address``), in threads of this process: the shards
    are on this machine's disk anyway, and the run then starts no task worker process at all (with
    a download stage, which reads its own work units: :func:`curate.engine.adapters.reads_own_input`).
    Each Ray worker process imports Ray, Ray Data and curate (1-2.5 s of CPU) and the pool of them
    idles on: 20,000 downloads on 2 CPUs used 79-83 s of CPU in all and ran at 422-441 images/s this
    way, 93-98 s and 357-369 images/s with read and finalize tasks (three runs against two,
    alternating). On a cluster they stay zero-CPU Ray tasks, so the writes spread over the nodes.
    """

    def __init__(self, run: RunState) -> None:
        self.run = run
        # one per CPU at most, and never more than the memory cap (each holds one shard's parts)
        self.max_in_flight = min(MAX_FINALIZE_IN_FLIGHT, cluster_cpus())
        self.in_flight: list[futures.Future] = []
        self.pool: ThreadPoolExecutor | None = None
        if joins_cluster(run.recipe.runtime.ray_address):
            import ray

            remote = ray.remote(num_cpus=0, max_retries=3)(finalize_shard)  # I/O: never wait behind actors
            self._start = lambda kwargs: remote.remote(**kwargs).future()  # raises what ray.get raises
        else:
            pool = self.pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="curate-finalize")
            self._start = lambda kwargs: pool.submit(finalize_shard, **kwargs)

    def submit(self, marker: ShardMarker) -> None:
        thumbnails = self.run.recipe.write.thumbnails
        self.in_flight.append(self._start({
            "marker": marker, "formats": list(self.run.recipe.write.formats), "ctx": self.run.sink_ctx,
            "kept_samples_dir": self.run.layout.work("kept") if thumbnails else None,
            "part_samples": shard_sample_paths(self.run.layout, len(self.run.plan.phases), marker)
            if thumbnails else None}))
        while len(self.in_flight) >= self.max_in_flight:
            done, _ = futures.wait(self.in_flight, return_when=futures.FIRST_COMPLETED)
            self.in_flight = [f for f in self.in_flight if f not in done]
            for f in done:
                f.result()

    def wait(self) -> None:
        try:
            for f in self.in_flight:
                f.result()
        except BaseException:
            self.settle()
            raise
        self.in_flight = []
        self._close()

    def settle(self) -> None:
        """Let finalize work still running end before the run raises: none keeps writing behind the
        user's back (or the re-run's), and their own errors (a full disk hits them all) are not logged
        as unhandled."""
        for f in self.in_flight:
            with contextlib.suppress(Exception):
                f.result()
        self.in_flight = []
        self._close()

    def _close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


@dataclass
class _Shard:
    rows: int = 0
    total: int | None = None
    parts: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_phase(run: RunState, phase: Phase) -> list[dict[str, Any]]:
    """Run one phase over its pending shards; return the source shards that could not be read."""
    layout = run.layout
    todo = pending(layout, phase=phase.index, final=phase.final, specs=run.specs)
    failed: list[dict[str, Any]] = []
    if not todo:
        return failed
    finalizer = Finalizer(run) if phase.final else None
    if finalizer is not None:
        for s in todo.finalize_only:
            finalizer.submit(layout.read_marker(phase.index, s["shard"]))
    if todo.to_run:
        t_start = time.perf_counter()
        try:
            failed = _stream(run, phase, todo.to_run, finalizer)
        except BaseException:
            if finalizer is not None:
                finalizer.settle()
            raise
        run.rows_back_at = time.perf_counter()
        run.timings.phases.append(run.rows_back_at - t_start)
        run.on_progress(PhaseEnded(phase.index, run.rows_back_at - t_start))
    if finalizer is not None:
        t0, waiting = time.perf_counter(), bool(finalizer.in_flight)
        finalizer.wait()
        if waiting:
            log.info("phase %d: waited %.1fs for the last shards' finalize", phase.index, time.perf_counter() - t0)
    return failed


def end_warm_start(run: RunState, error: BaseException | None = None) -> None:
    """A run that fails stops the driver's warm-start thread and waits for its unit under way (its
    error, if any, is the lesser one); after Ctrl-C it does not wait (a unit can take a timeout)."""
    warm, run.warm = run.warm, None
    if warm is not None:
        warm.stop()
        if not isinstance(error, KeyboardInterrupt):
            with contextlib.suppress(BaseException):
                warm.join()


def work_units(run: RunState, phase: Phase, to_run: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                                   dict[int, int | None]]:
    """The read tasks of a phase, and each shard's row count where it is known before reading.

    A shard whose size is known is cut into units of about ``runtime.work_unit_rows`` rows (phase 0:
    the source's :meth:`~curate.sources.base.Source.split`; later phases: groups of the shard's part
    files, whose rows the previous phase counted). Other shards are one unit, and their size
    arrives with their last batch.
    """
    first = phase.stages[0] if phase.stages else None
    unit_rows = run.recipe.runtime.work_unit_rows or (first.resources.batch_size if first else None) \
        or run.recipe.runtime.batch_size
    units: list[dict[str, Any]] = []
    expected: dict[int, int | None] = {}
    for s in to_run:
        if phase.index == 0:
            split = run.source.split(s, unit_rows)
            units += split
            expected[s["shard"]] = s["rows"] if any("unit" in u for u in split) else None
            continue
        marker = run.layout.read_marker(phase.index - 1, s["shard"])
        per = max(1, round(len(marker.parts) * unit_rows / marker.rows)) if marker.rows else len(marker.parts) or 1
        groups = [marker.parts[i:i + per] for i in range(0, len(marker.parts), per)] or [[]]
        units += [{"shard": s["shard"], "kind": "parts", "parts": g, "unit": [i, len(groups)]}
                  for i, g in enumerate(groups)]
        expected[s["shard"]] = marker.rows
    return units, expected


def _stream(run: RunState, phase: Phase, to_run: list[dict[str, Any]], finalizer: Finalizer | None
            ) -> list[dict[str, Any]]:
    layout = run.layout
    global_names = [stage_name(g) for g in run.plan.phases[phase.index - 1].globals_after] if phase.index else []
    units, expected = work_units(run, phase, to_run)
    warm = run.warm if phase.index == 0 else None
    if warm is not None:  # the units the driver took while Ray started are not Ray Data's
        claimed = warm.stop()
        units = [u for u in units if json.dumps(u) not in claimed]
    ds = build_dataset(run.recipe, run.source, phase, units, layout, global_names) if units else None
    run.on_progress(PhaseStarted(phase.index, len(run.plan.phases), len(to_run),
                                 sum(s.get("rows", 0) for s in to_run) or None,
                                 tuple(stage_name(c) for c in phase.stages)))
    state = {s["shard"]: _Shard(total=expected[s["shard"]]) for s in to_run}
    committed: set[int] = set()

    def commit(shard: int) -> None:
        st = state[shard]
        marker = ShardMarker(shard=shard, rows=st.rows, parts=st.parts, seconds=st.seconds)
        if phase.index > 0:  # carry the seconds of earlier phases
            for k, v in layout.read_marker(phase.index - 1, shard).seconds.items():
                marker.seconds[k] = marker.seconds.get(k, 0.0) + v
        layout.write_marker(phase.index, marker)
        committed.add(shard)
        if finalizer is not None:
            finalizer.submit(marker)

    def take(out: pa.Table) -> None:
        """One part report (:data:`curate.engine.parts.PART_REPORT`): count its rows, commit full shards."""
        if run.timings.first_part is None:
            run.timings.first_part = time.time() - run.process_started
            log.info("phase %d: first rows back %.1fs after the process started", phase.index,
                     run.timings.first_part)
        for r in out.to_pylist():
            if r["first_at"] is not None:  # a stage said when its first row was ready (download)
                first = r["first_at"] - run.process_started
                run.timings.first_row = first if run.timings.first_row is None else min(first, run.timings.first_row)
            st = state[r["shard"]]
            st.rows += r["rows"]
            st.parts.append(r["path"])
            for k, v in json.loads(r["seconds"]).items():
                st.seconds[k] = st.seconds.get(k, 0.0) + v
            if r["total"] is not None:
                st.total = r["total"]
            run.on_progress(RowsDone(phase.index, r["rows"], r["kept"]))
            if st.total is not None:
                if st.rows == st.total:
                    commit(r["shard"])
                elif st.rows > st.total:
                    raise RuntimeError(f"shard {r['shard']}: {st.rows} rows written, {st.total} read")

    try:
        for report in warm.reports() if warm is not None else ():  # what the driver did while Ray started
            take(report)
        if ds is not None:
            for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                run.workers_busy.set()
                for report in warm.reports() if warm is not None else ():
                    take(report)
                take(out)
    except BaseException as e:
        end_warm_start(run, e)  # it writes nothing behind the error's back
        raise
    if warm is not None:  # its unit under way ends before the phase does (or raises what it raised)
        run.warm = None
        for report in warm.join():
            take(report)
        run.timings.warm_start_rows = warm.rows
    failed = []
    for shard, st in state.items():
        if shard in committed:
            continue
        if phase.index == 0 and layout.exists(layout.source_error(shard)):
            failed.append(layout.read_json(layout.source_error(shard)))
        elif st.rows == 0 and not st.total:
            commit(shard)  # an empty input shard
        else:
            raise RuntimeError(f"shard {shard}: only {st.rows} of {st.total} rows came back")
    return failed


def run_globals(run: RunState, phase: Phase) -> None:
    """Run the global stages after ``phase`` over keys and small columns of every committed shard."""
    layout = run.layout
    gdir = layout.decisions_dir(phase.index)
    info_path = f"{gdir}/_info.json"
    if layout.exists(info_path):
        run.global_info.update(layout.read_json(info_path))
        return
    t_start = time.perf_counter()
    try:
        names = _run_globals(run, phase, gdir)
    finally:
        # Arrow's allocator (jemalloc) keeps freed pages for reuse: without this the driver holds
        # the global phase's transient peak (sorts, hash tables, copies) through every later phase.
        pa.default_memory_pool().release_unused()
    seconds = time.perf_counter() - t_start
    run.timings.globals += seconds
    run.on_progress(GlobalsDone(phase.index, tuple(names), seconds))


def _run_globals(run: RunState, phase: Phase, gdir: str) -> list[str]:
    """The global stages over the kept rows, each seeing what the previous kept; their names."""
    layout = run.layout
    names = [stage_name(g) for g in phase.globals_after]
    stages: list[GlobalStage] = [stage_class(g.use)(g) for g in phase.globals_after]  # type: ignore[misc]
    inputs = list(dict.fromkeys(c for st in stages for c in st.input_columns()))
    owners: list[int] = []
    paths: list[str] = []
    for s in run.specs:
        marker = layout.read_marker(phase.index, s["shard"])
        owners += [s["shard"]] * len(marker.parts)
        paths += marker.parts

    def live(t: pa.Table) -> tuple[pa.ChunkedArray, pa.Table]:
        """A part's keys (all rows, for the uniqueness check) and its kept rows' key and input columns:
        rows dropped earlier take no part in a global decision, so the driver never holds them."""
        kept = t.filter(pc.equal(t[rows.STATUS], rows.KEPT))
        return t[rows.KEY], kept.select([c for c in (rows.KEY, *inputs) if c in kept.column_names])

    read = read_part_files(paths, {rows.KEY, rows.STATUS, *inputs}, each=live)
    keys = pa.chunked_array([c for k, _ in read for c in k.cast(pa.string()).chunks], pa.string())
    if len(keys) and pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        repeated = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:5]
        raise InputError(f"global stages need unique keys; repeated: {repeated}. Set source.key_col to a "
                         "unique column, or leave it unset so curate numbers the rows")
    del keys
    table = rows.concat([t.append_column(rows.SHARD, pa.array([shard] * t.num_rows, pa.int64()))
                         for shard, (_, t) in zip(owners, read, strict=True)])
    del read
    info: dict[str, dict[str, Any]] = {}
    picks: list[dict[str, Any]] = []  # the dropped rows the report shows (write.thumbnails)
    for st, name in zip(stages, names, strict=True):
        t0 = time.perf_counter()
        decisions, st_info = _decide(st, table)
        _write_table(f"{gdir}/{name}.parquet", decisions)
        if run.recipe.write.thumbnails and table.num_rows:
            picks += pick_global(name, decisions, table, st.input_columns())
        if table.num_rows:  # later global stages see only what this one kept
            dropped = decisions.filter(pc.is_valid(decisions[rows.REASON]))[rows.KEY].combine_chunks()
            table = table.filter(pc.invert(pc.is_in(table[rows.KEY].cast(pa.string()),
                                                    value_set=dropped.cast(pa.string()))))
            del decisions, dropped
            pa.default_memory_pool().release_unused()
        st_info["seconds"] = time.perf_counter() - t0
        info[name] = st_info
    if run.recipe.write.thumbnails:
        write_global_picks(f"{gdir}/{GLOBAL_SAMPLES}", picks)
    layout.write_json(f"{gdir}/_info.json", info)  # last: what resume trusts
    run.global_info.update(info)
    return names


def _decide(st: GlobalStage, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """One global stage's decisions over the rows still kept (``table``), with each decided row's shard
    attached (so each shard reads only its own decisions)."""
    # only the columns this stage reads
    cols = dict.fromkeys([rows.KEY, rows.SHARD, *st.input_columns()])
    live = table.select([c for c in cols if c in table.column_names])
    if not live.num_rows:
        return pa.table({rows.KEY: pa.array([], pa.string()), rows.REASON: pa.array([], pa.string()),
                         rows.SHARD: pa.array([], pa.int64())}), {}
    decisions, info = st.decide(live)
    # a hash join in Arrow: a Python dict of every key would cost ~150 B a row on the driver
    pos = pc.index_in(decisions[rows.KEY].cast(pa.string()),
                      value_set=live[rows.KEY].combine_chunks().cast(pa.string()))
    decisions = decisions.append_column(rows.SHARD, live[rows.SHARD].combine_chunks().take(pos).cast(pa.int64()))
    return decisions.take(pc.sort_indices(decisions, sort_keys=[(rows.SHARD, "ascending")])), info


def _write_table(path: str, table: pa.Table) -> None:
    with atomic_open(path) as f:
        pq.write_table(table, f, row_group_size=8192)
