"""Existing WebDataset tars as a source: one input shard per tar, samples grouped by key.

Members are read as a stream (``tarfile`` in ``r|`` mode through fsspec), never
extracted to disk, so absolute or ``..`` member names cannot write anywhere;
they are only used as keys.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa

from curate import rows
from curate.errors import InputError
from curate.sources.base import Source, base_columns, sha256_hex

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the basename, ext = the rest."""
    if "/" in name:
        d, base = name.rsplit("/", 1)
        d += "/"
    else:
        d, base = "", name
    if "." not in base:
        return d + base, ""
    stem, ext = base.split(".", 1)
    return d + stem, ext.lower()


def iter_samples(path: str) -> Iterator[dict[str, bytes]]:
    """Yield {"__key__": key, ext: bytes, ...} for consecutive members sharing a key."""
    current: dict[str, Any] | None = None
    with fsspec.open(path, "rb", compression="infer") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            if key.startswith("/") or ".." in key.split("/"):
                key = key.replace("..", "_").lstrip("/")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current


class WebDatasetSource(Source):
    def validate(self) -> None:
        for path in self.files:
            try:
                with fsspec.open(path, "rb", compression="infer") as f:
                    tarfile.open(fileobj=f, mode="r|*").next()
            except (tarfile.TarError, OSError) as e:
                raise InputError(f"{path}: not a readable tar file: {e}") from e

    def plan(self, work_dir: str, samples_per_shard: int) -> list[dict[str, Any]]:
        return [{"shard": i, "kind": "webdataset", "path": p} for i, p in enumerate(self.files)]

    def read_shard(self, spec: dict[str, Any], batch_rows: int) -> Iterator[pa.Table]:
        buf: list[dict[str, Any]] = []
        for sample in iter_samples(spec["path"]):
            buf.append(self._row(sample))
            if len(buf) >= batch_rows:
                yield _table(buf)
                buf = []
        if buf:
            yield _table(buf)

    def _row(self, sample: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {rows.KEY: sample["__key__"]}
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                if not isinstance(meta, dict):
                    meta = {}
            except ValueError:
                meta = {}
        cap_ext = "txt"
        caption = sample.get(cap_ext)
        row[rows.CAPTION] = caption.decode("utf-8", errors="replace") if caption is not None else meta.get("caption")
        row[rows.URL] = meta.get(self.config.url_col) if isinstance(meta.get(self.config.url_col), str) else None
        for ext in IMAGE_EXTS:
            if ext in sample:
                row[rows.IMAGE] = sample[ext]
                row[rows.IMAGE_FORMAT] = ext
                row[rows.SHA256] = sha256_hex(sample[ext])
                break
        else:
            row[rows.IMAGE] = None
            row[rows.IMAGE_FORMAT] = None
            row[rows.SHA256] = None
            row["_missing_image"] = True
        for k, v in meta.items():
            if k in (self.config.url_col, "caption", "key"):
                continue
            if self.config.columns is not None and k not in self.config.columns:
                continue
            name = f"source_{k}" if k in rows.RESERVED else k
            row[name] = v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)
        return row


def _table(buf: list[dict[str, Any]]) -> pa.Table:
    names: dict[str, None] = {}
    for r in buf:
        names.update(dict.fromkeys(r))
    cols: dict[str, pa.Array] = {}
    fixed = {rows.KEY: pa.string(), rows.URL: pa.string(), rows.CAPTION: pa.string(), rows.IMAGE: pa.binary(),
             rows.IMAGE_FORMAT: pa.string(), rows.SHA256: pa.string()}
    for n in names:
        if n == "_missing_image":
            continue
        vals = [r.get(n) for r in buf]
        if n in fixed:
            cols[n] = pa.array(vals, fixed[n])
        else:
            try:
                cols[n] = pa.array(vals)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                cols[n] = pa.array([None if v is None else str(v) for v in vals], pa.string())
            # an all-null column stays null-typed: it promotes to whatever type other batches have
    t = pa.table(cols)
    for name, arr in base_columns(t.num_rows).items():
        t = t.append_column(name, arr)
    missing = [r.get("_missing_image", False) for r in buf]
    if any(missing):
        t = rows.mark_dropped(t, ["image_missing" if m else None for m in missing], "source")
    return t
