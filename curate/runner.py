"""Run a recipe: the one entry point of the engine (:mod:`curate.engine`).

>>> from curate.recipe import load_recipe                       # doctest: +SKIP
>>> manifest = run(load_recipe("pipelines/download.yaml", input_path="urls.parquet", output_path="out/"))
>>> manifest.counts.kept                                         # doctest: +SKIP

A row's way, file by file (the README's "Architecture" draws it): the source
plans input shards (``sources/``), ``engine/plan.py`` splits the recipe into
phases, ``engine/layout.py`` guards the output and finds what is left to do,
``engine/session.py`` starts Ray, and ``engine/phases.py`` runs each phase: the
Ray Data graph of ``engine/dataset.py`` reads shards (``engine/parts.py``),
maps batches through the stages (``engine/adapters.py``) and stores part files;
committed shards go through the sinks in ``engine/finalize.py``, which also
writes the manifest.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from curate.engine.events import OnProgress, ignore
from curate.engine.finalize import Timings, cleanup_work, write_manifest
from curate.engine.layout import Layout, prepare_output
from curate.engine.phases import RunState, begin_warm_start, end_warm_start, run_globals, run_phase
from curate.engine.plan import make_plan
from curate.engine.session import process_started, start_ray
from curate.errors import CurateError, RecipeError, SourceError
from curate.manifest import Manifest
from curate.recipe import Recipe
from curate.sinks.base import SinkContext
from curate.sinks.registry import make_sinks
from curate.sources.registry import make_source

log = logging.getLogger(__name__)


def run(recipe: Recipe, *, overwrite: bool = False, progress: bool | None = None,
        on_progress: OnProgress | None = None, debug: bool = False) -> Manifest:
    """Run a recipe to completion (resuming whatever an earlier run committed) and return its manifest.

    ``on_progress`` receives the engine's events (:mod:`curate.engine.events`); without it they
    are drawn on stderr by :mod:`curate.progress` (a bar on a terminal, a line every 15 s
    elsewhere) unless ``progress`` is False.
    """
    started = time.time()
    born = process_started()
    timings = Timings(process_start_to_run=started - born)
    if not recipe.write.output:
        raise RecipeError("no output location: set write.output in the recipe or pass -o DIR", key="write.output")
    source = make_source(recipe.source)
    source.validate()
    plan = make_plan(recipe, source)
    layout = Layout(recipe.write.output)
    prepare_output(layout, fingerprint=recipe.fingerprint(), resolved=recipe.resolved(), overwrite=overwrite)
    plan_path = layout.work("plan.json")
    if layout.exists(plan_path):
        specs = layout.read_json(plan_path)["shards"]
    else:
        specs = source.plan(layout.work(), recipe.write.samples_per_shard)
        layout.write_json(plan_path, {"shards": specs})
    log.info("planned %d shards in %.1fs", len(specs), time.time() - started)
    view = None
    if on_progress is None:
        from curate.progress import ProgressView

        view = ProgressView(tty=sys.stderr.isatty()) if progress is not False else None
    i2d = recipe.write.img2dataset
    sink_ctx = SinkContext(root=layout.root, caption_column=recipe.write.caption_column, started=started,
                           packing=plan.packing, samples_per_shard=recipe.write.samples_per_shard,
                           img2dataset=i2d.model_dump() if i2d is not None else None)
    sinks = make_sinks(list(recipe.write.formats), sink_ctx)
    state = RunState(recipe=recipe, source=source, plan=plan, specs=specs, layout=layout, sink_ctx=sink_ctx,
                     on_progress=on_progress or view or ignore, timings=timings, process_started=born)
    if layout.exists(layout.source_errors()):  # last run's unreadable shards are read again now
        layout.fs.rm(layout.source_errors(), recursive=True)
    begin_warm_start(state)  # the driver downloads while Ray starts (engine/warm.py)
    try:
        timings.ray_start = start_ray(ray_address=recipe.runtime.ray_address, num_cpus=recipe.runtime.num_cpus,
                                      debug=debug)
    except BaseException as e:
        end_warm_start(state, e)
        raise
    from curate.stats.report import preload

    def preload_when_busy() -> None:
        state.workers_busy.wait()
        preload()

    # the report's imports while the stages work, not after the last shard; not before Ray's workers
    # run either: the imports would take the driver's CPU from Ray Data's start-up and the actors' creation
    threading.Thread(target=preload_when_busy, name="curate-preload-report", daemon=True).start()

    def manifest() -> Manifest:
        timings.total = time.time() - born
        if timings.first_row is None:
            timings.first_row = timings.first_part
        return write_manifest(recipe, layout, plan.phases, specs, state.global_info, sinks,
                              elapsed=time.time() - started, timings=timings)

    for sink in sinks:
        sink.on_start()
    try:
        for phase in plan.phases:
            failed = run_phase(state, phase)
            if failed:  # later phases need every shard (global stages see the whole pool): stop here
                manifest()
                raise SourceError(
                    f"{len(failed)} input shard(s) could not be read: " + "; ".join(f["error"] for f in failed)
                    + f". The other shards of phase {phase.index + 1} are committed; fix or replace the file(s) "
                    "and re-run the same command to resume, or set runtime.on_source_error: fail to stop at the first")
            if phase.globals_after:
                run_globals(state, phase)
    except Exception as e:
        end_warm_start(state, e)
        for sink in sinks:
            sink.on_failed(e)
        cause = user_error(e)  # a CurateError raised on a worker arrives wrapped in Ray's exceptions
        if cause is None or cause is e:
            raise
        raise cause from e
    finally:
        state.workers_busy.set()
        if view is not None:
            view.close()
    result = manifest()
    if result.complete:
        cleanup_work(layout, plan.phases)
        from curate.stats import write_stats_after_run

        result = write_stats_after_run(layout.root, result)  # stats.json, report.html; never raises
    if state.rows_back_at is not None:
        timings.finalize = time.perf_counter() - state.rows_back_at
    timings.total = time.time() - born
    result.timings = timings.as_dict()
    layout.write_json(layout.path("manifest.json"), result.model_dump(mode="json"))
    return result


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
