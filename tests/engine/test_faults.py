"""Faults on a real local Ray: a worker killed mid-stage, a corrupt input shard, a full disk, a killed driver.

Each test compares against an uninterrupted run of the same recipe: the same kept keys, every input
key exactly once in the ledger, no sample written twice, nothing half-written under a final name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.errors import NoSpaceError, SourceError
from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_tar

STAGE_TASK = "ray::MapBatches(apply_stage)"  # Ray's process title for a worker running a map stage


def _parquet_world(src: Path, files: int = 4, per_file: int = 600) -> list[str]:
    """Parquet files holding small JPEGs; every fifth caption is too short to keep."""
    src.mkdir(parents=True, exist_ok=True)
    keys = []
    for f in range(files):
        caps = [f"a photo number {i} of file {f}" if i % 5 else "x" for i in range(per_file)]
        ids = [f"f{f}_{i:05d}" for i in range(per_file)]
        imgs = [jpeg_bytes(size=(40, 40), color=(i % 251, f * 40, (i * 7) % 253)) for i in range(per_file)]
        pq.write_table(pa.table({"id": ids, "image": imgs, "caption": caps}), src / f"{f}.parquet",
                       row_group_size=100)
        keys += ids
    return keys


def _tar_world(src: Path, n_tars: int = 3, per_tar: int = 40) -> dict[str, list[dict]]:
    tars = {}
    for t in range(n_tars):
        samples = [{"__key__": f"t{t}_{i:04d}", "jpg": jpeg_bytes(size=(48, 48), color=(i * 5, t * 60, 9)),
                    "txt": f"a photo of object {t * 1000 + i}" if i % 4 else "x"} for i in range(per_tar)]
        write_tar(src / f"{t:03d}.tar", samples)
        tars[f"{t:03d}.tar"] = samples
    return tars


def _recipe(make_recipe, src: str, out: Path, name: str, **runtime) -> Path:
    return make_recipe({
        "source": {"path": src, "key_col": "id"} if src.endswith("parquet") else {"path": src},
        "stages": [{"use": "caption_length", "min_words": 2}, {"use": "image_hash"},
                   {"use": "dedup_exact", "by": ["pixels"]}],
        "write": {"output": str(out), "samples_per_shard": 200},
        "runtime": {"batch_size": 25, **runtime},
    }, name=name)


def _ledger(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger").glob("*.parquet"))],
                            promote_options="permissive")


def _kept_keys(out: Path) -> list[str]:
    """Keys of every sample in the output tars; fails if one was written twice."""
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (out / "webdataset").glob("*.tar")),
                                                shardshuffle=False)]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    return sorted(keys)


def _assert_whole(out: Path, input_keys: list[str], reference: Path) -> None:
    ledger = _ledger(out)
    assert sorted(ledger["key"].to_pylist()) == sorted(input_keys), "a row was lost or doubled"
    kept = _kept_keys(out)
    assert kept == sorted(k for k, s in zip(ledger["key"].to_pylist(), ledger["status"].to_pylist(),
                                            strict=True) if s == "kept")
    assert kept == _kept_keys(reference)
    assert not [p for p in out.rglob("*.tmp*")], "a temporary file was left behind"


# ------------------------------------------------------------------ a worker dies


class _Killer(threading.Thread):
    """Kill (SIGKILL) the first Ray worker of this test process seen running a map stage."""

    def __init__(self, title: str) -> None:
        super().__init__(daemon=True)
        self.title, self.killed, self.stop = title, [], threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set() and not self.killed:
            for p in me.children(recursive=True):
                try:
                    if " ".join(p.cmdline()).startswith(self.title):
                        p.kill()
                        self.killed.append(p.pid)
                        break
                except psutil.Error:
                    continue
            time.sleep(0.02)


def test_worker_killed_mid_stage_is_retried_without_loss_or_doubles(tmp_path, make_recipe, ray_session):
    """SIGKILL a worker while it runs a stage: Ray retries the task; the output equals an uninterrupted run."""
    keys = _parquet_world(tmp_path / "src", files=3, per_file=300)
    src = str(tmp_path / "src" / "*.parquet")
    run(load_recipe(_recipe(make_recipe, src, tmp_path / "ref", "ref.yaml")))

    killer = _Killer(STAGE_TASK)
    killer.start()
    try:
        manifest = run(load_recipe(_recipe(make_recipe, src, tmp_path / "killed", "killed.yaml")))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no stage worker was seen running: nothing was tested"
    assert not psutil.pid_exists(killer.killed[0]) or psutil.Process(killer.killed[0]).status() == "zombie"
    assert manifest.complete and manifest.counts.input == len(keys)
    _assert_whole(tmp_path / "killed", keys, tmp_path / "ref")


# ------------------------------------------------------------------ a corrupt input shard


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\x07" * 3000)  # valid start (passes validation), garbage after


def test_corrupt_source_shard_other_shards_commit_then_resume(tmp_path, make_recipe, ray_session):
    """Default `continue`: the good shards are committed, the error names the bad file, a re-run finishes."""
    tars = _tar_world(tmp_path / "src")
    keys = [s["__key__"] for samples in tars.values() for s in samples]
    src = str(tmp_path / "src" / "*.tar")
    run(load_recipe(_recipe(make_recipe, src, tmp_path / "ref", "ref.yaml")))
    bad = tmp_path / "src" / "001.tar"
    good = bad.read_bytes()
    _truncate(bad)
    out = tmp_path / "out"
    recipe = _recipe(make_recipe, src, out, "r.yaml")
    with pytest.raises(SourceError) as err:
        run(load_recipe(recipe))
    assert str(bad) in str(err.value) and "input shard 1" in str(err.value)
    # the global stage needs the whole pool: the run stopped after phase 1, shards 0 and 2 committed there
    assert sorted(p.name for p in (out / "_work" / "p0").glob("*.json")) == ["00000.json", "00002.json"]
    assert not (out / "_done").exists() or not list((out / "_done").glob("*.json"))
    assert (out / "_work" / "source_errors" / "00001.json").exists()

    bad.write_bytes(good)  # the user fixes the file and re-runs the same command
    manifest = run(load_recipe(recipe))
    assert manifest.complete and manifest.source_errors == []
    _assert_whole(out, keys, tmp_path / "ref")
    assert not (out / "_work" / "source_errors").exists()


def test_corrupt_source_shard_single_phase_commits_the_rest(tmp_path, make_recipe, ray_session):
    """Without global stages the good shards are finalized (outputs + `_done`); the manifest says incomplete."""
    tars = _tar_world(tmp_path / "src")
    _truncate(tmp_path / "src" / "002.tar")
    out = tmp_path / "out"
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "stages": [{"use": "caption_length", "min_words": 2}],
                          "write": {"output": str(out), "samples_per_shard": 200}})
    with pytest.raises(SourceError, match="002.tar"):
        run(load_recipe(recipe))
    assert sorted(p.name for p in (out / "_done").glob("*.json")) == ["00000.json", "00001.json"]
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert manifest["counts"]["input"] == len(tars["000.tar"]) + len(tars["001.tar"])
    assert not (out / "webdataset" / "00002.tar").exists()
    [failed] = manifest["source_errors"]  # the manifest names the shard, its file and why
    assert failed["shard"] == 2 and failed["path"].endswith("002.tar") and "002.tar" in failed["error"]


def test_corrupt_source_shard_fail_fast(tmp_path, make_recipe, ray_session):
    """`runtime.on_source_error: fail` stops at the bad shard, names it, and commits nothing of it."""
    _tar_world(tmp_path / "src")
    _truncate(tmp_path / "src" / "000.tar")
    out = tmp_path / "out"
    recipe = _recipe(make_recipe, str(tmp_path / "src" / "*.tar"), out, "r.yaml", on_source_error="fail")
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="000.tar") as err:
        run(load_recipe(recipe))
    assert "input shard 0" in str(err.value)
    assert not (out / "_work" / "p0" / "00000.json").exists()
    assert not (out / "manifest.json").exists()
    assert time.perf_counter() - t0 < 60


# ------------------------------------------------------------------ the disk fills up


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only); grown with `remount` to play the user freeing space."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs to fill a disk: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_names_the_file_and_commits_nothing_partial(tmp_path, make_recipe, tiny_disk, ray_session):
    keys = _parquet_world(tmp_path / "src", files=2, per_file=400)
    src = str(tmp_path / "src" / "*.parquet")
    run(load_recipe(_recipe(make_recipe, src, tmp_path / "ref", "ref.yaml")))
    out = tiny_disk / "out"
    recipe = _recipe(make_recipe, src, out, "r.yaml")
    with pytest.raises(NoSpaceError) as err:
        run(load_recipe(recipe))
    msg = str(err.value)
    assert "no space left" in msg and str(tiny_disk) in msg, msg
    assert not [p for p in out.rglob("*.tmp*")], "a temporary file was left behind"
    for marker in (out / "_done").glob("*.json") if (out / "_done").exists() else []:
        pytest.fail(f"{marker} committed although the disk filled up")  # 1 MiB holds no whole shard

    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    manifest = run(load_recipe(recipe))
    assert manifest.complete
    _assert_whole(out, keys, tmp_path / "ref")


# ------------------------------------------------------------------ the driver dies


def test_driver_sigkilled_after_first_commit_then_rerun(tmp_path, make_recipe, ray_session):
    """SIGKILL `curate run` (driver and its local Ray) once a first shard is committed; the re-run matches."""
    keys = _parquet_world(tmp_path / "src", files=3, per_file=400)
    src = str(tmp_path / "src" / "*.parquet")
    recipe = _recipe(make_recipe, src, tmp_path / "out", "r.yaml", num_cpus=2)
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "run", "--no-progress", str(recipe)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p0 = tmp_path / "out" / "_work" / "p0"
    deadline = time.time() + 120
    while not (p0.exists() and list(p0.glob("*.json"))):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run ended (or stalled) before a shard was committed:\n" + proc.stdout.read().decode())
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(p0.glob("*.json")) and not (tmp_path / "out" / "manifest.json").exists()

    run(load_recipe(_recipe(make_recipe, src, tmp_path / "ref", "ref.yaml")))
    manifest = run(load_recipe(recipe))  # the same recipe and output again: resumes
    assert manifest.complete
    _assert_whole(tmp_path / "out", keys, tmp_path / "ref")
