"""Ray Data as the engine configures it (curate.engine.session.configure_ray_data), seen from its workers."""

from __future__ import annotations

import threading
import time

import pyarrow as pa


def _pollers_seen() -> tuple[int, int]:
    """How many Ray Data USS pollers a map task and a map actor see in their process (defined here,
    not at module level, so cloudpickle ships them by value to workers that cannot import tests)."""
    import ray

    def pollers(batch: pa.Table) -> pa.Table:
        time.sleep(0.2)  # the poller starts with the task: give it time to be seen
        names = [t.name for t in threading.enumerate() if "poll_uss" in t.name]
        return pa.table({"pollers": [len(names)] * batch.num_rows})

    class PollersActor:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return pollers(batch)

    ds = ray.data.range(4, override_num_blocks=2)
    tasks = ds.map_batches(pollers, batch_format="pyarrow", num_cpus=0)
    actors = ds.map_batches(PollersActor, batch_format="pyarrow", num_cpus=0,
                            compute=ray.data.ActorPoolStrategy(size=1))
    return (sum(r["pollers"] for r in tasks.take_all()), sum(r["pollers"] for r in actors.take_all()))


def test_map_workers_do_not_poll_their_memory(ray_session):
    """Ray Data polls each running map task's USS once a second by default (psutil reading the whole
    /proc/PID/smaps: 9-32 ms of CPU a poll in a download or CLIP worker), for a metric curate never
    shows. The engine turns it off for its tasks and actors alike."""
    from ray.data import DataContext

    from curate.engine.session import configure_ray_data

    ctx = DataContext.get_current()
    before = ctx.memory_usage_poll_interval_s
    try:
        ctx.memory_usage_poll_interval_s = 1.0  # Ray Data's default: the pollers are there to be seen
        on_task, on_actor = _pollers_seen()
        assert on_task > 0 and on_actor > 0
        configure_ray_data()
        assert _pollers_seen() == (0, 0)
    finally:
        ctx.memory_usage_poll_interval_s = before
