"""The sources of a mixture: which files a source names (a curate output's manifest, files, folders,
globs) and the token unit their outputs record, their rows' positions and token counts in the
mixture's unit (a first pass without image bytes, unless a row group has rows without an image and
must be recounted), and reading chosen rows back.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from curate import rows
from curate.errors import InputError
from curate.mix.model import MANIFEST_FILE, RUN_MANIFEST, MixSource
from curate.mix.tokens import Counting, Recorded, recorded_unit

log = logging.getLogger(__name__)

READ_BATCH_ROWS = 1024  # rows per batch read from a source: bounded memory, few read calls


@dataclass
class SourceFiles:
    """The files of one source and how to read them."""

    name: str
    files: list[str]
    format: Literal["parquet", "webdataset"]
    recorded: list[Recorded | None]  # per file: the token unit its output's manifest records


def resolve_source(src: MixSource) -> SourceFiles:
    """A curate output folder → its manifest's shards (Parquet preferred); else files, folders, globs.

    An earlier mixture's output is read through its ``mixture_manifest.json`` the same way.
    """
    paths = src.path if isinstance(src.path, list) else [src.path]
    files: list[str] = []
    recorded: dict[str, Recorded | None] = {}
    fmt = src.format
    for p in paths:
        fs, root = fsspec.core.url_to_fs(p)
        local = isinstance(fs, LocalFileSystem)

        def full(f: str, fs=fs, local=local) -> str:
            return f if local else fs.unstrip_protocol(f)
        listing = next((f"{root}/{m}" for m in (RUN_MANIFEST, MANIFEST_FILE) if fs.exists(f"{root}/{m}")), None)
        if fs.isdir(root) and listing:  # a curate run's (or an earlier mixture's) output: its shard list
            with fs.open(listing, "rt") as f:
                manifest = json.load(f)
            shards = manifest.get("shards", [])
            have = {s["format"] for s in shards}
            pick = fmt if fmt != "auto" else ("parquet" if "parquet" in have else "webdataset")
            if pick not in have:
                raise InputError(f"mixture source {src.name!r}: {p} has no {pick} shards "
                                 f"(its manifest lists {sorted(have) or 'none'})")
            if not manifest.get("complete", True):
                log.warning("mixture source %s: %s is an incomplete run; mixing its committed shards", src.name, p)
            rec = recorded_unit(manifest, full(listing))
            for s in shards:
                if s["format"] == pick:
                    files.append(full(f"{root}/{s['path']}"))
                    recorded[files[-1]] = rec
            fmt = pick
            continue
        if fs.isdir(root):
            found = sorted(fs.find(root))
        else:
            found = sorted(fs.glob(root)) if any(c in root for c in "*?[") else ([root] if fs.exists(root) else [])
        found = [f for f in found if f.endswith((".parquet", ".tar"))]
        if not found:
            raise InputError(f"mixture source {src.name!r}: no .parquet or .tar files at {p}")
        files += [full(f) for f in found]
    kinds = {"parquet" if f.endswith(".parquet") else "webdataset" for f in files}
    if fmt == "auto":
        if len(kinds) > 1:
            raise InputError(f"mixture source {src.name!r} mixes Parquet and tar files; set `format:`")
        fmt = kinds.pop()
    files = [f for f in files if f.endswith(".parquet" if fmt == "parquet" else ".tar")]
    if not files:
        raise InputError(f"mixture source {src.name!r}: no {fmt} files at {src.path}")
    return SourceFiles(src.name, files, fmt, [recorded.get(f) for f in files])


def tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar in order: members grouped by key (the stem before the first dot)."""
    current: dict[str, Any] = {}
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current.setdefault("__key__", key)
            current[ext] = tar.extractfile(m).read()
    if current:
        yield current


_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def tar_row(sample: dict[str, Any]) -> dict[str, Any]:
    """A tar sample as a row: the JSON fields, ``key``, ``caption`` (the .txt), image bytes and format."""
    row: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if isinstance(meta, dict):
                row.update(meta)
        except ValueError:
            pass
    row[rows.KEY] = row.get(rows.KEY) or sample["__key__"]
    if "txt" in sample:
        row[rows.CAPTION] = sample["txt"].decode("utf-8", "replace")
    ext = next((e for e in _IMAGE_EXTS if e in sample), None)
    row[rows.IMAGE] = sample.get(ext) if ext else None
    row[rows.IMAGE_FORMAT] = ext
    return row


@dataclass
class SourceIndex:
    """Per row of a source: its file, its position in the file, its tokens in the mixture's unit (None:
    not counted, a `unit: samples` mixture whose sources cannot share a unit)."""

    files: SourceFiles
    file_idx: np.ndarray
    row_idx: np.ndarray
    tokens: np.ndarray | None
    tokens_from: dict[str, int] = field(default_factory=dict)  # how → files: recorded/declared column, recount
    text_columns: list[str] = field(default_factory=list)  # the columns whose text was counted

    @property
    def rows(self) -> int:
        return len(self.row_idx)

    @property
    def recorded(self) -> list[dict[str, Any]]:
        """The distinct token units its outputs record."""
        seen: list[dict[str, Any]] = []
        for rec in self.files.recorded:
            if rec is not None and rec.as_dict() not in seen:
                seen.append(rec.as_dict())
        return seen


