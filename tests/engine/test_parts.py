"""Part files: read back in order, only the wanted columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from curate.engine.parts import PART_READ_THREADS, read_part_files


def test_part_files_are_read_in_order_with_only_the_wanted_columns(tmp_path):
    paths = []
    for i in range(PART_READ_THREADS * 2 + 3):  # more parts than threads: order must still hold
        p = tmp_path / f"part-{i:03d}.parquet"
        pq.write_table(pa.table({"key": [f"{i:03d}-a", f"{i:03d}-b"], "image": [b"x" * i, b"y"],
                                 "n": [i, i]}), p)
        paths.append(str(p))
    tables = read_part_files(paths, {"key", "n", "not_there"})
    assert [t.column_names for t in tables] == [["key", "n"]] * len(paths)
    assert [k for t in tables for k in t["key"].to_pylist()] == [f"{i:03d}-{s}" for i in range(len(paths))
                                                                 for s in "ab"]
    assert read_part_files(paths[:1])[0].column_names == ["key", "image", "n"]
    assert read_part_files([]) == []
