"""URL lists (parquet, csv, tsv, json, jsonl, txt; optionally compressed), read in streaming batches.

Planning streams every input file once on the driver and cuts it into input
shards of ``samples_per_shard`` rows, written as small Parquet files under the
run's work folder — the same thing img2dataset does, without loading a whole
file into memory. Keys are ``<5-digit shard><4-digit index>`` as in img2dataset.

Bad input: a row that cannot be parsed on its own (an invalid JSONL line, a .txt line
with invalid UTF-8 or a NUL byte) is dropped with ``unparseable_line`` and
``source_error`` = ``file:line: why``. What makes the rest of a file untrustworthy
stops the run while planning, before any work, naming ``file:line`` (a CSV/TSV row
with the wrong column count, a broken quote that swallows the lines after it) or the
file (a compressed file cut short, a Parquet URL column that holds no text).
"""

from __future__ import annotations

import csv
import io
import json
import re
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from curate import rows
from curate.errors import InputError
from curate.fsutil import atomic_open
from curate.sources.base import Source, base_columns, rename_reserved

STREAM_ROWS = 65536  # rows per read batch while planning: large enough to be fast, small for memory

#: Reason of a row the input file holds but that cannot be parsed (a bad JSON line, invalid UTF-8 or
#: a NUL byte in a text list); the ledger's ``source_error`` column says ``file:line: what``.
UNPARSEABLE = "unparseable_line"
#: Ledger column with ``file:line: what`` for rows dropped as :data:`UNPARSEABLE`.
SOURCE_ERROR_COL = "source_error"


def key_widths(samples_per_shard: int, num_shards_hint: int = 0) -> tuple[int, int]:
    idx_w = max(4, len(str(max(samples_per_shard - 1, 0))))
    shard_w = max(5, len(str(max(num_shards_hint - 1, 0))))
    return shard_w, idx_w


def make_key(shard: int, idx: int, samples_per_shard: int) -> str:
    sw, iw = key_widths(samples_per_shard)
    return f"{shard:0{sw}d}{idx:0{iw}d}"


