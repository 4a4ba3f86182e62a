"""The Ray Data graph of one per-sample phase.

::

    from_items(shard specs) ─► read_shards (I/O task) ─► stage … stage ─► write_parts (I/O task)
                             └─ or the first actor reads them             └─ or the last actor writes them

Work items are units of shards (:func:`curate.engine.phases.work_units`): Ray Data
gathers a task's output into blocks of up to 128 MiB, so a task per shard of URL
rows would make the whole shard one block for one actor while the others idle.
Each read task streams its unit's rows in batches of ``runtime.read_batch_rows``, each stage maps batches of its ``batch_size``, and
the last op reports the part files it stored (:data:`curate.engine.parts.PART_REPORT`).
A first phase whose first stage is an I/O-bound actor (``download``) has no read op: the
actor reads its units itself (:func:`curate.engine.adapters.reads_own_input`).
"""

from __future__ import annotations

import json
from typing import Any

from curate.engine.adapters import StageActor, apply_stage, reads_own_input, writes_own_parts
from curate.engine.layout import Layout
from curate.engine.parts import read_shards, write_parts
from curate.engine.plan import Phase, stage_name
from curate.engine.resources import fit_resources, pool_bounds
from curate.engine.session import cluster_cpus
from curate.recipe import Recipe
from curate.sources.base import Source


def read_options(recipe: Recipe, source: Source, phase: Phase, layout: Layout, global_names: list[str]
                 ) -> dict[str, Any]:
    """:func:`~curate.engine.parts.read_shards`' arguments for ``phase`` (a Ray read task's, or the
    warm start's in the driver)."""
    return {"source": source if phase.index == 0 else None,
            "decisions_dir": layout.decisions_dir(phase.index - 1) if phase.index > 0 else None,
            "global_names": global_names, "batch_rows": recipe.runtime.read_batch_rows,
            "errors_dir": layout.source_errors(), "on_source_error": recipe.runtime.on_source_error,
            "thumbnails": recipe.write.thumbnails}


def build_dataset(recipe: Recipe, source: Source, phase: Phase, units: list[dict[str, Any]], layout: Layout,
                  global_names: list[str]):
    """The streaming dataset that runs ``phase`` over ``units`` and yields part reports."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    cluster = ray.cluster_resources()
    # I/O tasks take no CPU share, so actor pools can never starve them, and run at most one per
    # CPU: with no cap Ray would boot a fresh worker process per task (about 1 s each).
    io_tasks = TaskPoolStrategy(size=cluster_cpus())
    items = [json.dumps(u) for u in units]
    ds = ray.data.from_items([{"spec": s} for s in items], override_num_blocks=len(items))
    read = read_options(recipe, source, phase, layout, global_names)
    fitted = fit_resources(phase.stages, cluster)
    own_read = phase.index == 0 and bool(fitted) and reads_own_input(fitted[0])
    if not own_read:
        ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", num_cpus=0, compute=io_tasks,
                            fn_kwargs=read)
    parts_dir = layout.parts_dir(phase.index)
    own_parts = bool(fitted) and writes_own_parts(fitted[-1])
    for i, f in enumerate(fitted):
        batch_size = f.res.batch_size or recipe.runtime.batch_size
        if own_read and i == 0:
            batch_size = 1  # a work unit per call: the actor reads it, a reader's batch at a time
        work_dir = layout.stage_dir(stage_name(f.cfg))
        if f.is_actor:
            lo, hi, initial = pool_bounds(f, fitted, cluster)
            in_flight = f.stage_class().batches_in_flight
            # No actor queues work beyond the calls it runs: a block can be a whole shard, and the
            # actor ready first would otherwise take four while the others still load the model.
            extra: dict[str, Any] = {"initial_size": initial, "max_tasks_in_flight_per_actor": in_flight}
            if in_flight > 1:  # I/O-bound stages (download) overlap batches so a slow tail doesn't idle it
                extra |= {"max_concurrent_calls_per_actor": in_flight, "enable_true_multi_threading": True}
            last = parts_dir if own_parts and i == len(fitted) - 1 else None
            ds = ds.map_batches(StageActor, fn_constructor_kwargs={"cfg": f.cfg, "parts_dir": last,
                                                                   "work_dir": work_dir,
                                                                   "thumbnails": recipe.write.thumbnails,
                                                                   "read": read if own_read and i == 0 else None},
                                batch_size=batch_size, batch_format="pyarrow",
                                compute=ActorPoolStrategy(min_size=lo, max_size=hi, **extra),
                                num_cpus=f.res.num_cpus, num_gpus=f.res.num_gpus or None)
        else:
            kwargs: dict[str, Any] = {}
            if f.res.concurrency:
                kwargs["compute"] = TaskPoolStrategy(size=f.res.concurrency)
            ds = ds.map_batches(apply_stage, fn_kwargs={"cfg": f.cfg, "work_dir": work_dir,
                                                        "thumbnails": recipe.write.thumbnails}, batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=f.res.num_cpus, **kwargs)
    if own_parts:
        return ds
    return ds.map_batches(write_parts, fn_kwargs={"parts_dir": parts_dir}, batch_size=None,
                          batch_format="pyarrow", num_cpus=0, compute=io_tasks)