def _column_tokens(values: list[Any], how: str, why_path: str, column: str) -> np.ndarray | None:
    """A token column as counts; None when a row lacks one (a recorded column is then recounted)."""
    if all(v is not None for v in values):
        return np.array([int(v) for v in values], dtype=np.int64)
    if how == "declared_column":
        raise InputError(f"{why_path}: `tokens: column`, but some rows have no `{column}`; use `tokens: auto`")
    return None


def index_source(sf: SourceFiles, src: MixSource, counting: Counting | None) -> SourceIndex:
    """First pass: row positions and token counts in the mixture's unit (``counting``; None: rows only).

    Parquet: only the token or text column is read (and image nulls where statistics show some).
    """
    file_idx, row_idx, tokens = [], [], []
    tokens_from: dict[str, int] = {}
    texts_counted: list[str] = []
    for fi, path in enumerate(sf.files):
        rec = sf.recorded[fi]
        where = f"mixture source {sf.name!r}: {path}"
        if sf.format == "parquet":
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if rows.IMAGE not in names:
                    raise InputError(f"{path}: no `{rows.IMAGE}` column (mixtures copy image bytes; "
                                     "mix a run's parquet shards or tars, not its ledger)")
                n = pf.metadata.num_rows
                t = None
                if counting is not None:
                    how, text, why = counting.decide(src, rec, names)
                    col = counting.token_column
                    if how != "recount" and col not in names:
                        raise InputError(f"{where}: `tokens: column`, but it has no `{col}` column")
                    if how != "recount":
                        t = _column_tokens(pf.read(columns=[col])[col].to_pylist(), how, where, col)
                        if t is None:
                            how, why = "recount", f"mixture source {sf.name!r} has rows without `{col}`"
                    if t is None:
                        if text not in names:
                            raise InputError(f"{where}: no `{text}` column to count tokens of (columns: "
                                             f"{', '.join(names)}); set the source's `text_column`")
                        t = counting.count_parquet(pf, text, why)
        else:
            t = None
            col = counting.token_column if counting is not None else ""
            candidates = {c for c in (src.text_column, rec.text_column if rec else None,
                                      counting.caption_column if counting else None, rows.CAPTION) if c}
            values: list[Any] = []
            texts: dict[str, list[Any]] = {c: [] for c in candidates}
            has_image: list[bool] = []
            common: set[str] | None = None
            for sample in tar_samples(path):  # streamed: only counts and texts are kept, not images
                r = tar_row(sample)
                common = set(r) if common is None else common & set(r)
                values.append(r.get(col))
                has_image.append(r.get(rows.IMAGE) is not None)
                for c in candidates:
                    texts[c].append(r.get(c))
            n = len(values)
            if counting is not None:
                columns = sorted(common or ())
                how, text, why = counting.decide(src, rec, columns)
                if how != "recount":
                    t = _column_tokens(values, how, where, col)
                    if t is None:
                        how, why = "recount", f"mixture source {sf.name!r} has samples without `{col}`"
                if t is None:
                    if n and all(v is None for v in texts[text]):
                        raise InputError(f"{where}: no `{text}` to count tokens of; set the source's `text_column`")
                    t = counting.count(texts[text], np.array(has_image, dtype=bool), why)
        if counting is not None:
            tokens_from[how] = tokens_from.get(how, 0) + 1
            counted = text if how == "recount" else rec.text_column if how == "recorded_column" and rec else None
            if counted and counted not in texts_counted:
                texts_counted.append(counted)
            tokens.append(t)
        file_idx.append(np.full(n, fi, dtype=np.int32))
        row_idx.append(np.arange(n, dtype=np.int32))
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))  # noqa: E731
    return SourceIndex(sf, cat(file_idx, np.int32), cat(row_idx, np.int32),
                       cat(tokens, np.int64) if counting is not None else None, tokens_from, texts_counted)


def read_rows(sf: SourceFiles, fi: int, wanted: np.ndarray) -> Iterator[pa.Table]:
    """Rows ``wanted`` (sorted positions) of file ``fi``, in batches, reading only the row groups needed."""
    path = sf.files[fi]
    if sf.format == "parquet":
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            start = 0
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                lo, hi = np.searchsorted(wanted, [start, start + n])
                if hi > lo:
                    yield pf.read_row_group(rg).take(pa.array(wanted[lo:hi] - start))
                start += n
        return
    wanted_set = set(wanted.tolist())
    batch: list[dict[str, Any]] = []
    for pos, sample in enumerate(tar_samples(path)):
        if pos in wanted_set:
            batch.append(tar_row(sample))
            if len(batch) >= READ_BATCH_ROWS:
                yield pa.Table.from_pylist(batch)
                batch = []
    if batch:
        yield pa.Table.from_pylist(batch)
