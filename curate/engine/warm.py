"""Warm start: the driver runs the first work units of the first phase while Ray starts.

Starting a local Ray takes 3-8 s on a small machine (GCS, raylet, agents, Ray Data's
helper actors) and the first download actor another second or two to boot and import;
meanwhile the ``curate`` process only waits for Ray's processes. So when this process is
about to start its own Ray and the first phase is light (it starts with an I/O stage such
as ``download``, then only stages that load no model and want no GPU), a thread of the
driver takes work units in order and runs them exactly as a Ray worker would: the same
shard reader, the same stages, the same part writer. Once Ray is up it takes no new unit;
Ray Data runs the rest, and the unit the thread is on is reported when it is done.

The driver's part files are reported to the phase like any worker's (:data:`PART_REPORT`),
so shard commits, resume (a shard is committed only when all its rows are back) and the
ledger are unchanged. ``runtime.warm_start: false`` turns it off.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from typing import Any

import pyarrow as pa

from curate.engine.adapters import context_for, run_stage
from curate.engine.dataset import read_options
from curate.engine.layout import Layout
from curate.engine.parts import read_shards, write_parts
from curate.engine.plan import Phase, stage_name
from curate.engine.session import joins_cluster
from curate.recipe import Recipe
from curate.sources.base import Source
from curate.stages.base import Stage
from curate.stages.registry import stage_class

log = logging.getLogger(__name__)


def light(phase: Phase) -> bool:
    """Whether the driver may run ``phase`` itself: an I/O stage first, and no stage loads a model or
    wants a GPU (a model stage would load its weights in the driver for a few seconds' work)."""
    if not phase.stages:
        return False
    classes = [stage_class(c.use) for c in phase.stages]
    if classes[0].batches_in_flight <= 1:
        return False
    return all(not c.resources.num_gpus and (not cls.stateful or cls.batches_in_flight > 1)
               for c, cls in zip(phase.stages, classes, strict=True))


def wanted(recipe: Recipe, phase: Phase) -> bool:
    """A warm start helps only while this process starts a local Ray of its own."""
    if not recipe.runtime.warm_start or joins_cluster(recipe.runtime.ray_address):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    return light(phase)


class WarmStart:
    """A driver thread that runs work units of phase 0 from the front until :meth:`stop`.

    ``units`` are the phase's work units in the order Ray Data would get them (JSON specs);
    ``claimed`` is, after :meth:`stop`, the set the driver took: the phase runs the others on Ray.
    """

    def __init__(self, recipe: Recipe, source: Source, layout: Layout, phase: Phase,
                 units: list[dict[str, Any]]) -> None:
        self.recipe, self.source, self.layout = recipe, source, layout
        self.phase = phase
        self.units = [json.dumps(u) for u in units]
        self.claimed: set[str] = set()
        self.rows = 0
        self.error: BaseException | None = None
        self._next = 0
        self._first: str | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._reports: queue.SimpleQueue[pa.Table] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="curate-warm-start", daemon=True)

    def start(self) -> WarmStart:
        """Take the first unit now (so the driver runs at least one, however fast Ray starts) and go."""
        self._first = self._claim()
        if self._first is not None:
            self._thread.start()
        return self

    def stop(self) -> set[str]:
        """Take no new unit (the one under way finishes); the units taken so far."""
        with self._lock:
            self._stopped = True
            return set(self.claimed)

    def reports(self) -> list[pa.Table]:
        """The part reports written since the last call."""
        out = []
        while True:
            try:
                out.append(self._reports.get_nowait())
            except queue.Empty:
                return out

    def join(self) -> list[pa.Table]:
        """Wait for the unit under way; its reports (and any left). Re-raises what the thread raised."""
        if self._thread.ident is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        return self.reports()

    def _claim(self) -> str | None:
        with self._lock:
            if self._stopped or self._next >= len(self.units):
                return None
            spec = self.units[self._next]
            self._next += 1
            self.claimed.add(spec)
            return spec

    def _work(self) -> None:
        phase, layout, thumbnails = self.phase, self.layout, self.recipe.write.thumbnails
        stages: list[Stage] = []
        t0 = time.perf_counter()
        try:
            spec = self._first
            for cfg in phase.stages:
                stage = stage_class(cfg.use)(cfg)
                stage.setup(context_for(cfg, layout.stage_dir(stage_name(cfg))))
                stages.append(stage)
            parts_dir = layout.parts_dir(phase.index)
            read = read_options(self.recipe, self.source, phase, layout, global_names=[])
            while spec is not None:
                for batch in read_shards(pa.table({"spec": [spec]}), **read):
                    for stage in stages:
                        batch = run_stage(stage, batch, thumbnails)
                    self.rows += batch.num_rows
                    self._reports.put(write_parts(batch, parts_dir=parts_dir))
                spec = self._claim()
        except BaseException as e:  # noqa: BLE001 - handed to the phase, which raises it in the main thread
            self.error = e
        finally:
            for stage in stages:
                try:
                    stage.teardown()
                except Exception:  # the run goes on; the stage's resources die with the process
                    log.warning("warm start: teardown of %s failed", stage.stage_name, exc_info=True)
            log.info("warm start: the driver ran %d of %d work units (%d rows) in %.1fs", len(self.claimed),
                     len(self.units), self.rows, time.perf_counter() - t0)
