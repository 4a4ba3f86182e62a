"""What a person sees while `curate run` works: a bar on a terminal, a line now and then in a log, no Ray lines."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.engine.events import GlobalsDone, PhaseEnded, PhaseStarted, RowsDone
from curate.progress import ProgressView
from tests.conftest import jpeg_bytes

#: Ray's own log lines: its Python logging ("2026-12-01 08:49:26,901\tWARNING ...") and its C++ core
#: ("[2026-12-01 08:50:05,390 I 16003 16003] logging.cc:303: ...").
RAY_LINE = re.compile(r"(^|\n)(\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING|ERROR)|\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+)")


def _recipe(tmp_path: Path, n: int = 120) -> Path:
    pq.write_table(pa.table({"id": [f"k{i:03d}" for i in range(n)],
                             "image": [jpeg_bytes(size=(16, 16), color=(i, 9, 9)) for i in range(n)],
                             "caption": ["a small red square" if i % 4 else "x" for i in range(n)]}),
                   tmp_path / "in.parquet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source:\n  path: {tmp_path / 'in.parquet'}\n  key_col: id\n"
                      "stages:\n  - use: caption_length\n    min_words: 2\n"
                      f"write:\n  output: {tmp_path / 'out'}\n  formats: [parquet]\nruntime:\n  num_cpus: 1\n")
    return recipe


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def test_through_a_pipe_progress_lines_no_ray_lines_and_the_summary(tmp_path):
    proc = subprocess.run(_cli("run", str(_recipe(tmp_path))), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not RAY_LINE.search(proc.stderr), proc.stderr
    assert not RAY_LINE.search(proc.stdout), proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "phase 1/1 (caption_length): 1 shard(s)", proc.stderr
    assert re.fullmatch(r"phase 1/1 \(caption_length\): 120 rows, [\d,]+ rows/s, kept 90, dropped 30, "
                        r"done in [\d.]+s", lines[-1]), proc.stderr
    assert "120 rows in, 90 kept" in proc.stdout  # the summary table


def test_debug_shows_rays_own_lines(tmp_path):
    proc = subprocess.run(_cli("--debug", "run", str(_recipe(tmp_path)), "--no-progress"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert RAY_LINE.search(proc.stderr), proc.stderr  # what a normal run hides is there when asked for


def test_on_a_terminal_a_bar_with_rate_kept_dropped_and_eta(tmp_path):
    """Run the CLI in a pseudo-terminal, as a person would, and read what the terminal shows."""
    recipe = _recipe(tmp_path)
    master, slave = os.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"}
    proc = subprocess.Popen(_cli("run", str(recipe)), stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace"))
    assert proc.returncode == 0, text
    assert not RAY_LINE.search(text), text
    assert "phase 1/1 (caption_length)" in text and "120/120" in text, text
    assert "rows/s" in text and "kept 90" in text and "dropped 30" in text and "ETA" in text, text
    assert "120 rows in, 90 kept" in text


def test_log_lines_are_spaced_by_the_interval():
    stream = io.StringIO()
    view = ProgressView(tty=False, stream=stream, interval=3600)
    view(PhaseStarted(phase=0, phases=2, shards=4, rows=1000, stages=("download", "clip_score")))
    for _ in range(10):
        view(RowsDone(phase=0, rows=100, kept=90))
    view(PhaseEnded(phase=0, seconds=2.0))
    view(GlobalsDone(phase=0, stages=("dedup_exact",), seconds=0.5))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # the start, no line within the interval, the end
    assert lines[0] == "phase 1/2 (download, clip_score): 4 shard(s), 1,000 rows"
    assert lines[1].startswith("phase 1/2 (download, clip_score): 1,000/1,000 rows (100.0 %)")
    assert "kept 900, dropped 100, done in" in lines[1]
    assert lines[2] == "global stages after phase 1 (dedup_exact): 0.5s"

    stream = io.StringIO()
    view = ProgressView(tty=False, stream=stream, interval=0)
    view(PhaseStarted(phase=0, phases=1, shards=1, rows=200, stages=("download",)))
    view(RowsDone(phase=0, rows=50, kept=50))
    assert re.search(r"50/200 rows \(25\.0 %\), [\d,]+ rows/s, kept 50, dropped 0, ETA \d+s",
                     stream.getvalue().splitlines()[-1])
