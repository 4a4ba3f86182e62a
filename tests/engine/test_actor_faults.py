"""A model actor SIGKILLed mid-stage: the pool restarts it, the batch it held is re-run, every input row
lands in the ledger once, and re-run rows get the same scores / captions as an uninterrupted run.

The actors are found by Ray's process title for an actor-pool worker of a stage,
``ray::MapWorker(MapBatches(StageActor))``, among the children of the test process (the
session's local Ray). Each kill happens once the run has stored its first part files, so
the pool is mid-run with work still queued.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes
from tests.vlm.chat_server import ChatServer

ACTOR_TITLE = "ray::MapWorker(MapBatches(StageActor))"


class _ActorKiller(threading.Thread):
    """SIGKILL the first stage actor of this process's Ray once ``ready()`` is true."""

    def __init__(self, ready) -> None:
        super().__init__(daemon=True)
        self.ready, self.killed, self.stop = ready, [], threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set() and not self.killed:
            if self.ready():
                for p in me.children(recursive=True):
                    try:
                        if " ".join(p.cmdline()).startswith(ACTOR_TITLE):
                            p.kill()
                            self.killed.append(p.pid)
                            break
                    except psutil.Error:
                        continue
            time.sleep(0.02)


def _parts_written(out: Path):
    return lambda: any((out / "_work").rglob("*.parquet")) if (out / "_work").exists() else False


def _ledger(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger").glob("*.parquet"))],
                            promote_options="permissive")


def _run_killed(make_recipe, recipe: dict, out: Path, ready=None):
    recipe = {**recipe, "write": {**recipe["write"], "output": str(out)}}
    killer = _ActorKiller(ready or _parts_written(out))
    killer.start()
    try:
        manifest = run(load_recipe(make_recipe(recipe, name="killed.yaml")))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no stage actor was seen running: nothing was tested"
    return manifest


def _images(n: int) -> list[bytes]:
    return [jpeg_bytes(size=(48, 48), color=((i * 37) % 256, (i * 11) % 256, (i * 5) % 256)) for i in range(n)]


def _compare(ref: pa.Table, got: pa.Table, n: int, column: str) -> None:
    keys = got["key"].to_pylist()
    assert len(keys) == n and len(set(keys)) == n, "a row was lost or doubled"
    assert sorted(keys) == sorted(ref["key"].to_pylist())
    want = dict(zip(ref["key"].to_pylist(), ref[column].to_pylist(), strict=True))
    have = dict(zip(keys, got[column].to_pylist(), strict=True))
    assert have == want
    assert dict(zip(keys, got["status"].to_pylist(), strict=True)) == \
        dict(zip(ref["key"].to_pylist(), ref["status"].to_pylist(), strict=True))


@pytest.mark.slow
def test_clip_score_actor_killed_mid_run_is_restarted(tmp_path, make_recipe, ray_session):
    """SIGKILL a clip_score actor mid-run: the pool restarts it, every row once, the same scores."""
    n = 480
    pq.write_table(pa.table({"id": [f"r{i:04d}" for i in range(n)], "caption": [f"a photo {i}" for i in range(n)],
                             "image": pa.array(_images(n), pa.binary())}), tmp_path / "src.parquet",
                   row_group_size=60)
    recipe = {"source": {"path": str(tmp_path / "src.parquet"), "key_col": "id"},
              "stages": [{"use": "clip_score", "model": "curate-demo-clip", "min_score": 0.0,
                          "resources": {"batch_size": 16}}],
              "write": {"output": str(tmp_path / "ref"), "samples_per_shard": 120},
              "runtime": {"num_cpus": 2}}
    run(load_recipe(make_recipe(recipe, name="ref.yaml")))
    manifest = _run_killed(make_recipe, recipe, tmp_path / "killed")
    assert manifest.complete and manifest.counts.input == n
    _compare(_ledger(tmp_path / "ref"), _ledger(tmp_path / "killed"), n, "clip_score")


@pytest.mark.slow
def test_recaption_actor_killed_mid_run_is_restarted(tmp_path, make_recipe, ray_session):
    """SIGKILL a recaption actor (OpenAI backend, loopback server) mid-run: every row once, same captions."""
    n = 240
    server = ChatServer().start()
    try:
        imgs = _images(n)
        pq.write_table(pa.table({"id": [f"r{i:04d}" for i in range(n)], "caption": [f"alt {i}" for i in range(n)],
                                 "image": pa.array(imgs, pa.binary())}), tmp_path / "src.parquet",
                       row_group_size=30)
        recipe = {"source": {"path": str(tmp_path / "src.parquet"), "key_col": "id"},
                  "stages": [{"use": "recaption", "model": "captioner-1", "base_url": server.base_url,
                              "mode": "recaption", "resources": {"batch_size": 8}}],
                  "write": {"output": str(tmp_path / "ref"), "samples_per_shard": 60},
                  "runtime": {"num_cpus": 2}}
        run(load_recipe(make_recipe(recipe, name="ref.yaml")))
        # Kill once the server has answered a sixth of the rows: the pool is busy and most work is
        # queued. (Waiting for a part file raced on 2 busy cores: the parts' writer could be
        # scheduled only once the actors had finished and left, so no actor was ever seen.)
        base = server.requests
        manifest = _run_killed(make_recipe, recipe, tmp_path / "killed",
                               ready=lambda: server.requests - base >= n // 6)
    finally:
        server.stop()
    assert manifest.complete and manifest.counts.input == n
    _compare(_ledger(tmp_path / "ref"), _ledger(tmp_path / "killed"), n, "recaption")
