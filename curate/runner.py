"""Run a recipe on Ray Data: per-sample phases, global phases between them, sinks at the end.

The plan::

    source ─► [map stages] ─► parts ─► commit ─► (global stages) ─► [map stages] ─► parts ─► finalize

Input shards are the unit of work and of resume. Rows carry their shard id
(``_shard``); the last batch of a shard carries the shard's row count
(``_shard_rows``). Every per-sample phase ends in a writer that stores
whatever rows reach it as a *part* file and reports (shard, rows, part) to the
driver; when a shard's rows are all accounted for, the driver commits it with a
marker listing its parts. No shuffle is needed and nothing waits for a whole
shard in memory. In the last phase a committed shard is *finalized* by a Ray
task into WebDataset/Parquet shards, its ledger and its stats; its ``_done``
marker is written last. Re-running skips every shard that has one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import __version__, rows
from curate.errors import NO_SPACE_ERRNOS, CurateError, NoSpaceError, OutputError, SourceError
from curate.fsutil import atomic_open, write_json
from curate.manifest import Counts, Manifest, ShardEntry, StageCounters
from curate.recipe import Recipe
from curate.sinks.base import kept_rows
from curate.sinks.packed import packing_options, summarize_packing, write_packed
from curate.sinks.parquet import write_ledger, write_parquet_shard
from curate.sinks.webdataset import write_webdataset
from curate.sources.base import Source, make_source
from curate.stages import GlobalStage, Stage, StageConfig, StageContext, stage_class
from curate.stages.download import FAILED_TO_RESIZE

log = logging.getLogger(__name__)

WORK = "_work"
DONE = "_done"
SOURCE_ERRORS = "source_errors"  # under _work/: one JSON per input shard that could not be read this run
MAX_FINALIZE_IN_FLIGHT = 8  # finalize tasks queued at once; each holds one shard's parts in memory


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn a full disk or quota while writing ``path`` into an error that names it.

    The OSError itself says only "No space left on device", not where; the writers use
    ``atomic_open``, so the half-written file is already gone when this fires.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        raise NoSpaceError(
            f"{path}: no space left on the output's storage ({e.strerror or e}); nothing partial was committed. "
            "Free space (or pick another -o) and re-run the same command: it resumes from the committed shards"
        ) from e


def user_error(e: BaseException) -> CurateError | None:
    """The CurateError behind an exception that crossed Ray (RayTaskError, Ray Data's UserCodeException)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, CurateError) and type(x).__module__.startswith("curate."):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


# ------------------------------------------------------------------ plan


@dataclass
class Phase:
    index: int
    stages: list[StageConfig]
    globals_after: list[StageConfig] = field(default_factory=list)
    final: bool = False


def make_phases(stages: list[StageConfig]) -> list[Phase]:
    """Split the stage list at global stages: [map…] [global…] [map…] …"""
    phases = [Phase(0, [])]
    for cfg in stages:
        cls = stage_class(cfg.use)
        if cls.kind == "global":
            phases[-1].globals_after.append(cfg)
        else:
            if phases[-1].globals_after:
                phases.append(Phase(len(phases), []))
            phases[-1].stages.append(cfg)
    if phases[-1].globals_after:
        phases.append(Phase(len(phases), []))
    phases[-1].final = True
    return phases


def stage_name(cfg: StageConfig) -> str:
    return cfg.name or cfg.use


# ------------------------------------------------------------------ paths


class Layout:
    """Where everything lives under the output root (any fsspec URL)."""

    def __init__(self, output: str) -> None:
        self.root = output.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def work(self, *parts: str) -> str:
        return self.path(WORK, *parts)

    def marker(self, phase: int, shard: int) -> str:
        return self.work(f"p{phase}", f"{shard:05d}.json")

    def done(self, shard: int) -> str:
        return self.path(DONE, f"{shard:05d}.json")

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def write_json(self, path: str, data: Any) -> None:
        with writing(path):
            write_json(path, data)

    def source_error(self, shard: int) -> str:
        return self.work(SOURCE_ERRORS, f"{shard:05d}.json")

    def listdir_names(self, path: str) -> list[str]:
        try:
            return [p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []


# ------------------------------------------------------------------ UDFs (run on Ray workers)

_STAGE_CACHE: dict[str, Stage] = {}


def _stage_for(cfg: StageConfig) -> Stage:
    ident = f"{cfg.use}:{cfg.model_dump_json()}"
    stage = _STAGE_CACHE.get(ident)
    if stage is None:
        stage = stage_class(cfg.use)(cfg)
        stage.setup(StageContext())
        _STAGE_CACHE[ident] = stage
    return stage


def _apply_stage(batch: pa.Table, cfg: StageConfig) -> pa.Table:
    return _stage_for(cfg)(batch)


def _writes_own_parts(cfg: StageConfig, res) -> bool:
    """Whether the phase's last stage stores its output as part files itself.

    Worth it for I/O-bound actor stages that run several calls at once (``download``): a call's
    write overlaps the others' work, and every image skips a copy through Ray's object store into
    a writer process (20,000 downloads: 66 s of CPU instead of 71-76 s). A model actor runs one
    call at a time, so its GPU or CPU would wait for each write (on object storage, a round trip
    per part): those keep the zero-CPU writer op after them, as stateless stages do.
    """
    cls = stage_class(cfg.use)
    return bool(cls.stateful and cls.batches_in_flight > 1 and not res.num_gpus)


class _StageActor:
    """Actor-pool wrapper for model stages: ``setup()`` runs once per actor.

    With ``parts_dir`` (see :func:`_writes_own_parts`) the actor also stores its output as part
    files and returns only what :func:`_write_parts` reports: the rows' image bytes go from the
    stage to disk without another copy through Ray's object store to a writer process.
    """

    def __init__(self, cfg: StageConfig, parts_dir: str | None = None, work_dir: str | None = None) -> None:
        self.stage = stage_class(cfg.use)(cfg)
        self.stage.setup(StageContext(work_dir=work_dir, num_cpus=cfg.resources.num_cpus,
                                      num_gpus=cfg.resources.num_gpus))
        self.parts_dir = parts_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.stage(batch)
        return out if self.parts_dir is None else _write_parts(out, parts_dir=self.parts_dir)


def _read_shards(items: pa.Table, *, source: Source | None, decisions_dir: str | None,
                 global_names: list[str], batch_rows: int, errors_dir: str | None = None,
                 on_source_error: str = "continue") -> Iterator[pa.Table]:
    """Yield the rows of each shard in ``items``; the last batch carries the shard's row count.

    A source shard that fails mid-read (truncated tar, corrupt Parquet) never gets that last
    batch, so it is never committed: its error is recorded under ``errors_dir`` for the driver,
    and the task goes on with its next shard — or, with ``on_source_error: fail``, raises.
    """
    for spec_json in items["spec"].to_pylist():
        spec = json.loads(spec_json)
        shard = spec["shard"]
        it = _read_parts(spec, batch_rows) if spec["kind"] == "parts" else source.read_shard(spec, batch_rows)
        if spec["kind"] == "parts" and global_names:
            it = _join_decisions(it, shard, decisions_dir, global_names)
        total = 0
        prev: pa.Table | None = None
        try:
            for batch in it:
                if batch.num_rows == 0:
                    continue
                total += batch.num_rows
                if prev is not None:
                    yield _tag(prev, shard, None)
                prev = batch
        except Exception as e:
            if spec["kind"] == "parts" or errors_dir is None:
                raise  # our own work files: a bug or lost storage, not bad input
            err = _record_source_error(spec, e, total, errors_dir)
            if on_source_error == "fail":
                raise err from e
            continue
        if prev is not None:
            yield _tag(prev, shard, total)


def _record_source_error(spec: dict[str, Any], e: Exception, rows_read: int, errors_dir: str) -> SourceError:
    where = str(spec.get("path") or spec.get("paths") or f"shard {spec['shard']}")
    detail = str(e) if isinstance(e, CurateError) else f"{type(e).__name__}: {e}"
    message = (f"input shard {spec['shard']}: {detail}" if detail.startswith(where)
               else f"{where}: cannot read input shard {spec['shard']}: {detail}")
    log.error("%s; the %d rows read before the error are not committed", message, rows_read)
    path = f"{errors_dir}/{spec['shard']:05d}.json"
    with writing(path):
        write_json(path, {"shard": spec["shard"], "path": where, "error": message, "rows_read": rows_read})
    return SourceError(message)


def _tag(t: pa.Table, shard: int, total: int | None) -> pa.Table:
    t = rows.with_column(t, rows.SHARD, pa.array([shard] * t.num_rows, pa.int64()))
    return rows.with_column(t, rows.SHARD_ROWS, pa.array([total] * t.num_rows, pa.int64()))


def _read_parts(spec: dict[str, Any], batch_rows: int) -> Iterator[pa.Table]:
    for path in spec["parts"]:
        with fsspec.open(path, "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                t = pa.Table.from_batches([b])
                yield t.drop([c for c in t.column_names if c in (rows.SHARD, rows.SHARD_ROWS)])


def _join_decisions(it: Iterator[pa.Table], shard: int, decisions_dir: str,
                    global_names: list[str]) -> Iterator[pa.Table]:
    decided = []
    for name in global_names:
        path = f"{decisions_dir}/{name}.parquet"
        with fsspec.open(path, "rb") as f:
            d = pq.read_table(f, filters=[(rows.SHARD, "=", shard)])
        decided.append((name, d.drop([rows.SHARD])))
    for batch in it:
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
    pos = pc.index_in(batch[rows.KEY].cast(pa.string()), value_set=decisions[rows.KEY].combine_chunks().cast(pa.string()))
    for c in decisions.column_names:
        if c in (rows.KEY, rows.REASON):
            continue
        values = decisions[c].take(pos)
        if c in batch.column_names:  # an earlier global stage's value (e.g. its duplicate_of) stays
            values = pc.coalesce(values, batch[c].cast(values.type))
        batch = rows.with_column(batch, c, values)
    return rows.mark_dropped(batch, decisions[rows.REASON].take(pos), stage)


def _write_parts(batch: pa.Table, *, parts_dir: str) -> pa.Table:
    """Store the batch as one part file per shard; report what was stored."""
    out: dict[str, list] = {"shard": [], "rows": [], "total": [], "path": [], "seconds": []}
    if batch.num_rows == 0:
        return pa.table({"shard": pa.array([], pa.int64()), "rows": pa.array([], pa.int64()),
                         "total": pa.array([], pa.int64()), "path": pa.array([], pa.string()),
                         "seconds": pa.array([], pa.string())})
    fs, root = fsspec.core.url_to_fs(parts_dir)
    fs.makedirs(root, exist_ok=True)
    shards = batch[rows.SHARD]
    for shard in pc.unique(shards).to_pylist():
        t = batch.filter(pc.equal(shards, shard))
        totals = [x for x in pc.unique(t[rows.SHARD_ROWS]).to_pylist() if x is not None]
        seconds = {c[3:]: pc.sum(t[c]).as_py() or 0.0 for c in t.column_names if c.startswith("_t_")}
        t = t.drop([c for c in t.column_names if c.startswith("_t_") or c == rows.SHARD_ROWS])
        name = f"{shard:05d}-{uuid.uuid4().hex[:12]}.parquet"
        try:
            with writing(f"{parts_dir}/{name}"), fs.open(f"{root}/{name}", "wb") as f:
                pq.write_table(t, f, compression="none")  # temporary, mostly JPEG bytes: zstd only burns CPU
        except BaseException:
            with contextlib.suppress(Exception):  # never listed in a marker, but it holds space
                fs.rm(f"{root}/{name}")
            raise
        out["shard"].append(shard)
        out["rows"].append(t.num_rows)
        out["total"].append(totals[0] if totals else None)
        out["path"].append(_with_protocol(parts_dir, f"{root}/{name}"))
        out["seconds"].append(json.dumps(seconds))
    return pa.table({"shard": pa.array(out["shard"], pa.int64()), "rows": pa.array(out["rows"], pa.int64()),
                     "total": pa.array(out["total"], pa.int64()), "path": pa.array(out["path"], pa.string()),
                     "seconds": pa.array(out["seconds"], pa.string())})


def _with_protocol(like: str, path: str) -> str:
    if "://" in like and "://" not in path:
        return like.split("://", 1)[0] + "://" + path
    return path


#: Part files read at once. A shard has a part per block, or per batch where the last stage writes
#: its own parts (download: about 20 for 10,000 rows); on object storage each read is a round trip
#: or three, so they overlap.
PART_READ_THREADS = 16


def read_part_files(paths: list[str], wanted: set[str] | None = None) -> list[pa.Table]:
    """Read part files (all columns, or those in ``wanted``), several at once; in order."""

    def one(path: str) -> pa.Table:
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = None if wanted is None else [c for c in pf.schema_arrow.names if c in wanted]
            return pf.read(columns=cols)

    if len(paths) <= 1:
        return [one(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(PART_READ_THREADS, len(paths)), thread_name_prefix="curate-parts") as pool:
        return list(pool.map(one, paths))


def finalize_shard(*, root: str, shard: int, parts: list[str], formats: list[str], caption_column: str,
                   seconds: dict[str, float], started: float, packing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one committed shard's outputs, ledger and stats; the ``_done`` marker last."""
    tables = read_part_files(parts)
    table = rows.concat(tables) if tables else pa.table({})
    table = table.drop([c for c in table.column_names if c == rows.SHARD])
    if table.num_rows:
        table = table.take(pc.sort_indices(table[rows.KEY]))
    name = f"{shard:05d}"
    outputs: list[dict[str, Any]] = []
    kept = kept_rows(table) if table.num_rows else table
    if kept.num_rows:
        if "webdataset" in formats:
            rel = f"webdataset/{name}.tar"
            with writing(f"{root}/{rel}"):
                n = write_webdataset(kept, f"{root}/{rel}", caption_column=caption_column)
            outputs.append({"path": rel, "format": "webdataset", "num_samples": n})
        if "parquet" in formats:
            rel = f"parquet/{name}.parquet"
            with writing(f"{root}/{rel}"):
                n = write_parquet_shard(kept, f"{root}/{rel}")
            outputs.append({"path": rel, "format": "parquet", "num_samples": n})
    with writing(f"{root}/packed (shard {name})"):
        packed = write_packed(kept, root=root, shard=shard, options=packing) if packing and kept.num_rows else None
    ledger_rel = f"ledger/{name}.parquet"
    if table.num_rows:
        with writing(f"{root}/{ledger_rel}"):
            write_ledger(table, f"{root}/{ledger_rel}")
    dropped: dict[str, dict[str, int]] = {}
    if table.num_rows:
        for by, reason in zip(table[rows.DROPPED_BY].to_pylist(), table[rows.REASON].to_pylist(), strict=True):
            if by is not None:
                dropped.setdefault(by, {}).setdefault(reason or "unknown", 0)
                dropped[by][reason or "unknown"] += 1
    n_kept = kept.num_rows
    status_dict = {"success": n_kept} if n_kept else {}
    failed_dl = failed_resize = 0
    for by, reasons in dropped.items():
        for reason, n in reasons.items():
            status_dict[reason] = status_dict.get(reason, 0) + n
            if by == "download":
                if reason in FAILED_TO_RESIZE or reason.startswith(("image_", "decode", "resize")):
                    failed_resize += n
                else:
                    failed_dl += n
    now = time.time()
    i2d_stats = {  # img2dataset's _stats.json fields, so its users' scripts keep working
        "count": table.num_rows, "successes": n_kept, "failed_to_download": failed_dl,
        "failed_to_resize": failed_resize, "duration": now - started, "start_time": started, "end_time": now,
        "status_dict": status_dict,
    }
    with writing(f"{root}/shard_stats/{name}_stats.json"):  # not in ledger/: keep it pure Parquet
        write_json(f"{root}/shard_stats/{name}_stats.json", i2d_stats)
    done = {"shard": shard, "rows": table.num_rows, "kept": n_kept, "dropped": dropped, "seconds": seconds,
            "outputs": outputs, "ledger": ledger_rel if table.num_rows else None}
    if packing:  # sequences, tokens, capacity, efficiency and the packed files (curate/sinks/packed.py)
        done["packed"] = packed
    with writing(f"{root}/{DONE}/{name}.json"):
        write_json(f"{root}/{DONE}/{name}.json", done)
    return done


# ------------------------------------------------------------------ driver


def _init_ray(recipe: Recipe) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": os.environ.get("CURATE_RAY_LOGS") == "1"}
    if recipe.runtime.ray_address:
        import curate

        kwargs["address"] = recipe.runtime.ray_address
        kwargs["runtime_env"] = {"py_modules": [os.path.dirname(curate.__file__)]}
    else:
        kwargs["num_cpus"] = recipe.runtime.num_cpus
    local = not recipe.runtime.ray_address and not os.environ.get("RAY_ADDRESS")  # else ray.init joins a cluster
    if local:
        # Ray keeps only num_cpus idle worker processes and kills the rest after 1 s; our zero-CPU I/O
        # tasks (read, write parts, finalize: up to one of each per CPU) then boot fresh processes that
        # import curate again (about 1 s of CPU each, several times per run). Keep enough of them.
        cpus = recipe.runtime.num_cpus or os.cpu_count() or 1
        kwargs["_system_config"] = {"num_workers_soft_limit": int(math.ceil(cpus)) * 4}
    ray.init(**kwargs)
    global _started_local_ray
    _started_local_ray = local


#: True once this process has started its own local Ray (not joined a cluster): see :func:`fast_exit`.
_started_local_ray = False


def fast_exit(code: int) -> None:
    """End the ``curate`` process at once when it started its own local Ray; return otherwise.

    ``ray.shutdown()`` stops the local Ray gracefully, process by process: 1.5-2.5 s after every
    command, when all output is already committed (every file is written to a temporary name and
    renamed). The command line ends instead by SIGKILLing the processes this one started (raylet,
    GCS, agents, workers: its descendants, found in /proc) and ``os._exit``. Only on Linux and only
    for a Ray this process started; a joined cluster is left to ``ray.shutdown`` at exit.
    """
    if not _started_local_ray or not os.path.isdir("/proc/self"):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)


def _descendants(root: int) -> list[int]:
    """Process ids below ``root`` in the process tree, from /proc (children before their own children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # the command name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # we draw our own bar
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    ctx.log_internal_stack_trace_to_stdout = False
    # A worker's CurateError (a full disk, an unreadable input shard) must reach the driver as itself,
    # not as a UserCodeException whose cause is lost on the way: the user gets its one-line message.
    ctx.raise_original_map_exception = True


class Progress:
    """A rich progress bar on a terminal, quiet log lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None

    def start(self, description: str, total: int | None) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("rows"), TimeElapsedColumn(), transient=False)
        self._p.start()
        self._task = self._p.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def prepare_output(recipe: Recipe, layout: Layout, overwrite: bool) -> None:
    fp_path = layout.work("recipe.json")
    fs = layout.fs
    if layout.exists(layout.root):
        names = [n for n in layout.listdir_names(layout.root)]
        if names:
            if overwrite:
                for p in fs.ls(layout.root, detail=False):
                    fs.rm(p, recursive=True)
            elif not layout.exists(fp_path):
                raise OutputError(
                    f"output {layout.root} is not empty and holds no curate run; choose another -o or pass --overwrite"
                )
            else:
                old = layout.read_json(fp_path)
                if old.get("fingerprint") != recipe.fingerprint():
                    raise OutputError(
                        f"output {layout.root} holds a run of a different recipe (fingerprint "
                        f"{old.get('fingerprint')} vs {recipe.fingerprint()}); pass --overwrite to replace it, "
                        "or choose another -o"
                    )
    fs.makedirs(layout.work(), exist_ok=True)
    if not layout.exists(fp_path):
        layout.write_json(fp_path, {"fingerprint": recipe.fingerprint(), "recipe": recipe.resolved()})


def run(recipe: Recipe, *, overwrite: bool = False, progress: bool | None = None) -> Manifest:
    """Run a recipe to completion (resuming whatever an earlier run committed) and return its manifest."""
    started = time.time()
    if not recipe.write.output:
        raise CurateError("no output location: set write.output in the recipe or pass -o DIR")
    if progress is None:
        progress = sys.stderr.isatty()
    source = make_source(recipe.source)
    source.validate()
    for cfg in recipe.stages:  # fail before any work when a stage cannot run here (e.g. no checkpoint)
        stage_class(cfg.use)(cfg).check()
    check_global_columns(recipe, source)
    packing_options(recipe)  # `packed` output without a `pack` stage fails here, before any work
    phases = make_phases(recipe.stages)
    layout = Layout(recipe.write.output)
    prepare_output(recipe, layout, overwrite)

    plan_path = layout.work("plan.json")
    if layout.exists(plan_path):
        specs = layout.read_json(plan_path)["shards"]
    else:
        log.info("planning input shards")
        specs = source.plan(layout.work(), recipe.write.samples_per_shard)
        layout.write_json(plan_path, {"shards": specs})

    log.info("planned %d shards in %.1fs", len(specs), time.time() - started)
    _init_ray(recipe)
    _data_context()
    log.info("ray ready after %.1fs", time.time() - started)
    bar = Progress(bool(progress))
    global_info: dict[str, dict[str, Any]] = {}
    if layout.exists(layout.work(SOURCE_ERRORS)):  # last run's unreadable shards are read again now
        layout.fs.rm(layout.work(SOURCE_ERRORS), recursive=True)
    try:
        for phase in phases:
            failed = _run_phase(recipe, source, phases, phase, specs, layout, bar, started)
            if failed:  # later phases need every shard (global stages see the whole pool): stop here
                write_manifest(recipe, layout, specs, global_info, started)
                raise SourceError(
                    f"{len(failed)} input shard(s) could not be read: "
                    + "; ".join(f["error"] for f in failed)
                    + f". The other shards of phase {phase.index + 1} are committed; fix or replace the file(s) "
                    "and re-run the same command to resume, or set runtime.on_source_error: fail to stop at the first")
            if phase.globals_after:
                global_info.update(_run_globals(phase, specs, layout))
    except Exception as e:
        cause = user_error(e)  # a CurateError raised on a worker arrives wrapped in Ray's exceptions
        if cause is None or cause is e:
            raise
        raise cause from e
    manifest = write_manifest(recipe, layout, specs, global_info, started)
    if manifest.complete:
        _cleanup_work(layout, phases)
        from curate.stats import write_stats_after_run

        manifest = write_stats_after_run(layout.root, manifest)  # stats.json, report.html; never raises
    return manifest


def check_global_columns(recipe: Recipe, source: Source) -> None:
    """For URL lists, whose columns are all known up front: a global stage reading a column that
    neither the input nor an earlier stage provides fails now, not after every download."""
    from curate.sources.urllist import UrlListSource

    if not isinstance(source, UrlListSource):
        return  # sources with images carry metadata columns known only once read
    known = {rows.KEY, rows.URL, rows.CAPTION, rows.STATUS, rows.DROPPED_BY, rows.REASON}
    used = {recipe.source.url_col, recipe.source.caption_col, recipe.source.key_col}
    known |= {f"source_{c}" if c in rows.RESERVED else c for c in source._header(source.files[0]) if c not in used}
    for cfg in recipe.stages:
        stage = stage_class(cfg.use)(cfg)
        if isinstance(stage, GlobalStage):
            missing = [c for c in stage.input_columns() if c not in known]
            if missing:
                raise CurateError(
                    f"stage {stage_name(cfg)} reads column(s) {missing}, which neither the input nor an earlier "
                    f"stage provides; available then: {', '.join(sorted(known))}")
        known |= set(stage.output_columns)


def _pending(phase: Phase, specs: list[dict], layout: Layout) -> list[dict]:
    done = set(layout.listdir_names(layout.path(DONE)))
    if phase.final:
        return [s for s in specs if f"{s['shard']:05d}.json" not in done]
    committed = set(layout.listdir_names(layout.work(f"p{phase.index}")))
    todo = [s for s in specs if f"{s['shard']:05d}.json" not in committed]
    return todo if len(done) < len(specs) else []


def _run_phase(recipe: Recipe, source: Source, phases: list[Phase], phase: Phase, specs: list[dict],
               layout: Layout, bar: Progress, started: float) -> list[dict[str, Any]]:
    """Run one phase over its pending shards; return the source shards that could not be read."""
    import ray

    pending = _pending(phase, specs, layout)
    failed: list[dict[str, Any]] = []
    if not pending:
        return failed
    # A shard already committed in the final phase only needs finalizing (a crash hit between the two).
    committed = set(layout.listdir_names(layout.work(f"p{phase.index}")))
    finalize_only = [s for s in pending if f"{s['shard']:05d}.json" in committed]
    to_run = [s for s in pending if f"{s['shard']:05d}.json" not in committed]

    finalizer = ray.remote(num_cpus=0, max_retries=3)(finalize_shard)  # I/O: never wait behind actors
    # one per CPU at most (each may start a worker process), and never more than the memory cap
    max_finalize = min(MAX_FINALIZE_IN_FLIGHT, max(1, int(ray.cluster_resources().get("CPU", 1))))
    in_flight: list = []
    packing = packing_options(recipe)  # the same for every shard

    def finalize(shard: int, marker: dict) -> None:
        nonlocal in_flight
        in_flight.append(finalizer.remote(
            root=layout.root, shard=shard, parts=marker["parts"], formats=recipe.write.formats,
            caption_column=recipe.write.caption_column, seconds=marker["seconds"], started=started,
            packing=packing))
        while len(in_flight) >= max_finalize:
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            ray.get(ready)

    for s in finalize_only:
        finalize(s["shard"], layout.read_json(layout.marker(phase.index, s["shard"])))

    if to_run:
        if phase.index == 0:
            items = [json.dumps(s) for s in to_run]
            global_names: list[str] = []
        else:
            prev = phase.index - 1
            items = [json.dumps({"shard": s["shard"], "kind": "parts",
                                 "parts": layout.read_json(layout.marker(prev, s["shard"]))["parts"]})
                     for s in to_run]
            global_names = [stage_name(g) for g in phases[prev].globals_after]
        ds = _build_dataset(recipe, source, phase, items, layout, global_names)
        expected_rows = sum(s.get("rows", 0) for s in to_run) or None
        bar.start(f"phase {phase.index + 1}: {len(to_run)} shards", expected_rows)
        state: dict[int, dict[str, Any]] = {
            s["shard"]: {"rows": 0, "total": None, "parts": [], "seconds": {}} for s in to_run
        }
        committed_now: set[int] = set()

        def commit(shard: int) -> None:
            st = state[shard]
            marker = {"shard": shard, "rows": st["rows"], "parts": st["parts"], "seconds": st["seconds"]}
            if phase.index > 0:  # carry the seconds of earlier phases
                prev_marker = layout.read_json(layout.marker(phase.index - 1, shard))
                for k, v in prev_marker["seconds"].items():
                    marker["seconds"][k] = marker["seconds"].get(k, 0.0) + v
            layout.write_json(layout.marker(phase.index, shard), marker)
            committed_now.add(shard)
            if phase.final:
                finalize(shard, marker)

        t_start = time.perf_counter()
        first = True
        try:
            for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if first:
                    log.info("phase %d: first rows back after %.1fs", phase.index, time.perf_counter() - t_start)
                    first = False
                for r in out.to_pylist():
                    st = state[r["shard"]]
                    st["rows"] += r["rows"]
                    st["parts"].append(r["path"])
                    for k, v in json.loads(r["seconds"]).items():
                        st["seconds"][k] = st["seconds"].get(k, 0.0) + v
                    if r["total"] is not None:
                        st["total"] = r["total"]
                    bar.advance(r["rows"])
                    if st["total"] is not None:
                        if st["rows"] == st["total"]:
                            commit(r["shard"])
                        elif st["rows"] > st["total"]:
                            raise RuntimeError(f"shard {r['shard']}: {st['rows']} rows written, {st['total']} read")
        except BaseException:
            _settle(in_flight)
            raise
        finally:
            bar.stop()
        log.info("phase %d: all rows back after %.1fs", phase.index, time.perf_counter() - t_start)
        for shard, st in state.items():
            if shard in committed_now:
                continue
            if phase.index == 0 and layout.exists(layout.source_error(shard)):
                failed.append(layout.read_json(layout.source_error(shard)))
            elif st["rows"] == 0 and st["total"] is None:
                commit(shard)  # an empty input shard
            else:
                raise RuntimeError(f"shard {shard}: only {st['rows']} of {st['total']} rows came back")
    if in_flight:
        t0 = time.perf_counter()
        try:
            ray.get(in_flight)
        except BaseException:
            _settle(in_flight)
            raise
        log.info("phase %d: waited %.1fs for the last finalize tasks", phase.index, time.perf_counter() - t0)
    return failed


def _settle(refs: list) -> None:
    """Let finalize tasks still running end before the run raises: none keeps writing behind the user's
    back (or the re-run's), and their own errors (a full disk hits them all) are not logged as unhandled."""
    import ray

    for ref in refs:
        with contextlib.suppress(Exception):
            ray.get(ref)


def fit_resources(stages: list[StageConfig], cluster: dict[str, float]) -> list[tuple[StageConfig, Any]]:
    """Each stage's resources, adjusted so every stage of a phase can run at once on this cluster.

    A stage that asks for a GPU on a cluster without one runs on CPU. Actor pools hold
    their CPUs for the whole phase, so if the smallest pools (one actor each) plus one
    task of the largest task stage do not fit, the actors' CPU shares are scaled down
    (the CPU count is a scheduling token in Ray; the threads are the OS's) — otherwise
    a small machine would deadlock with every CPU held by idle actors.
    """
    have_gpu = cluster.get("GPU", 0) > 0
    cpus = cluster.get("CPU", 1.0)
    out = []
    for cfg in stages:
        res = cfg.resources
        if res.num_gpus and not have_gpu:
            log.warning("stage %s asks for %s GPU but the cluster has none: running it on CPU",
                        stage_name(cfg), res.num_gpus)
            res = res.model_copy(update={"num_gpus": 0.0})
        out.append((cfg, res))
    actors = [(i, res) for i, (cfg, res) in enumerate(out) if stage_class(cfg.use).stateful and not res.num_gpus]
    held = sum(res.num_cpus * (res.concurrency or 1) for _, res in actors)
    task_need = max([res.num_cpus for cfg, res in out if not stage_class(cfg.use).stateful] + [0.0])
    task_need = min(task_need, cpus / 2)
    if actors and held + task_need > cpus:
        factor = (cpus - task_need) / held
        for i, res in actors:
            out[i] = (out[i][0], res.model_copy(update={"num_cpus": round(res.num_cpus * factor, 3)}))
        log.info("scaled actor CPU shares by %.2f to fit %s CPUs", factor, cpus)
    for i, (cfg, res) in enumerate(out):
        if not stage_class(cfg.use).stateful and res.num_cpus > task_need and task_need > 0:
            out[i] = (cfg, res.model_copy(update={"num_cpus": task_need}))
    return out


def _free_actor_slots(cfg: StageConfig, res, fitted: list) -> int:
    """Actors of this stage that fit next to one actor of every other pool and one task."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    others = sum(r.num_cpus * (r.concurrency or 1) for c, r in fitted
                 if c is not cfg and stage_class(c.use).stateful and not r.num_gpus)
    tasks = max([r.num_cpus for c, r in fitted if not stage_class(c.use).stateful] + [0.0])
    return max(1, int((cpus - others - tasks) // max(res.num_cpus, 0.01)))


def _pool_size(res) -> tuple[int, int]:
    """Default actor pool for a model stage: autoscale from 1 up to what the cluster can hold."""
    import ray

    total = ray.cluster_resources()
    if res.num_gpus:
        cap = int(total.get("GPU", 0) // res.num_gpus)
    else:
        cap = int(total.get("CPU", 1) // max(res.num_cpus, 0.01))
    return (1, max(1, cap))


def _build_dataset(recipe: Recipe, source: Source, phase: Phase, items: list[str], layout: Layout,
                   global_names: list[str]):
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    # I/O tasks take no CPU share, so actor pools can never starve them, and run at most one per
    # CPU: with no cap Ray would boot a fresh worker process per task (about 1 s each).
    io_tasks = TaskPoolStrategy(size=max(1, int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items([{"spec": s} for s in items], override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_shards, batch_size=1, batch_format="pyarrow", num_cpus=0, compute=io_tasks,
        fn_kwargs={"source": source if phase.index == 0 else None,
                   "decisions_dir": layout.work(f"g{phase.index - 1}") if phase.index > 0 else None,
                   "global_names": global_names, "batch_rows": recipe.runtime.read_batch_rows,
                   "errors_dir": layout.work(SOURCE_ERRORS), "on_source_error": recipe.runtime.on_source_error},
    )
    fitted = fit_resources(phase.stages, ray.cluster_resources())
    parts_dir = layout.work(f"p{phase.index}", "parts")
    writes_own_parts = bool(fitted) and _writes_own_parts(*fitted[-1])
    for i, (cfg, res) in enumerate(fitted):
        cls = stage_class(cfg.use)
        batch_size = res.batch_size or recipe.runtime.batch_size
        last = parts_dir if writes_own_parts and i == len(fitted) - 1 else None
        if cls.stateful:
            lo, hi = (res.concurrency, res.concurrency) if res.concurrency else _pool_size(res)
            # I/O-bound stages (download) overlap batches on one actor so a slow tail doesn't idle it.
            in_flight = cls.batches_in_flight
            # Every actor the budget allows starts at once (the autoscaler would add the second only
            # after the first has loaded its model and a queue has built up behind it), and no actor
            # queues work beyond the calls it runs: a block is a whole shard here, and the actor ready
            # first would otherwise take four shards while the others still load the model.
            extra: dict[str, Any] = {"initial_size": max(lo, min(hi, _free_actor_slots(cfg, res, fitted))),
                                     "max_tasks_in_flight_per_actor": in_flight}
            if in_flight > 1:
                extra |= {"max_concurrent_calls_per_actor": in_flight, "enable_true_multi_threading": True}
            compute = ActorPoolStrategy(min_size=lo, max_size=hi, **extra)
            ds = ds.map_batches(_StageActor, fn_constructor_kwargs={"cfg": cfg, "parts_dir": last,
                                                       "work_dir": layout.work("vlm", stage_name(cfg))},
                                batch_size=batch_size, batch_format="pyarrow", compute=compute,
                                num_cpus=res.num_cpus, num_gpus=res.num_gpus or None)
        else:
            kwargs: dict[str, Any] = {}
            if res.concurrency:
                kwargs["compute"] = TaskPoolStrategy(size=res.concurrency)
            ds = ds.map_batches(_apply_stage, fn_kwargs={"cfg": cfg}, batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=res.num_cpus, **kwargs)
    if writes_own_parts:
        return ds
    return ds.map_batches(_write_parts, fn_kwargs={"parts_dir": parts_dir}, batch_size=None,
                          batch_format="pyarrow", num_cpus=0, compute=io_tasks)


def _run_globals(phase: Phase, specs: list[dict], layout: Layout) -> dict[str, dict[str, Any]]:
    """Run the global stages after ``phase`` over keys and small columns of every committed shard."""
    gdir = layout.work(f"g{phase.index}")
    names = [stage_name(g) for g in phase.globals_after]
    info_path = f"{gdir}/_info.json"
    if layout.exists(info_path):
        return layout.read_json(info_path)
    stages: list[GlobalStage] = [stage_class(g.use)(g) for g in phase.globals_after]  # type: ignore[misc]
    wanted = {rows.KEY, rows.STATUS, rows.DROPPED_BY, rows.REASON}
    for st in stages:
        wanted.update(st.input_columns())
    owners: list[int] = []
    paths: list[str] = []
    for s in specs:
        marker = layout.read_json(layout.marker(phase.index, s["shard"]))
        owners += [s["shard"]] * len(marker["parts"])
        paths += marker["parts"]
    tables = [t.append_column(rows.SHARD, pa.array([shard] * t.num_rows, pa.int64()))
              for shard, t in zip(owners, read_part_files(paths, wanted), strict=True)]
    table = rows.concat(tables)
    if table.num_rows and pc.count_distinct(table[rows.KEY]).as_py() != table.num_rows:
        counts = pc.value_counts(table[rows.KEY])
        repeated = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:5]
        raise CurateError(f"global stages need unique keys; repeated: {repeated}. Set source.key_col to a "
                          "unique column, or leave it unset so curate numbers the rows")
    info: dict[str, dict[str, Any]] = {}
    for st, name in zip(stages, names, strict=True):
        t0 = time.perf_counter()
        # only the columns this stage reads: a copy of every column of every row would double the driver's share
        cols = dict.fromkeys([rows.KEY, rows.SHARD, rows.STATUS, rows.DROPPED_BY, rows.REASON, *st.input_columns()])
        view = table.select([c for c in cols if c in table.column_names])
        live = view.filter(pc.equal(view[rows.STATUS], rows.KEPT)) if table.num_rows else view
        decisions, st_info = st.decide(live) if live.num_rows else (
            pa.table({rows.KEY: pa.array([], pa.string()), rows.REASON: pa.array([], pa.string())}), {})
        # Attach shard ids so each shard reads only its own decisions.
        # (a hash join in Arrow: a Python dict of every key would cost ~150 B a row on the driver)
        pos = pc.index_in(decisions[rows.KEY].cast(pa.string()),
                          value_set=live[rows.KEY].combine_chunks().cast(pa.string()))
        decisions = decisions.append_column(rows.SHARD, live[rows.SHARD].combine_chunks().take(pos).cast(pa.int64()))
        decisions = decisions.take(pc.sort_indices(decisions, sort_keys=[(rows.SHARD, "ascending")]))
        _write_table(f"{gdir}/{name}.parquet", decisions)
        if table.num_rows:  # later global stages see only what this one kept
            table = apply_decisions(table, decisions.drop([rows.SHARD]), name)
        st_info["seconds"] = time.perf_counter() - t0
        info[name] = st_info
    layout.write_json(info_path, info)
    # Arrow's allocator (jemalloc) keeps freed pages for reuse: without this the driver holds the
    # global phase's peak (~1 KB a row) through every later phase.
    table = live = view = decisions = tables = None  # type: ignore[assignment]
    pa.default_memory_pool().release_unused()
    return info


def _write_table(path: str, table: pa.Table) -> None:
    with atomic_open(path) as f:
        pq.write_table(table, f, row_group_size=8192)


def write_manifest(recipe: Recipe, layout: Layout, specs: list[dict], global_info: dict[str, dict[str, Any]],
                   started: float) -> Manifest:
    if not global_info:
        for i in range(len(make_phases(recipe.stages))):
            p = layout.work(f"g{i}", "_info.json")
            if layout.exists(p):
                global_info.update(layout.read_json(p))
    dones = []
    for s in specs:
        p = layout.done(s["shard"])
        if layout.exists(p):
            dones.append(layout.read_json(p))
    dones.sort(key=lambda d: d["shard"])
    total = sum(d["rows"] for d in dones)
    kept = sum(d["kept"] for d in dones)
    dropped: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for d in dones:
        for by, reasons in d["dropped"].items():
            for reason, n in reasons.items():
                dropped.setdefault(by, {}).setdefault(reason, 0)
                dropped[by][reason] += n
        for k, v in d["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
    counters: list[StageCounters] = []
    alive = total
    order = [("source", "source", "source")] + [(stage_name(c), c.use, stage_class(c.use).kind) for c in recipe.stages]
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
    shards = [ShardEntry(**o) for d in dones for o in d["outputs"]]
    manifest = Manifest(
        curate_version=__version__, recipe=recipe.resolved(), recipe_fingerprint=recipe.fingerprint(),
        complete=len(dones) == len(specs), shards=shards,
        ledger=[d["ledger"] for d in dones if d["ledger"]],
        counts=Counts(input=total, kept=kept, dropped=dropped), stages=counters,
        stats={}, packing=summarize_packing(dones), elapsed_seconds=round(time.time() - started, 3),
    )
    layout.write_json(layout.path("manifest.json"), manifest.model_dump(mode="json"))
    return manifest


def _cleanup_work(layout: Layout, phases: list[Phase]) -> None:
    """After a complete run, part files are no longer needed (the outputs hold everything)."""
    for ph in phases:
        parts = layout.work(f"p{ph.index}", "parts")
        if layout.exists(parts):
            layout.fs.rm(parts, recursive=True)
