"""The sources of a mixture: which files a source names (a curate output's manifest, files, folders,
globs), their rows' positions and token counts (a first pass without image bytes), and reading
chosen rows back.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from curate import rows
from curate.errors import InputError
from curate.mix.model import MANIFEST_FILE, RUN_MANIFEST, MixSource

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4  # BPE tokenizers average about 4 UTF-8 bytes per token on English text
APPROX_TOKENS = f"approx: utf-8 bytes of the caption / {BYTES_PER_TOKEN}"
READ_BATCH_ROWS = 1024  # rows per batch read from a source: bounded memory, few read calls


@dataclass
class SourceFiles:
    """The files of one source and how to read them."""

    name: str
    files: list[str]
    format: Literal["parquet", "webdataset"]


def resolve_source(src: MixSource) -> SourceFiles:
    """A curate output folder → its manifest's shards (Parquet preferred); else files, folders, globs.

    An earlier mixture's output is read through its ``mixture_manifest.json`` the same way.
    """
    paths = src.path if isinstance(src.path, list) else [src.path]
    files: list[str] = []
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
            files += [full(f"{root}/{s['path']}") for s in shards if s["format"] == pick]
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
    return SourceFiles(src.name, files, fmt)


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


def _approx_tokens(captions: list[str | None]) -> np.ndarray:
    return np.array([max(1, math.ceil(len((c or "").encode("utf-8")) / BYTES_PER_TOKEN)) for c in captions],
                    dtype=np.int64)


@dataclass
class SourceIndex:
    """Per row of a source: its file, its position in the file, its token count."""

    files: SourceFiles
    file_idx: np.ndarray
    row_idx: np.ndarray
    tokens: np.ndarray
    tokens_exact: bool

    @property
    def rows(self) -> int:
        return len(self.row_idx)


def index_source(sf: SourceFiles, token_column: str) -> SourceIndex:
    """First pass: row positions and token counts only (no image bytes for Parquet)."""
    file_idx, row_idx, tokens = [], [], []
    exact = True
    for fi, path in enumerate(sf.files):
        if sf.format == "parquet":
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if rows.IMAGE not in names:
                    raise InputError(f"{path}: no `{rows.IMAGE}` column (mixtures copy image bytes; "
                                     "mix a run's parquet shards or tars, not its ledger)")
                col = token_column if token_column in names else rows.CAPTION
                if col not in names:
                    raise InputError(f"{path}: neither `{token_column}` nor `{rows.CAPTION}` to count tokens")
                values = pf.read(columns=[col])[col].to_pylist()
            if col == token_column:
                t = np.array([int(v or 0) for v in values], dtype=np.int64)
            else:
                exact = False
                t = _approx_tokens(values)
        else:
            t_list: list[int | None] = []
            caps: list[str | None] = []
            for s in tar_samples(path):
                r = tar_row(s)
                t_list.append(r.get(token_column))
                caps.append(r.get(rows.CAPTION))
            if all(v is not None for v in t_list):
                t = np.array(t_list, dtype=np.int64)
            else:
                exact = False
                t = _approx_tokens(caps)
        file_idx.append(np.full(len(t), fi, dtype=np.int32))
        row_idx.append(np.arange(len(t), dtype=np.int32))
        tokens.append(t)
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))  # noqa: E731
    return SourceIndex(sf, cat(file_idx, np.int32), cat(row_idx, np.int32), cat(tokens, np.int64), exact)


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