class UrlListSource(Source):
    def __init__(self, config, files, fmt: str) -> None:
        super().__init__(config, files)
        self.fmt = fmt

    # ------------------------------------------------------------ reading input files

    def _open(self, path: str):
        return fsspec.open(path, "rb", compression="infer")

    def _header(self, path: str) -> list[str]:
        """Column names of one input file, reading only its start."""
        try:
            if self.fmt == "parquet":
                with fsspec.open(path, "rb") as f:
                    return pq.ParquetFile(f).schema_arrow.names
            if self.fmt == "txt":
                return [self.config.url_col]
            with self._open(path) as f:
                if self.fmt in ("csv", "tsv"):
                    line = io.TextIOWrapper(f, encoding="utf-8", newline="").readline()
                    return next(csv.reader([line], delimiter="\t" if self.fmt == "tsv" else ","), [])
                if self.fmt == "jsonl":
                    for line in io.TextIOWrapper(f, encoding="utf-8"):
                        if line.strip():
                            obj = json.loads(line)
                            if not isinstance(obj, dict):
                                raise InputError(f"{path}: line 1 is not a JSON object")
                            return list(obj)
                    return []
                if self.fmt == "json":
                    data = json.load(f)
                    if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
                        raise InputError(f"{path}: expected a JSON array of objects")
                    return list(data[0]) if data else []
        except InputError:
            raise
        except FileNotFoundError as e:
            raise InputError(f"{path}: file not found") from e
        except Exception as e:  # noqa: BLE001 - report any parse failure with the path
            raise InputError(f"{path}: cannot read as {self.fmt}: {e}") from e
        raise InputError(f"{path}: unsupported format {self.fmt}")

    def validate(self) -> None:
        cfg = self.config
        for path in self.files:
            names = self._header(path)
            if self.fmt == "parquet" and cfg.url_col in names:
                self._check_url_type(path)
            missing = [c for c in (cfg.url_col,) if c not in names]
            if cfg.caption_col and self.fmt != "txt" and cfg.caption_col not in names:
                missing.append(cfg.caption_col)
            if cfg.key_col and cfg.key_col not in names:
                missing.append(cfg.key_col)
            if cfg.columns:
                missing += [c for c in cfg.columns if c not in names]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                    f"the file has: {', '.join(names) or '(no columns)'}. "
                    "Set source.url_col / source.caption_col to the names used there."
                )

    def _check_url_type(self, path: str) -> None:
        """A Parquet URL column must hold strings: numbers there mean the wrong column was named."""
        with fsspec.open(path, "rb") as f:
            t = pq.ParquetFile(f).schema_arrow.field(self.config.url_col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
                or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))):
            raise InputError(f"{path}: column {self.config.url_col!r} holds {t} values, not URLs (text); "
                             "set source.url_col to the column with the image URLs")

    def _batches(self, path: str) -> Iterator[pa.Table]:
        if self.fmt == "parquet":
            with fsspec.open(path, "rb") as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=STREAM_ROWS):
                    yield pa.Table.from_batches([b])
        elif self.fmt in ("csv", "tsv"):
            names = self._header(path)
            with self._open(path) as f:
                reader = pacsv.open_csv(
                    f,
                    read_options=pacsv.ReadOptions(block_size=1 << 22),
                    parse_options=pacsv.ParseOptions(
                        delimiter="\t" if self.fmt == "tsv" else ",", newlines_in_values=True,
                        invalid_row_handler=None,
                    ),
                    convert_options=pacsv.ConvertOptions(
                        column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                        quoted_strings_can_be_null=False,
                    ),
                )
                for b in reader:
                    yield pa.Table.from_batches([b])
        elif self.fmt == "txt":
            with self._open(path) as f:
                buf: list[str | None] = []
                errs: list[str | None] = []

                def table() -> pa.Table:
                    t = pa.table({self.config.url_col: pa.array(buf, pa.string())})
                    if any(errs):
                        t = t.append_column("_parse_error", pa.array(errs, pa.string()))
                    return t

                for lineno, raw in enumerate(f, 1):
                    line, err = _text_line(raw)
                    buf.append(line)
                    errs.append(None if err is None else f"{path}:{lineno}: {err}")
                    if len(buf) >= STREAM_ROWS:
                        yield table()
                        buf, errs = [], []
                if buf:
                    yield table()
        elif self.fmt == "jsonl":
            with self._open(path) as f:
                buf_rows: list[dict] = []
                for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:
                        # A bad row is kept as a row with no URL, so it is dropped with a reason.
                        obj = {self.config.url_col: None, "_parse_error": f"{path}:{lineno}: {e}"}
                    buf_rows.append(obj)
                    if len(buf_rows) >= STREAM_ROWS:
                        yield _from_rows(buf_rows)
                        buf_rows = []
                if buf_rows:
                    yield _from_rows(buf_rows)
        elif self.fmt == "json":
            with self._open(path) as f:
                data = json.load(f)  # a JSON array cannot be streamed without a parser; prefer jsonl
            for i in range(0, len(data), STREAM_ROWS):
                yield _from_rows(data[i : i + STREAM_ROWS])

    def _read_or_fail(self, path: str) -> Iterator[pa.Table]:
        """Batches of one file; a parse error names the file and, for CSV/TSV, the line (a row with the
        wrong column count, a broken quote, invalid UTF-8); a compressed file cut short is named too."""
        n = 0
        line = 2  # CSV/TSV: physical line of the next row (the header is line 1)
        try:
            for t in self._batches(path):
                if self.fmt in ("csv", "tsv"):
                    line = self._check_quotes(path, t, line)
                n += t.num_rows
                yield t
        except InputError:
            raise
        except (EOFError, zlib.error) as e:
            raise InputError(f"{path}: the compressed file ends early or is corrupt after {n} rows "
                             f"(truncated download?): {e}") from e
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError, ValueError) as e:
            if self.fmt in ("csv", "tsv") and "compress" not in str(e).lower():
                where = self._locate_csv_problem(path)
                if where is not None:
                    raise InputError(f"{path}:{where[0]}: cannot read as {self.fmt}: {where[1]}") from e
            raise InputError(f"{path}: cannot read as {self.fmt} (after {n} rows): {e}") from e

    def _check_quotes(self, path: str, t: pa.Table, line: int) -> int:
        """Stop at a broken quote: a quoted field that swallows the lines after it, which then look like
        rows of their own (a newline, then a line with the delimiter and a URL). Returns the next line."""
        sep = "\t" if self.fmt == "tsv" else ","
        swallowed = re.compile(r"\n[^\n]*(" + sep + r"[^\n]*://|://[^\n]*" + sep + ")")
        cols = [n for n in t.column_names if pa.types.is_string(t[n].type)
                and pc.any(pc.fill_null(pc.match_substring(t[n], "\n"), False)).as_py()]
        if not cols:
            return line + t.num_rows
        newlines = pc.fill_null(pc.count_substring(t[cols[0]], "\n"), 0)
        for name in cols[1:]:
            newlines = pc.add(newlines, pc.fill_null(pc.count_substring(t[name], "\n"), 0))
        for name in cols:
            col = t[name]
            bad = pc.fill_null(pc.match_substring_regex(col, swallowed.pattern), False)
            if pc.any(bad).as_py():
                i = pc.index(bad, True).as_py()
                start = line + i + (int(pc.sum(newlines.slice(0, i)).as_py() or 0) if i else 0)
                raise InputError(
                    f"{path}:{start}: a quoted field in column {name!r} opens on line {start} and runs over "
                    f"{col[i].as_py().count(chr(10))} more line(s) that look like rows of their own: a broken "
                    "(unclosed or stray) quote? Fix the quote, or quote the whole field and double the quotes "
                    "inside it")
        return line + t.num_rows + int(pc.sum(newlines).as_py() or 0)

    def _locate_csv_problem(self, path: str) -> tuple[int, str] | None:
        """Re-read a CSV/TSV that Arrow refused, in Python, to find the first bad line (the slow path:
        only after an error). Returns (line, what is wrong) or None."""
        sep = "\t" if self.fmt == "tsv" else ","
        lineno = 0

        def lines() -> Iterator[str]:
            nonlocal lineno
            with self._open(path) as f:
                for raw in f:
                    lineno += 1
                    try:
                        yield raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise _BadLine(lineno, f"invalid UTF-8 at byte {e.start} of the line") from None

        try:
            reader = csv.reader(lines(), delimiter=sep, strict=True)
            header = next(reader, None)
            if header is None:
                return None
            while True:
                start = lineno + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return None
                except csv.Error as e:
                    return start, f"{e} (a broken quote?)"
                if row and len(row) != len(header):
                    return start, f"{len(row)} columns where the header has {len(header)}"
        except _BadLine as e:
            return e.line, e.what
        except (EOFError, OSError, zlib.error):
            return None

    def _normalise(self, t: pa.Table) -> pa.Table:
        cfg = self.config
        keep = [cfg.url_col] + ([cfg.caption_col] if cfg.caption_col and cfg.caption_col in t.column_names else [])
        extra = [c for c in t.column_names if c not in keep and c != cfg.key_col and not c.startswith("_")]
        if cfg.columns is not None:
            extra = [c for c in extra if c in cfg.columns]
        n = t.num_rows
        out: dict[str, pa.Array] = {
            rows.URL: _as_string(t[cfg.url_col]),
            rows.CAPTION: _as_string(t[cfg.caption_col]) if cfg.caption_col in t.column_names else pa.nulls(n, pa.string()),
        }
        if cfg.key_col:
            out["_source_key"] = _as_string(t[cfg.key_col])
        if "_parse_error" in t.column_names:
            out["_parse_error"] = _as_string(t["_parse_error"])
        carried = rename_reserved(t.select(extra), keep=set())
        for name in carried.column_names:
            col = carried[name]
            if pa.types.is_null(col.type) or pa.types.is_struct(col.type) or pa.types.is_list(col.type) \
                    or pa.types.is_dictionary(col.type):
                col = pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v))
                                for v in col.to_pylist()], pa.string())
            out[name] = col
        return pa.table(out)

    def plan(self, work_dir: str, samples_per_shard: int) -> list[dict[str, Any]]:
        fs, root = fsspec.core.url_to_fs(work_dir)
        fs.makedirs(f"{root}/input", exist_ok=True)
        specs: list[dict[str, Any]] = []
        pending: list[pa.Table] = []
        pending_rows = 0
        schema: pa.Schema | None = None
        seen_keys: set[str] = set()  # key_col values must be unique: lineage and dedup join on them

        def flush(n: int) -> None:
            nonlocal pending, pending_rows
            table = pa.concat_tables([_cast_to(p, schema) for p in pending]).combine_chunks()
            chunk, rest = table.slice(0, n), table.slice(n)
            shard = len(specs)
            if "_source_key" in chunk.column_names:
                keys = pa.array([_checked_key(k, seen_keys, self.config.key_col, shard)
                                 for k in chunk["_source_key"].to_pylist()], pa.string())
            else:
                keys = pa.array([make_key(shard, i, samples_per_shard) for i in range(chunk.num_rows)], pa.string())
            if "_source_key" in chunk.column_names:
                chunk = chunk.drop(["_source_key"])
            chunk = chunk.add_column(0, rows.KEY, keys)
            path = f"{root}/input/{shard:05d}.parquet"
            with atomic_open(_unstrip(work_dir, path)) as f:
                pq.write_table(chunk, f)
            specs.append({"shard": shard, "kind": "urllist", "path": _unstrip(work_dir, path), "rows": chunk.num_rows})
            pending = [rest] if rest.num_rows else []
            pending_rows = rest.num_rows

        for path in self.files:
            for batch in self._read_or_fail(path):
                t = self._normalise(batch)
                if schema is None:
                    schema = t.schema
                else:
                    t, schema = _conform(t, schema)
                pending.append(t)
                pending_rows += t.num_rows
                while pending_rows >= samples_per_shard:
                    flush(samples_per_shard)
        if pending_rows:
            flush(pending_rows)
        if not specs:
            raise InputError(f"source.path: {self.config.path} holds no rows")
        return specs

    def split(self, spec: dict[str, Any], unit_rows: int) -> list[dict[str, Any]]:
        """A planned shard's rows are known (its chunk file): units of ``unit_rows`` rows."""
        n = int(spec.get("rows") or 0)
        if n <= unit_rows:
            return [spec]
        return [{**spec, "unit": [first, min(unit_rows, n - first)]} for first in range(0, n, unit_rows)]

    def read_shard(self, spec: dict[str, Any], batch_rows: int) -> Iterator[pa.Table]:
        first, count = spec.get("unit") or (0, None)
        with fsspec.open(spec["path"], "rb") as f:
            pf = pq.ParquetFile(f)
            seen = 0
            for b in pf.iter_batches(batch_size=batch_rows):
                lo, hi = max(first - seen, 0), b.num_rows if count is None else min(first + count - seen, b.num_rows)
                seen += b.num_rows
                if hi <= lo:
                    if count is not None and seen >= first + count:
                        break
                    continue
                t = pa.Table.from_batches([b]).slice(lo, hi - lo)
                cols = base_columns(t.num_rows)
                for name, arr in cols.items():
                    t = t.append_column(name, arr)
                if "_parse_error" in t.column_names:
                    errors = t["_parse_error"]
                    t = t.drop(["_parse_error"])
                    if errors.null_count < len(errors):
                        t = rows.with_column(t, SOURCE_ERROR_COL, errors)
                        t = rows.mark_dropped(t, pc.if_else(pc.is_valid(errors), UNPARSEABLE, pa.scalar(None, pa.string())), "source")
                yield t


