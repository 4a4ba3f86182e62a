"""URL-list sources: every format, streaming shard planning, keys, carried columns, clear errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import InputError
from curate.sources.base import SourceConfig
from curate.sources.registry import make_source

ROWS = [{"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}", "license": f"cc-{i % 3}"}
        for i in range(25)]


def _write(tmp_path, fmt: str):
    if fmt == "parquet":
        p = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), p)
    elif fmt in ("csv", "tsv", "csv.gz"):
        sep = "\t" if fmt == "tsv" else ","
        text = sep.join(ROWS[0]) + "\n" + "".join(sep.join(r.values()) + "\n" for r in ROWS)
        p = tmp_path / f"in.{fmt}"
        if fmt.endswith(".gz"):
            p.write_bytes(gzip.compress(text.encode()))
        else:
            p.write_text(text)
    elif fmt in ("jsonl", "jsonl.gz"):
        text = "".join(json.dumps(r) + "\n" for r in ROWS)
        p = tmp_path / f"in.{fmt}"
        p.write_bytes(gzip.compress(text.encode())) if fmt.endswith(".gz") else p.write_text(text)
    elif fmt == "json":
        p = tmp_path / "in.json"
        p.write_text(json.dumps(ROWS))
    return p


def _read_all(source, specs):
    return pa.concat_tables([t for s in specs for t in source.read_shard(s, batch_rows=7)])


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "csv.gz", "jsonl", "jsonl.gz", "json"])
def test_formats_shard_and_carry_columns(tmp_path, fmt):
    p = _write(tmp_path, fmt)
    src = make_source(SourceConfig(path=str(p)))
    src.validate()
    specs = src.plan(str(tmp_path / "work"), samples_per_shard=10)
    assert [s["rows"] for s in specs] == [10, 10, 5]
    t = _read_all(src, specs)
    assert t["url"].to_pylist() == [r["url"] for r in ROWS]
    assert t["caption"].to_pylist() == [r["caption"] for r in ROWS]
    assert t["license"].to_pylist() == [r["license"] for r in ROWS]
    # img2dataset keys: 5-digit shard id + 4-digit index
    assert t["key"].to_pylist()[:2] == ["000000000", "000000001"]
    assert t["key"].to_pylist()[10] == "000010000"
    assert set(t["status"].to_pylist()) == {"kept"}


def test_txt_is_one_url_per_line(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("http://a/1.jpg\n\nhttp://a/2.jpg\n")
    src = make_source(SourceConfig(path=str(p)))
    src.validate()
    t = _read_all(src, src.plan(str(tmp_path / "w"), 100))
    # an empty line is a row with no URL: it is dropped later with a reason, never silently
    assert t["url"].to_pylist() == ["http://a/1.jpg", None, "http://a/2.jpg"]


def test_missing_url_column_lists_columns(tmp_path):
    p = tmp_path / "in.csv"
    p.write_text("link,text\nhttp://a,b\n")
    with pytest.raises(InputError) as e:
        make_source(SourceConfig(path=str(p))).validate()
    msg = str(e.value)
    assert str(p) in msg and "'url'" in msg and "link, text" in msg


def test_custom_column_names_and_key_column(tmp_path):
    p = tmp_path / "in.csv"
    p.write_text("id,link,text\nx1,http://a,cap a\nx2,http://b,cap b\n")
    src = make_source(SourceConfig(path=str(p), url_col="link", caption_col="text", key_col="id"))
    src.validate()
    t = _read_all(src, src.plan(str(tmp_path / "w"), 100))
    assert t["key"].to_pylist() == ["x1", "x2"] and t["caption"].to_pylist() == ["cap a", "cap b"]


def test_reserved_column_names_are_prefixed(tmp_path):
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": ["http://a"], "caption": ["c"], "status": ["live"]}), p)
    src = make_source(SourceConfig(path=str(p)))
    t = _read_all(src, src.plan(str(tmp_path / "w"), 10))
    assert t["source_status"].to_pylist() == ["live"] and t["status"].to_pylist() == ["kept"]


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        make_source(SourceConfig(path=str(tmp_path / "nope.parquet")))
    with pytest.raises(InputError, match="matches no input files"):
        make_source(SourceConfig(path=str(tmp_path / "*.parquet")))


def test_folder_of_files_keeps_numbering_across_files(tmp_path):
    d = tmp_path / "urls"
    d.mkdir()
    for i in range(3):
        pq.write_table(pa.Table.from_pylist(ROWS[i * 5:(i + 1) * 5]), d / f"part-{i}.parquet")
    src = make_source(SourceConfig(path=str(d)))
    specs = src.plan(str(tmp_path / "w"), 4)
    t = _read_all(src, specs)
    assert t["url"].to_pylist() == [r["url"] for r in ROWS[:15]]
    assert len(specs) == 4


def test_memory_filesystem(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("memory://bucket/in.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    src = make_source(SourceConfig(path="memory://bucket/in.jsonl"))
    src.validate()
    specs = src.plan("memory://bucket/work", 10)
    assert specs[0]["path"].startswith("memory://")
    assert _read_all(src, specs).num_rows == 3


def test_bad_jsonl_line_becomes_a_row(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    src = make_source(SourceConfig(path=str(p)))
    t = _read_all(src, src.plan(str(tmp_path / "w"), 10))
    assert t.num_rows == 3 and t["url"].to_pylist()[1] is None


def test_later_columns_and_type_changes_are_kept_not_nulled(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"url": f"u{i}", "caption": "c", "id": i}) + "\n"
                                              for i in range(3)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"url": f"v{i}", "caption": "c", "id": f"x{i}",
                                                          "license": "cc"}) + "\n" for i in range(3)))
    src = make_source(SourceConfig(path=str(tmp_path)))
    t = _read_all(src, src.plan(str(tmp_path / "w"), 100))
    assert t["id"].to_pylist() == ["0", "1", "2", "x0", "x1", "x2"]
    assert t["license"].to_pylist() == [None] * 3 + ["cc"] * 3


def test_malformed_csv_names_the_file_and_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("url,caption\nhttp://a/1.jpg,hello\nhttp://a/2.jpg,hi, there\n")
    with pytest.raises(InputError, match=f"{p}:3: cannot read as csv: 3 columns where the header has 2"):
        make_source(SourceConfig(path=str(p))).plan(str(tmp_path / "w"), 10)


def test_key_column_must_be_unique_and_is_made_tar_safe(tmp_path):
    p = tmp_path / "k.csv"
    p.write_text("id,url,caption\nimg.001,http://a,x\n../evil,http://b,y\n")
    src = make_source(SourceConfig(path=str(p), key_col="id"))
    assert _read_all(src, src.plan(str(tmp_path / "w"), 10))["key"].to_pylist() == ["img_001", "___evil"]
    p.write_text("id,url,caption\na,http://a,x\na,http://b,y\n")
    with pytest.raises(InputError, match="key 'a' appears more than once"):
        make_source(SourceConfig(path=str(p), key_col="id")).plan(str(tmp_path / "w2"), 10)
