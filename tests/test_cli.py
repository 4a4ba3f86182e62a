"""The command line as a user meets it: exit codes and one-paragraph errors."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def curate(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_validate_ok_and_bad_recipe(tmp_path):
    good = tmp_path / "good.yaml"
    pq.write_table(pa.table({"url": ["http://a/1.jpg"], "caption": ["a b c"]}), tmp_path / "in.parquet")
    good.write_text(f"source:\n  path: {tmp_path / 'in.parquet'}\nstages:\n  - use: caption_length\n")
    r = curate("validate", str(good))
    assert r.returncode == 0 and "ok" in r.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"source:\n  path: {tmp_path / 'in.parquet'}\n  url_column: link\n")
    r = curate("validate", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}:3: source.url_column: unknown key"
    assert "Traceback" not in r.stderr


def test_run_reports_missing_column_before_any_work(tmp_path):
    pq.write_table(pa.table({"link": ["http://a/1.jpg"], "text": ["a b c"]}), tmp_path / "in.parquet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source:\n  path: {tmp_path / 'in.parquet'}\nwrite:\n  output: {tmp_path / 'out'}\n")
    r = curate("run", str(recipe))
    assert r.returncode == 2
    assert "missing column(s) 'url', 'caption'" in r.stderr and "link, text" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_run_without_output_and_missing_input(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source:\n  path: nowhere.parquet\n")
    r = curate("run", str(recipe))
    assert r.returncode == 2 and "no output location" in r.stderr
    r = curate("run", str(recipe), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "nowhere.parquet does not exist" in r.stderr


def test_schema_command_writes_files(tmp_path):
    r = curate("schema", "-o", str(tmp_path / "s"))
    assert r.returncode == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "ledger-row.schema.json", "manifest.schema.json", "mixture.schema.json", "recipe.schema.json",
        "stats.schema.json"]


def test_run_ends_its_own_ray_at_once_and_leaves_no_process(tmp_path):
    """`curate run` starts a local Ray and, once the output is committed, SIGKILLs what it started
    (raylet, GCS, agents, workers) and exits with the run's status instead of waiting for Ray's
    graceful shutdown (1.5-2.5 s; not timed here). What can go wrong is checked: the summary must
    still reach stdout, and no process of that Ray may outlive the command."""
    import json
    import time

    import psutil

    from tests.conftest import jpeg_bytes

    n = 60
    pq.write_table(pa.table({"id": [f"k{i:03d}" for i in range(n)],
                             "image": [jpeg_bytes(size=(24, 24), color=(i, 9, 9)) for i in range(n)],
                             "caption": ["a small red square" if i % 3 else "x" for i in range(n)]}),
                   tmp_path / "in.parquet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source:\n  path: {tmp_path / 'in.parquet'}\n  key_col: id\n"
                      "stages:\n  - use: caption_length\n    min_words: 2\n"
                      f"write:\n  output: {tmp_path / 'out'}\nruntime:\n  num_cpus: 1\n")
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "run", str(recipe), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[psutil.Process] = set()
    me = psutil.Process(proc.pid)
    while proc.poll() is None:  # every process the run starts is below it while it runs
        try:
            seen.update(me.children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "60 rows in, 40 kept" in out  # the summary is flushed before the process ends
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"] is True
    assert len(seen) >= 3  # GCS, raylet and at least one worker were seen (the test would be void otherwise)
    deadline = time.time() + 10
    while time.time() < deadline and [p for p in seen if _alive(p)]:
        time.sleep(0.1)
    assert not [p for p in seen if _alive(p)], "a process of the run's Ray outlived it"


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
