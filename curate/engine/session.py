"""Ray for one run: start an embedded Ray or join a cluster, quiet its logs, end it fast.

``curate run`` starts a local Ray on this machine unless ``--ray-address`` (or
``RAY_ADDRESS``) names a cluster to join; the recipe is the same either way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

#: Idle worker processes Ray keeps per CPU (its default keeps one): our zero-CPU I/O tasks (read,
#: write parts, finalize: up to one of each per CPU) would otherwise boot fresh processes that
#: import curate again, about 1 s of CPU each, several times per run.
IDLE_WORKERS_PER_CPU = 4

#: True once this process has started its own local Ray (not joined a cluster): see :func:`fast_exit`.
_started_local_ray = False


def process_started() -> float:
    """When this process started (epoch seconds): the clock a user's ``curate run`` starts on.

    From /proc where there is one (the interpreter's start-up and imports count too), else now.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def joins_cluster(ray_address: str | None) -> bool:
    """Whether :func:`start_ray` joins a cluster (``--ray-address`` or ``RAY_ADDRESS``) rather than
    starting a local Ray of this process's own."""
    return bool(ray_address or os.environ.get("RAY_ADDRESS"))


def start_ray(*, ray_address: str | None, num_cpus: float | None, debug: bool = False) -> float:
    """Start (or join) Ray unless this process already has it; returns the seconds it took."""
    import ray

    if ray.is_initialized():
        configure_ray_data(debug=debug)
        return 0.0
    t0 = time.perf_counter()
    if not debug:
        quiet_ray()
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.INFO if debug else logging.ERROR,
                              "log_to_driver": debug or os.environ.get("CURATE_RAY_LOGS") == "1"}
    if ray_address:
        import curate

        kwargs["address"] = ray_address
        kwargs["runtime_env"] = {"py_modules": [os.path.dirname(curate.__file__)]}
    else:
        kwargs["num_cpus"] = num_cpus
    local = not joins_cluster(ray_address)
    if local:  # a cluster refuses _system_config from a joining driver
        cpus = num_cpus or os.cpu_count() or 1
        kwargs["_system_config"] = {"num_workers_soft_limit": int(math.ceil(cpus)) * IDLE_WORKERS_PER_CPU}
    lean = local and not kwargs["log_to_driver"]  # log_to_driver: --debug or CURATE_RAY_LOGS=1
    with contextlib.ExitStack() as stack:
        if lean:
            stack.enter_context(_lean_local_node())
        if not debug:
            stack.enter_context(_ray_lines_dropped())
        ray.init(**kwargs)
    global _started_local_ray
    _started_local_ray = local
    configure_ray_data(debug=debug)
    if lean:
        from curate.engine.ray_helpers import answer_in_driver

        answer_in_driver()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _lean_local_node() -> Iterator[None]:
    """While this process starts its own single-node Ray: without the autoscaler monitor (there is
    no cluster to scale), the log monitor (it tails every worker's log files for the driver, and
    a normal run shows no worker log lines) and the dashboard's head process. ``ray.init`` has no
    argument for any of them (``ray start --no-monitor`` has one for the first), so the node's
    parameters are set as it is built and its API-server start is skipped.

    Measured: Ray's processes, idle for their first 25 s, used 7.4 s of CPU instead of 10.1 s
    without the two monitors (2.1 s of it theirs); in a 20,000-image download run the two had used
    2.5-4.0 s. The head process, with ``include_dashboard=False``, loads only Ray's usage-stats
    module (no state or job API: Ray's own TODO in ``services.start_api_server``), yet
    ``ray.init`` waits for it to publish its URL before it starts the raylet: 4.3-4.9 s to start
    Ray with it (median 4.7), 2.1-4.3 s without (median 3.3; ``ray.init(num_cpus=2)`` here, idle
    machine, four runs each), and 1.6 s of CPU in a 20,000-image run. Ray treats a head that failed
    to start as a warning, not an error, and runs on without it. With ``--debug`` or
    ``CURATE_RAY_LOGS=1`` all three run as usual. ``ray.init``'s wait for the new raylet polls the
    GCS rather than sleeping a second per miss (:func:`_polled`)."""
    try:
        from ray._private import node, services
    except ImportError:  # another Ray layout: start it as it is
        yield
        return
    original = node.Node.__init__
    original_api_server = getattr(node.Node, "start_api_server", None)

    def init(self, ray_params, *args, **kwargs):
        if kwargs.get("head") or (args and args[0] is True):
            if hasattr(ray_params, "no_monitor"):
                ray_params.no_monitor = True
            if hasattr(ray_params, "include_log_monitor"):
                ray_params.include_log_monitor = False
        return original(self, ray_params, *args, **kwargs)

    def api_server(self, *args, **kwargs):
        if kwargs.get("include_dashboard") is False:
            return None  # the head process would serve nothing this run uses
        return original_api_server(self, *args, **kwargs)

    node.Node.__init__ = init
    if original_api_server is not None:
        node.Node.start_api_server = api_server
    original_get_node = getattr(services, "get_node", None)
    if original_get_node is not None:
        services.get_node = _polled(original_get_node)
    try:
        yield
    finally:
        node.Node.__init__ = original
        if original_api_server is not None:
            node.Node.start_api_server = original_api_server
        if original_get_node is not None:
            services.get_node = original_get_node


