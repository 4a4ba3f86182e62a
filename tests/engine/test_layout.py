"""The output's layout on resume: the guard against another recipe, and what a killed run left half-written."""

from __future__ import annotations

import pytest

from curate.engine.layout import Layout, prepare_output
from curate.errors import OutputError
from curate.fsutil import atomic_open


def test_resuming_removes_the_temp_files_a_killed_run_left(tmp_path):
    out = tmp_path / "out"
    layout = Layout(str(out))
    prepare_output(layout, fingerprint="f1", resolved={}, overwrite=False)
    with atomic_open(str(out / "ledger" / "00001.parquet")) as f:  # a finished file keeps its name
        f.write(b"done")
    stale = [out / "ledger" / "00002.parquet.tmp290f0c05", out / "webdataset" / "00002.tar.tmpdeadbeef",
             out / "_work" / "p0" / "00003.json.tmp0123abcd"]
    for p in stale:  # what a SIGKILL mid-write leaves: atomic_open's temp names, never renamed
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    kept = [out / "notes.tmpl", out / "webdataset" / "00004.tar.tmp"]  # not a temp name of ours
    for p in kept:
        p.write_bytes(b"mine")

    prepare_output(layout, fingerprint="f1", resolved={}, overwrite=False)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert (out / "ledger" / "00001.parquet").read_bytes() == b"done"

    stray = out / "ledger" / "00005.parquet.tmp11112222"
    stray.write_bytes(b"half")
    with pytest.raises(OutputError, match="different recipe"):  # another recipe's output is left untouched
        prepare_output(layout, fingerprint="f2", resolved={}, overwrite=False)
    assert stray.exists()
