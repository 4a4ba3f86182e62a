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