def _unstrip(work_dir: str, path: str) -> str:
    """Keep the protocol prefix of the work dir on paths derived from it."""
    if "://" in work_dir and "://" not in path:
        return work_dir.split("://", 1)[0] + "://" + path
    return path


def _as_string(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())


def _from_rows(objs: list[dict]) -> pa.Table:
    names: dict[str, None] = {}
    for o in objs:
        names.update(dict.fromkeys(o))
    cols = {}
    for n in names:
        vals = [o.get(n) for o in objs]
        try:
            cols[n] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            cols[n] = pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in vals], pa.string())
    return pa.table(cols)


def _conform(t: pa.Table, schema: pa.Schema) -> tuple[pa.Table, pa.Schema]:
    """Fit a later batch to the schema so far; returns the batch and the (possibly widened) schema.

    A column that appears later is added (earlier rows read it as null); a value that does not
    cast to the column's type turns the column into strings from here on — never into nulls.
    """
    out = {}
    fields = list(schema)
    for i, field in enumerate(fields):
        if field.name not in t.column_names:
            out[field.name] = pa.nulls(t.num_rows, field.type)
            continue
        col = t[field.name]
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                col = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
                if not pa.types.is_string(field.type):
                    fields[i] = pa.field(field.name, pa.string())
        out[field.name] = col
    for name in t.column_names:
        if name not in out:
            out[name] = t[name]
            fields.append(pa.field(name, t.schema.field(name).type))
    new_schema = pa.schema(fields)
    return pa.table({f.name: out[f.name].cast(f.type) for f in new_schema}), new_schema


def _cast_to(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch read before the schema widened, in the final types (strings cast losslessly)."""
    return pa.table({f.name: (t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type))
                     for f in schema})


def _checked_key(key: str | None, seen: set[str], col: str | None, shard: int) -> str:
    if key is None or key == "":
        raise InputError(f"source.key_col {col!r}: an empty key in input shard {shard}; keys must be set")
    key = rows.safe_key(key)
    if key in seen:
        raise InputError(f"source.key_col {col!r}: key {key!r} appears more than once; keys must be unique "
                         "(or leave key_col unset and curate numbers the rows)")
    seen.add(key)
    return key


class _BadLine(Exception):
    def __init__(self, line: int, what: str) -> None:
        super().__init__(f"line {line}: {what}")
        self.line, self.what = line, what


def _text_line(raw: bytes) -> tuple[str | None, str | None]:
    """A line of a .txt URL list: (the URL or None, why it cannot be used or None)."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start} of the line"
    if "\x00" in line:
        return None, "a NUL byte in the line"
    return line or None, None
