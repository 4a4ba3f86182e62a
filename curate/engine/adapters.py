"""Stages as Ray workers: a task function for stateless stages, an actor class for stateful ones.

A stateless stage (rules) runs as Ray tasks; its object is built and ``setup`` once
per worker process and cached there. A stateful stage (a model, the downloader's
session) runs in an actor pool: ``setup(ctx)`` in the actor's constructor,
``teardown()`` when Ray Data ends the pool (its ``__ray_shutdown__`` drops the UDF,
which runs ``__del__`` here). An I/O-bound last stage writes the phase's part files
itself (:func:`writes_own_parts`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from curate.engine.parts import read_shards, write_parts
from curate.engine.resources import Fitted
from curate.engine.samples import sample_drops
from curate.stages.base import Stage, StageConfig, StageContext
from curate.stages.registry import stage_class

log = logging.getLogger(__name__)

_TASK_STAGES: dict[str, Stage] = {}


def _teardown_task_stages() -> None:
    for stage in _TASK_STAGES.values():
        with contextlib.suppress(Exception):
            stage.teardown()
    _TASK_STAGES.clear()


atexit.register(_teardown_task_stages)  # a task worker process that exits normally releases its stages


def context_for(cfg: StageConfig, work_dir: str | None) -> StageContext:
    return StageContext(work_dir=work_dir, num_cpus=cfg.resources.num_cpus, num_gpus=cfg.resources.num_gpus)


def apply_stage(batch: pa.Table, cfg: StageConfig, work_dir: str | None = None, thumbnails: bool = False) -> pa.Table:
    """Ray task body of a stateless stage: the worker process keeps one set-up stage per config.

    With ``thumbnails`` the rows it drops are sampled while the input batch still holds their images."""
    ident = f"{cfg.use}:{cfg.model_dump_json()}"
    stage = _TASK_STAGES.get(ident)
    if stage is None:
        stage = stage_class(cfg.use)(cfg)
        stage.setup(context_for(cfg, work_dir))
        _TASK_STAGES[ident] = stage
    return run_stage(stage, batch, thumbnails)


def run_stage(stage: Stage, batch: pa.Table, thumbnails: bool) -> pa.Table:
    out = stage(batch)
    return sample_drops(batch, out, stage.stage_name, list(stage.output_columns)) if thumbnails else out


class StageActor:
    """Actor-pool wrapper for stateful stages: ``setup(ctx)`` once per actor, ``teardown()`` at its end.

    With ``parts_dir`` (see :func:`writes_own_parts`) the actor also stores its output as part
    files and returns only their report: the rows' image bytes go from the stage to disk without
    another copy through Ray's object store to a writer process. With ``read`` (see
    :func:`reads_own_input`) its input is work units (``spec`` rows), which it reads itself with
    :func:`~curate.engine.parts.read_shards` and these options.
    """

    def __init__(self, cfg: StageConfig, parts_dir: str | None = None, work_dir: str | None = None,
                 thumbnails: bool = False, read: dict[str, Any] | None = None) -> None:
        self.stage = stage_class(cfg.use)(cfg)
        self.stage.setup(context_for(cfg, work_dir))
        self.parts_dir = parts_dir
        self.thumbnails = thumbnails
        self.read = read

    def __call__(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
        return self._one(batch) if self.read is None else self._read_and_run(batch, self.read)

    def _read_and_run(self, units: pa.Table, read: dict[str, Any]) -> Iterator[pa.Table]:
        """A batch of work units: each of their batches through the stage (none for a unit that
        could not be read: :func:`~curate.engine.parts.read_shards` records why)."""
        for batch in read_shards(units, **read):
            yield self._one(batch)

    def _one(self, batch: pa.Table) -> pa.Table:
        out = run_stage(self.stage, batch, self.thumbnails)
        return out if self.parts_dir is None else write_parts(out, parts_dir=self.parts_dir)

    def __del__(self) -> None:
        stage = getattr(self, "stage", None)
        if stage is not None:
            try:
                stage.teardown()
            except Exception:  # an actor on its way out: log, never raise from __del__
                log.warning("stage %s: teardown failed", stage.stage_name, exc_info=True)


def writes_own_parts(f: Fitted) -> bool:
    """Whether the phase's last stage stores its output as part files itself.

    Worth it for I/O-bound actor stages that run several calls at once (``download``): a call's
    write overlaps the others' work, and every image skips a copy through Ray's object store into
    a writer process (20,000 downloads: 66 s of CPU instead of 71-76 s). A model actor runs one
    call at a time, so its GPU or CPU would wait for each write (on object storage, a round trip
    per part): those keep the zero-CPU writer op after them, as stateless stages do.
    """
    return bool(f.is_actor and f.stage_class().batches_in_flight > 1 and not f.res.num_gpus)


def reads_own_input(f: Fitted) -> bool:
    """Whether a first phase's first stage reads its work units itself, with no read task before it.

    Worth it for the same I/O-bound actors (``download``): a unit of a URL list is read in a few
    milliseconds, yet a Ray Data read op keeps task worker processes of its own (each imports Ray,
    Ray Data and curate) and sends every unit's rows through the object store. With the shards
    finalized in the driver on a local Ray (:class:`curate.engine.phases.Finalizer`), a download run
    then starts no task worker at all. A model actor runs one call at a time: a read inside it would
    idle its CPU or GPU, so those keep the read task.
    """
    return writes_own_parts(f)
