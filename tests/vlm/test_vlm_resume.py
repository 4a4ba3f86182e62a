"""Resume at sample granularity: a run killed partway, re-run, asks the judge only what it had not answered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from curate.recipe import load_recipe
from curate.runner import run
from tests.vlm.chat_server import ChatServer, score
from tests.vlm.test_mlm_filter import _caption, _recipe, _source


def test_killed_run_resumes_asking_only_unanswered_samples(tmp_path, make_recipe, ray_session):
    """SIGKILL a CLI run partway; the re-run asks the server only for replies it had not kept."""
    n = 400
    server = ChatServer(lambda c, a: "slow", slow_seconds=0.05).start()
    try:
        src = _source(tmp_path / "src.parquet", n)
        out = tmp_path / "out"
        path = _recipe(make_recipe, src, out, server.base_url, concurrency_per_worker=4, timeout=10,
                       resources={"num_cpus": 1, "concurrency": 1, "batch_size": 100})
        # The killed driver joins the test's Ray (fast to start); Ray ends a dead driver's workers.
        address = ray_session.get_runtime_context().gcs_address
        proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "run", str(path), "--ray-address", address],
                                start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd())
        deadline = time.time() + 120
        while server.requests < 150 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # Ray's own processes notice the dead driver within a moment; wait until nothing arrives
        asked_first = -1
        while asked_first != server.requests:
            asked_first = server.requests
            time.sleep(2.0)
        assert 150 <= asked_first < n, "the first run should be cut off partway"
        kept_replies = _kept_replies(out)
        assert 0 < len(kept_replies) <= asked_first
        server.by_caption.clear()
        server.requests = 0
        server.slow_seconds = 0.0
        m = run(load_recipe(path))
    finally:
        server.stop()
    assert m.complete and m.counts.input == n
    # every reply kept before the kill is reused; each other sample is asked exactly once
    assert server.requests == n - len(kept_replies)
    assert not set(server.by_caption) & kept_replies and set(server.by_caption.values()) == {1}
    ledger = pq.read_table(out / "ledger").to_pylist()
    assert sorted(r["mlm_semantic_understanding"] for r in ledger) == sorted(score(_caption(i)) for i in range(n))


def _kept_replies(out: Path) -> set[str]:
    """Captions whose replies the resume store holds (keys are the source's ids, s0007 for sample 7)."""
    keys = set()
    for f in (out / "_work" / "stages" / "mlm_filter").rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            keys.add(json.loads(line)["k"])
    return {_caption(int(k[1:])) for k in keys}
