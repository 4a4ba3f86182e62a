"""Running a tool as a user would: its own process group, a time limit, and its tree measured.

:func:`run_tool` starts a command in its own session (so a stuck run is stopped whole:
SIGINT, then SIGKILL for the group), sends its output to a log file, and samples the
process tree with :class:`TreeMonitor` while it runs: CPU seconds and peak memory over the
command and every process it starts (for curate: Ray's GCS, raylet, its workers).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("benchmarks.harness")

REPO = Path(__file__).resolve().parents[2]
STOP_GRACE = 30.0  # seconds between SIGINT and SIGKILL for a tool past its limit
MIB = 2**20


class ToolFailed(Exception):
    """A tool exited non-zero or ran past its time limit."""


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without proxies (loopback must not go through one), quiet tools."""
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    env.update(
        {
            "NO_PROXY": "127.0.0.1,localhost,127.0.0.0/8",
            "no_proxy": "127.0.0.1,localhost,127.0.0.0/8",
            "WANDB_MODE": "disabled",
            "NO_ALBUMENTATIONS_UPDATE": "1",  # no network calls at start-up
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.update(extra or {})
    return env


def affinity(cores: Sequence[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child to ``cores`` (None: no pinning, or not on Linux)."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, set(cores))


def sigterm_as_interrupt() -> None:
    """Let SIGTERM (``timeout``, a scheduler) unwind like Ctrl-C, so ``finally`` blocks stop the
    server and :func:`run_tool` stops the running tool, which lives in its own session."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


# ------------------------------------------------------------------ measuring a process tree

#: smaps_rollup fields read per process (kB).
_ROLLUP_FIELDS = (b"Rss:", b"Pss:", b"Pss_Shmem:")


def _rollup(pid: int) -> dict[bytes, int] | None:
    """Rss, Pss and Pss_Shmem of a process in bytes (None if it has exited)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except OSError:
        return None
    out = {}
    for line in data.splitlines():
        for name in _ROLLUP_FIELDS:
            if line.startswith(name):
                out[name] = int(line.split()[1]) * 1024
    return out


def _plasma_bytes(pid: int) -> int:
    """Bytes allocated in Ray's object-store file, which the raylet keeps open.

    The file is unlinked from /dev/shm right after it is created, so it is reached through
    the raylet's file descriptor; its allocated blocks are the pages the store has touched.
    """
    total = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if "/plasma" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    total += os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
            except OSError:
                continue
    except OSError:
        pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of ``pid`` and its live descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def process_role(p: psutil.Process) -> str:
    """A process's role for CPU accounting: a Ray worker's title (``ray::MapWorker(...)`` cut at
    the first ``(``/space), a Ray daemon's name, or the script a Python process runs."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    first = cmd[0] if cmd else p.name()
    if first.startswith("ray::"):
        return first.split("(")[0].split(" ")[0].split(".")[0]
    base = os.path.basename(first)
    if base.startswith("python"):
        script = next((a for a in cmd[1:] if a.endswith(".py") or a == "-m"), None)
        if script == "-m" and len(cmd) > cmd.index("-m") + 1:
            return "python -m " + cmd[cmd.index("-m") + 1]
        return "python " + os.path.basename(script) if script else base
    return base


class TreeMonitor:
    """CPU time and peak memory of a process tree, sampled every ``interval`` s in a thread.

    CPU: each process's own user + system seconds at its last sample, summed over every
    process seen (so workers that exit still count); a process loses at most ``interval``
    of CPU after its last sample, and one that lives less than ``interval`` may be missed.

    Memory (``memory=True``; reading smaps costs CPU, so it is off unless asked for):

    - ``driver_peak``: RSS of the root process;
    - ``total_peak``: Σ (PSS − PSS of shared memory) over the tree + the larger of Σ PSS of
      shared memory and the bytes allocated in Ray's object-store file: a store page that no
      live process maps any more still counts, and a page mapped by several processes counts
      once;
    - ``rss_sum_peak``: Σ RSS (shared pages once per process): an upper bound.

    Without ``memory`` only ``rss_sum_peak`` is kept (cheap: psutil's RSS).
    """

    def __init__(self, pid: int, *, interval: float = 0.25, memory: bool = False) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.memory = memory
        self.driver_peak = 0
        self.total_peak = 0
        self.rss_sum_peak = 0
        self.plasma_peak = 0
        self.at_peak: dict[str, int] = {}  # memory by process name when the total peaked
        #: (t, driver RSS, total, object store) per sample, with ``memory``
        self.samples: list[tuple[float, int, int, int]] = []
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU s at last sample
        self._role: dict[tuple[int, float], str] = {}  # (pid, create time) -> process role
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        private = shmem = rss = driver = plasma = 0
        by_name: dict[str, int] = {}
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    k = (p.pid, p.create_time())
                    self._cpu[k] = t.user + t.system
                    if k not in self._role or self._role[k].startswith(("ray::IDLE", "python")):
                        self._role[k] = "driver" if p.pid == self.root.pid else process_role(p)
                    name = "driver" if p.pid == self.root.pid else p.name()
                    if not self.memory:
                        rss += p.memory_info().rss
                        continue
            except psutil.Error:
                continue
            m = _rollup(p.pid)
            if m is None:
                continue
            if name == "raylet":
                plasma += _plasma_bytes(p.pid)
            own = m.get(b"Pss:", 0) - m.get(b"Pss_Shmem:", 0)
            private += own
            shmem += m.get(b"Pss_Shmem:", 0)
            rss += m.get(b"Rss:", 0)
            if p.pid == self.root.pid:
                driver = m.get(b"Rss:", 0)
            by_name[name] = by_name.get(name, 0) + own
        self.rss_sum_peak = max(self.rss_sum_peak, rss)
        if not self.memory:
            return
        total = private + max(shmem, plasma)
        by_name["object store (shm)"] = max(shmem, plasma)
        self.driver_peak = max(self.driver_peak, driver)
        self.plasma_peak = max(self.plasma_peak, plasma)
        if total > self.total_peak:
            self.total_peak = total
            self.at_peak = by_name
        self.samples.append((round(time.perf_counter() - self._t0, 2), driver, total, plasma))

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per process role (driver, raylet, gcs_server, a Ray worker's title, …)."""
        out: dict[str, float] = {}
        for k, v in self._cpu.items():
            role = self._role.get(k, "?")
            out[role] = out.get(role, 0.0) + v
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "cpu_seconds": round(self.cpu_seconds, 2),
            "cpu_by_role": self.cpu_by_role(),
            "rss_sum_peak_mib": round(self.rss_sum_peak / MIB, 1),
        }
        if self.memory:
            out.update(
                driver_peak_mib=round(self.driver_peak / MIB, 1),
                total_peak_mib=round(self.total_peak / MIB, 1),
                object_store_peak_mib=round(self.plasma_peak / MIB, 1),
                at_peak_mib={
                    k: round(v / MIB, 1)
                    for k, v in sorted(self.at_peak.items(), key=lambda kv: -kv[1])
                },
                curve=self.samples,
            )
        return out


class PeakRSS(TreeMonitor):
    """Peak RSS (summed over the tree) of *this* process and its children above the level
    before, for a method run in-process (e.g. on a Ray this process started)::

        with PeakRSS() as mem:
            work()
        print(mem.mib, mem.cpu_seconds)

    The same sampler as :class:`TreeMonitor` (``rss_sum_peak``: shared pages such as the
    object store's may count once per process that maps them). With ``memory``, also
    ``total_mib``: the tree's physical memory (PSS, the object store counted once) above
    the level before.
    """

    def __init__(self, interval: float = 0.1, memory: bool = False) -> None:
        super().__init__(os.getpid(), interval=interval, memory=memory)
        self.sample()
        self.base = self.rss_sum_peak
        self.base_total = self.total_peak
        self.base_by_name = dict(self.at_peak)

    def growth_by_name(self) -> dict[str, float]:
        """MiB each process name (and the object store) held at the peak above what it held before."""
        names = set(self.at_peak) | set(self.base_by_name)
        out = {k: (self.at_peak.get(k, 0) - self.base_by_name.get(k, 0)) / MIB for k in names}
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
        self._cpu_base = dict(self._cpu)  # CPU from here on

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self._cpu_base.get(k, 0.0) for k, v in self._cpu.items())

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sample()

    @property
    def peak(self) -> int:
        return self.rss_sum_peak

    @property
    def mib(self) -> float:
        return (self.rss_sum_peak - self.base) / MIB

    @property
    def total_mib(self) -> float:
        return (self.total_peak - self.base_total) / MIB


# ------------------------------------------------------------------ running a tool


@dataclass
class ToolRun:
    """What :func:`run_tool` measured: wall clock of the whole command and its tree's resources."""

    seconds: float
    cpu_seconds: float
    rss_sum_peak_mib: float
    log_path: Path
    monitor: dict[str, object] = field(default_factory=dict)


def run_tool(
    cmd: Sequence[str],
    *,
    name: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cores: Sequence[int] | None = None,
    limit: float = 1800.0,
    interval: float = 0.5,
    memory: bool = False,
    cwd: Path = REPO,
) -> ToolRun:
    """Run ``cmd`` to completion, output to ``log_path``, its process tree sampled meanwhile.

    Past ``limit`` seconds it gets SIGINT (curate and img2dataset then stop their workers),
    then SIGKILL for its process group after ``STOP_GRACE`` more; :class:`ToolFailed` either
    way, and when it exits non-zero.
    """
    log.info("running: %s", " ".join("<script>" if "\n" in a else a for a in cmd))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else tool_env(),
            cwd=cwd,
            start_new_session=True,  # its own group, so a stuck run can be stopped whole
            preexec_fn=affinity(cores),
        )
        try:
            with TreeMonitor(proc.pid, interval=interval, memory=memory) as mon:
                try:
                    proc.wait(limit)
                except subprocess.TimeoutExpired:
                    _stop(proc)
                    raise ToolFailed(
                        f"{name} ran past its limit of {limit:.0f} s and was stopped; "
                        f"its output ({log_path}):\n{tail(log_path)}"
                    ) from None
                except BaseException:  # Ctrl-C reaches only our process group, not the tool's
                    _stop(proc)
                    raise
                seconds = time.perf_counter() - t0
        except psutil.NoSuchProcess:  # it exited before the monitor could attach
            proc.wait()
            seconds = time.perf_counter() - t0
            mon = None
    if proc.returncode != 0:
        raise ToolFailed(
            f"{name} failed with exit code {proc.returncode}; its output ({log_path}):\n"
            f"{tail(log_path)}"
        )
    summary = mon.summary() if mon else {}
    # Exact CPU of the tool and of every descendant it (and they) waited for: img2dataset's
    # whole tree. curate's Ray processes are killed, not waited for, so there the samples count.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary["cpu_seconds"] = round(max(reaped, float(summary.get("cpu_seconds", 0.0))), 2)  # type: ignore[arg-type]
    return ToolRun(
        seconds,
        float(summary.get("cpu_seconds", 0.0)),  # type: ignore[arg-type]
        float(summary.get("rss_sum_peak_mib", 0.0)),  # type: ignore[arg-type]
        log_path,
        summary,
    )


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (the tools then stop their workers), SIGKILL to the group after STOP_GRACE."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
