"""``curate stats`` and report.html name the input shards a run could not read (the manifest's
``source_errors``): which shard, which file, why, how many rows were read before the error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from curate.errors import SourceError
from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_tar


def test_stats_and_report_list_unreadable_input_shards(tmp_path, make_recipe, ray_session):
    for t in range(3):
        write_tar(tmp_path / "src" / f"{t:03d}.tar",
                  [{"__key__": f"t{t}_{i:03d}", "jpg": jpeg_bytes(size=(24, 24), color=(i, t * 50, 7)),
                    "txt": f"a photo of thing {i}"} for i in range(30)])
    bad = tmp_path / "src" / "001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] + b"\x07" * 3000)  # a valid start, then garbage
    out = tmp_path / "out"
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "stages": [{"use": "caption_length", "min_words": 2}],
                          "write": {"output": str(out), "samples_per_shard": 100}})
    with pytest.raises(SourceError):
        run(load_recipe(recipe))
    [failed] = json.loads((out / "manifest.json").read_text())["source_errors"]

    r = subprocess.run([sys.executable, "-m", "curate.cli", "stats", str(out)], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"warning: input shard 1 ({bad}) could not be read" in r.stderr  # the terminal says so too
    stats = json.loads((out / "stats.json").read_text())
    assert stats["complete"] is False
    [entry] = stats["source_errors"]
    assert entry == {"shard": 1, "path": str(bad), "error": failed["error"], "rows_read": failed["rows_read"]}
    assert "001.tar" in entry["error"]

    html = (out / "report.html").read_text()
    section = html.split('id="source-errors"', 1)[1].split("<h2", 1)[0]
    assert "Unreadable input shards" in html and "1 input shard could not be read" in section
    assert str(bad) in section and "unreadable tar" in section and "re-run" in section
