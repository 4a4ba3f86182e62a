"""Stage adapters: which stages write the phase's part files themselves."""

from __future__ import annotations

from curate.engine.adapters import writes_own_parts
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
