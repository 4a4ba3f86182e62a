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


_LIST_RAY_PROCESSES = """
import json, sys
import psutil
from curate.engine.session import start_ray
start_ray(ray_address=None, num_cpus=1)
me = psutil.Process()
print(json.dumps([" ".join(p.cmdline()) for p in me.children(recursive=True)]))
"""


def _run_script(script: str, timeout: float, **env):
    """Run ``script`` in a fresh interpreter with its own Ray temp folder; its last stdout line, as JSON."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="crt", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "RAY_TMPDIR": ray_tmp, **env})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ray_processes(**env) -> str:
    return " ".join(_run_script(_LIST_RAY_PROCESSES, 120, **env))


def test_a_local_run_starts_ray_without_its_monitors_or_dashboard_head():
    """A run's own single-node Ray has no autoscaler monitor and no log monitor (2.5-4 s of CPU in a
    20,000-image download run, for a cluster that never scales and worker logs a run never shows)
    and no dashboard head (``ray.init`` waits 1.3-1.6 s for it, and with ``include_dashboard=False``
    it serves nothing); with CURATE_RAY_LOGS=1, which shows worker logs, all three run as usual."""
    lean = _ray_processes()
    assert "gcs_server" in lean and "raylet" in lean  # Ray itself is up
    assert "log_monitor.py" not in lean and "autoscaler/_private/monitor.py" not in lean
    assert "dashboard/dashboard.py" not in lean
    usual = _ray_processes(CURATE_RAY_LOGS="1")
    assert "log_monitor.py" in usual and "dashboard/dashboard.py" in usual


_RUN_A_DATASET = """
import json
import psutil
import pyarrow as pa
import ray
from curate.engine.session import start_ray
start_ray(ray_address=None, num_cpus=2)

class Double:
    def __call__(self, batch):
        return pa.table({"id": pa.compute.multiply(batch["id"], 2)})

ds = ray.data.range(1000, override_num_blocks=8)
ds = ds.map_batches(lambda b: b, batch_format="pyarrow", num_cpus=0,
                    compute=ray.data.TaskPoolStrategy(size=2))
ds = ds.map_batches(Double, batch_format="pyarrow", num_cpus=1,
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
ids = sorted(r["id"] for r in ds.take_all())
print(json.dumps({"ids_ok": ids == [2 * i for i in range(1000)],
                  "processes": [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]}))
"""

RAY_DATA_HELPERS = ("_StatsActor", "ActorLocationTracker", "AutoscalingCoordinator")


def _dataset_run(**env) -> tuple[bool, str]:
    got = _run_script(_RUN_A_DATASET, 180, **env)
    return got["ids_ok"], " ".join(got["processes"])


def test_a_local_run_answers_ray_datas_helper_actors_in_the_driver():
    """On a run's own single-node Ray, a dataset with a task pool and an actor pool (a download
    phase's shape) runs to the right rows without Ray Data's three helper actor processes (6.8 s of
    CPU in a 20,000-image download run); with CURATE_RAY_LOGS=1 Ray Data starts them as usual."""
    ok, lean = _dataset_run()
    assert ok
    assert "ray::MapWorker" in lean  # the actor pool ran in processes of its own
    assert not [h for h in RAY_DATA_HELPERS if h in lean], lean
    ok, stock = _dataset_run(CURATE_RAY_LOGS="1")
    assert ok
    assert all(h in stock for h in RAY_DATA_HELPERS), stock


_START_AND_REPORT_THE_NODE_POLL = """
import json
import curate.engine.session as session
calls = []
original = session.node_registered
def spy(gcs_address, node_id, limit_s):
    found = original(gcs_address, node_id, limit_s)
    calls.append({"node_id": node_id, "found": found})
    return found
session.node_registered = spy
session.start_ray(ray_address=None, num_cpus=1)
import ray
print(json.dumps({"calls": calls, "node_id": ray.get_runtime_context().get_node_id()}))
"""


def test_a_local_start_finds_its_raylet_in_the_node_table_before_rays_lookup():
    """``ray.init`` would miss the raylet on its first lookup and sleep a second in C++ before the
    next; a local run polls the GCS node table for it first (0.5 s off every start here)."""
    got = _run_script(_START_AND_REPORT_THE_NODE_POLL, 120)
    assert got["calls"] == [{"node_id": got["node_id"], "found": True}]


def test_polling_for_a_node_that_never_registers_gives_up_at_its_limit(ray_session):
    import ray

    from curate.engine.session import node_registered

    gcs = ray.get_runtime_context().gcs_address
    assert node_registered(gcs, ray.get_runtime_context().get_node_id(), 5.0)
    assert not node_registered(gcs, "ab" * 28, 0.3)
