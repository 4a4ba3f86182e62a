"""Stage adapters: which stages read their own work units and write the phase's part files themselves."""

from __future__ import annotations

from curate.engine.adapters import reads_own_input, writes_own_parts
from curate.engine.resources import Fitted
from curate.stages import stage_class
from curate.stages.base import Resources


def test_only_io_bound_actor_stages_write_their_own_parts():
    def cfg(use: str):
        return stage_class(use).Config(use=use)

    cpu, gpu = Resources(num_cpus=1), Resources(num_cpus=1, num_gpus=1)
    assert writes_own_parts(Fitted(cfg("download"), cpu))  # four calls at once: a write overlaps the others
    assert not writes_own_parts(Fitted(cfg("clip_score"), cpu))  # one call at a time: it would wait on writes
    assert not writes_own_parts(Fitted(cfg("clip_score"), gpu))
    assert not writes_own_parts(Fitted(cfg("caption_length"), cpu))  # tasks: the zero-CPU writer op follows


def test_only_io_bound_actor_stages_read_their_own_work_units():
    def cfg(use: str):
        return stage_class(use).Config(use=use)

    cpu, gpu = Resources(num_cpus=1), Resources(num_cpus=1, num_gpus=1)
    assert reads_own_input(Fitted(cfg("download"), cpu))  # a unit of a URL list is read in milliseconds
    assert not reads_own_input(Fitted(cfg("clip_score"), cpu))  # one call at a time: a read would idle the model
    assert not reads_own_input(Fitted(cfg("clip_score"), gpu))
    assert not reads_own_input(Fitted(cfg("caption_length"), cpu))  # a task stage: the read op stays before it
