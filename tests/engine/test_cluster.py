"""A recipe run across a real two-node Ray cluster on this machine gives the single-node run's output.

The cluster is ``ray start --head`` plus ``ray start --address=…`` (a second raylet with its own CPU,
its own temp dir and a ``node2`` resource): two Ray nodes as on two machines, sharing only the output
folder — which is what a cluster needs (shared or object storage). Its temp dirs are its own, so
neither the test session's Ray nor another engineer's ``ray.init()`` can find or join it, and it is
torn down by killing the process groups this test started (never ``ray stop``, which would stop
every Ray on the machine).

"Identical" means: the same files; every Parquet file (outputs and ledger) equal as an Arrow table;
every tar with the same members in the same order and the same bytes (only the tar mtimes differ,
they are the time of writing); the manifest's counts and shard list equal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_tar

RAY = str(Path(sys.executable).with_name("ray"))
NODE_CPUS = 1  # two nodes of one CPU each: work has to cross nodes to use both
OBJECT_STORE = 150 * 1024 * 1024  # bytes; small, the machine is shared
START_TIMEOUT = 90  # seconds for both nodes to register


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodeCluster:
    """``ray start --head`` + one worker node, each blocking in its own process group."""

    def __init__(self) -> None:
        # short paths: Ray's unix sockets live in the temp dir and must stay under 107 characters
        self.dirs = [tempfile.mkdtemp(prefix="crh"), tempfile.mkdtemp(prefix="crw")]
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env = {**env, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self) -> None:
        """Start both nodes; the worker's `ray start` waits for the head's GCS by itself."""
        common = ["--block", f"--num-cpus={NODE_CPUS}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE}",
                  "--disable-usage-stats"]
        self._spawn([RAY, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                     "--include-dashboard=false", f"--temp-dir={self.dirs[0]}", *common])
        self._spawn([RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                     f"--temp-dir={self.dirs[1]}", '--resources={"node2": 1}', *common])

    def wait_ready(self) -> None:
        self._wait_started(0)
        self._wait_started(1)

    def _spawn(self, cmd: list[str]) -> None:
        log = open(Path(self.dirs[0]) / f"start{len(self.procs)}.log", "wb")  # noqa: SIM115 - lives with the node
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait_started(self, i: int) -> None:
        """`ray start` prints "Ray runtime started" once its raylet has registered with the head."""
        deadline = time.time() + START_TIMEOUT
        log = Path(self.dirs[0]) / f"start{i}.log"
        while time.time() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"ray start exited with {self.procs[i].returncode}: {self.logs()}")
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"ray start did not finish in {START_TIMEOUT}s: {self.logs()}")

    def logs(self) -> str:
        return " | ".join(p.read_text(errors="replace")[-2000:] for p in Path(self.dirs[0]).glob("start*.log"))

    def worker_node_task_names(self) -> set[str]:
        """Names of the Ray tasks the worker node's processes ran (Ray writes them to its worker logs)."""
        names = set()
        for log in Path(self.dirs[1]).glob("session_*/logs/worker-*"):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(":task_name:"):
                    names.add(line.split(":", 2)[2])
        return names

    def stop(self) -> None:
        for p in reversed(self.procs):  # each group: `ray start`, its gcs/raylet and their workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for d in self.dirs:  # a process that left the group still names its node's temp dir
            for line in subprocess.run(["pgrep", "-f", d], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(line), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


@pytest.fixture
def cluster():
    c = TwoNodeCluster()
    try:
        c.start()  # the test waits for it after its single-node run: the two overlap
        yield c
    finally:
        c.stop()


def _world(src: Path, n_tars: int = 4, per_tar: int = 60) -> None:
    for t in range(n_tars):
        write_tar(src / f"{t:03d}.tar", [
            {"__key__": f"t{t}_{i:04d}", "jpg": jpeg_bytes(size=(48, 48), color=(i * 4, t * 50, (i * 13) % 256)),
             "txt": "a shared caption" if i % 10 == 0 else (f"a photo of object {t * 1000 + i}" if i % 7 else "x"),
             "json": {"url": f"http://h/{t}/{i}.jpg", "tag": t}}
            for i in range(per_tar)])


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _assert_identical(a: Path, b: Path) -> None:
    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.relative_to(root).parts[0] in ("webdataset", "parquet", "ledger"))

    assert files(a) == files(b) and files(a)
    for rel in files(a):
        if rel.endswith(".tar"):
            assert _tar_members(a / rel) == _tar_members(b / rel), rel
        else:
            assert pq.read_table(a / rel).equals(pq.read_table(b / rel)), rel
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    assert ma["complete"] and mb["complete"]
    assert ma["counts"] == mb["counts"] and ma["shards"] == mb["shards"] and ma["ledger"] == mb["ledger"]
    assert [(s["name"], s["rows_in"], s["kept"], s["dropped"]) for s in ma["stages"]] == \
           [(s["name"], s["rows_in"], s["kept"], s["dropped"]) for s in mb["stages"]]


def test_two_node_cluster_run_equals_single_node_run(tmp_path, make_recipe, cluster, ray_session):
    _world(tmp_path / "src")
    recipe = make_recipe({
        "source": {"path": str(tmp_path / "src")},
        "stages": [{"use": "caption_length", "min_words": 2}, {"use": "image_hash"},
                   {"use": "dedup_exact", "by": ["caption"]}, {"use": "image_rules", "min_side": 8}],
        "write": {"output": str(tmp_path / "single"), "samples_per_shard": 100},
        "runtime": {"batch_size": 20},
    })
    run(load_recipe(recipe))  # single node: the session's local Ray
    cluster.wait_ready()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(recipe), "-o", str(tmp_path / "multi"),
                        "--ray-address", cluster.address, "--no-progress"],
                       env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 shards" in p.stdout or "rows in" in p.stdout, p.stdout  # the CLI's summary table
    ran_there = cluster.worker_node_task_names()
    assert ran_there, "the worker node ran no task: this was not a two-node run"
    _assert_identical(tmp_path / "single", tmp_path / "multi")