#: How often :func:`_polled` looks for the new raylet in the GCS's node table, and for how long at
#: most: Ray's own wait for it (``Node.__init__``: 30 s), so a raylet that never comes fails as late as before.
NODE_POLL_S = 0.02
NODE_POLL_LIMIT_S = 30.0


def _polled(get_node):
    """Ray's ``services.get_node``, called once the node is in the GCS's node table.

    ``ray.init`` asks for its new raylet's node 0.1 s after starting it, and Ray's C++ lookup, on
    a miss, sleeps a whole second before it asks again: the raylet registers 0.5-0.8 s after its
    start here, so every local start waited for the second try (and under load, for a third).
    Polling the node table (the same GCS) every 20 ms first (:func:`node_registered`):
    ``ray.init(num_cpus=2)`` on an idle 2-core machine 1.65-1.69 s → 1.14-1.19 s (alternating
    runs). A node that never shows is a miss, as Ray's lookup reports one (``ray.init`` then fails
    with its own timeout); if Ray's internals here are not what the poll expects, Ray's lookup runs
    as it would have."""

    def polled(gcs_address, node_id):
        try:
            found = node_registered(gcs_address, node_id, NODE_POLL_LIMIT_S)
        except Exception:  # noqa: BLE001 - another Ray's internals: its own lookup decides
            log.debug("polling the GCS node table failed", exc_info=True)
            return get_node(gcs_address, node_id)
        if not found:
            raise RuntimeError(f"node {node_id} not in the GCS node table after {NODE_POLL_LIMIT_S:.0f}s")
        return get_node(gcs_address, node_id)

    return polled


def node_registered(gcs_address: str, node_id: str, limit_s: float) -> bool:
    """Whether node ``node_id`` (hex) shows in the GCS's node table within ``limit_s`` seconds."""
    from ray._private import services
    from ray._private.state import GlobalState

    state = GlobalState()
    state._initialize_global_state(services._get_gcs_client_options(gcs_address))
    deadline = time.monotonic() + limit_s
    while True:
        if any(n.get("NodeID") == node_id for n in state.node_table()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(NODE_POLL_S)


#: Ray's C++ log level unless the user set one: its warnings (e.g. "actor constructor arguments in
#: the object store", which every Ray Data actor pool has) are not the user's to act on.
QUIET_BACKEND_LOG_LEVEL = "fatal"


def quiet_ray() -> None:
    """A normal run prints no Ray log lines (``--debug`` shows them): Ray's Python loggers at ERROR,
    its C++ core at fatal, Ray Data's advice about its own operators (UserWarning) ignored."""
    import warnings

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", QUIET_BACKEND_LOG_LEVEL)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.")


#: A line of Ray's C++ log: "[2026-12-01 08:50:05,390 I 16003 16003] logging.cc:303: ...".
_RAY_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] ")


@contextlib.contextmanager
def _ray_lines_dropped() -> Iterator[None]:
    """While Ray starts, its core writes to this process's stderr (fd 2) before it reads its log
    level; keep those lines out of the user's terminal and pass everything else through."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().splitlines(keepends=True):
                if not _RAY_LOG_LINE.match(line):
                    os.write(2, line)


def configure_ray_data(*, debug: bool = False) -> None:
    """Ray Data as curate uses it: no progress bars or stats of its own, original exceptions."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if not debug and not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # the CLI draws its own progress
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    ctx.log_internal_stack_trace_to_stdout = False
    # A worker's CurateError (a full disk, an unreadable input shard) must reach the driver as itself,
    # not as a UserCodeException whose cause is lost on the way: the user gets its one-line message.
    ctx.raise_original_map_exception = True
    # Ray Data polls every running map task's USS once a second, for a metric and a memory warning
    # curate shows neither of: psutil reads the whole /proc/PID/smaps each time, 9 ms of CPU in a
    # download worker (4 calls in flight: 4 polls a second) and 32 ms in a torch/open_clip one.
    ctx.memory_usage_poll_interval_s = None


def cluster_cpus() -> int:
    """Whole CPUs of the Ray this process is connected to (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


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
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)


def descendants(root: int) -> list[int]:
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
