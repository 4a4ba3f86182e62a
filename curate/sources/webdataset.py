"""Existing WebDataset tars as a source: one input shard per tar, samples grouped by key.

Members are read as a stream (``tarfile`` in ``r|`` mode through fsspec), never
extracted to disk, so absolute or ``..`` member names cannot write anywhere.
Their keys are still made safe (:func:`curate.fsutil.safe_member_path`), because keys
become member names of the output tars. Links and device files are never
followed or read: a sample whose image was one is dropped with the reason
``tar_link_member`` / ``tar_special_member``. A member larger than
``source.max_bytes`` (default 20 MiB) is never read: its data is skipped (a seek
on an uncompressed tar, streamed past in 1 MiB reads on a compressed one) and its
sample is dropped with ``too_large``. A key that an earlier sample of the same
tar already had (not next to it) is dropped with ``duplicate_key`` under the key
``<key>_dup<n>``, so the ledger holds every sample once. A tar that breaks mid-stream fails
the run with an error naming the file and the last good member.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa

from curate import rows
from curate.errors import InputError
from curate.fsutil import safe_member_path
from curate.sources.base import (
    DEFAULT_MAX_BYTES,
    Source,
    base_columns,
    sha256_hex,
    strip_compression,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: Sample field naming why a member of the sample was skipped (a link or a device file).
SKIPPED = "__skipped__"
LINK_REASON = "tar_link_member"
SPECIAL_REASON = "tar_special_member"
#: Sample field set when one of its members was larger than ``source.max_bytes`` (never read).
TOO_LARGE = "__too_large__"
TOO_LARGE_REASON = "too_large"
#: Read size of the stream reader for compressed tars: skipping a large member reads this much at a time.
STREAM_BUFSIZE = 1 << 20
#: Reason of a sample whose key an earlier sample of the same tar already has (not next to it).
DUPLICATE_KEY_REASON = "duplicate_key"


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


def _skip_reason(member: tarfile.TarInfo) -> str | None:
    """Why a member is not read as data: links point elsewhere, devices and FIFOs are not files."""
    if member.issym() or member.islnk():
        return LINK_REASON
    if member.ischr() or member.isblk() or member.isfifo():
        return SPECIAL_REASON
    return None


class CorruptHeader(Exception):
    """A member header that is not one (bad checksum, cut short) after the first: tarfile would end the
    archive there without a word, losing every sample after it; curate fails the shard instead."""


class _StrictTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            if tar.offset:  # at offset 0 tarfile raises ReadError itself
                raise CorruptHeader(f"no valid member header at byte {tar.offset}: {e}") from None
            raise


def _open_tar(path: str, f: Any) -> tarfile.TarFile:
    """An uncompressed, seekable tar is opened for random access, so a skipped member is one seek
    (on object storage: no bytes fetched); anything else as a stream."""
    seekable = getattr(f, "seekable", lambda: False)()
    if seekable and strip_compression(path.lower()) == path.lower():
        return tarfile.open(fileobj=f, mode="r:*", tarinfo=_StrictTarInfo)
    return tarfile.open(fileobj=f, mode="r|*", bufsize=STREAM_BUFSIZE, tarinfo=_StrictTarInfo)


def iter_samples(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[dict[str, bytes]]:
    """Yield {"__key__": key, ext: bytes, ...} for consecutive members sharing a key.

    A member over ``max_bytes`` is not read; its sample gets ``TOO_LARGE`` (the member's name).
    """
    current: dict[str, Any] | None = None
    last = "(start of file)"
    try:
        with fsspec.open(path, "rb", compression="infer") as f, _open_tar(path, f) as tar:
            for member in tar:
                if member.isdir():
                    continue
                raw_key, ext = split_member(member.name)
                key = safe_member_path(raw_key)
                if key != raw_key:
                    log.warning("%s: member %r has an unsafe path; its key is %r", path, member.name, key)
                reason = _skip_reason(member)
                if reason is None and not member.isfile():
                    reason = SPECIAL_REASON  # any other member type tarfile knows: not plain data either
                data = None
                too_large = reason is None and member.size > max_bytes
                if too_large:
                    log.warning("%s: member %r is %d bytes, over source.max_bytes=%d: not read",
                                path, member.name, member.size, max_bytes)
                elif reason is None:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                else:
                    log.warning("%s: skipped member %r (%s)", path, member.name, reason)
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                if too_large:
                    current[TOO_LARGE] = member.name
                elif data is not None:
                    current[ext] = data
                elif ext in IMAGE_EXTS:
                    current[SKIPPED] = reason
                last = member.name
    except (tarfile.TarError, CorruptHeader, EOFError, OSError, zlib.error) as e:
        raise InputError(f"{path}: unreadable tar after member {last!r}: {e.__class__.__name__}: {e}") from e
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
        seen: set[str] = set()
        for sample in iter_samples(spec["path"], self.config.max_bytes):
            row = self._row(sample)
            key = row[rows.KEY]
            if key in seen:  # keys join lineage and dedup: a repeat is dropped and renamed, never merged
                n = 1
                while f"{key}_dup{n}" in seen:
                    n += 1
                log.warning("%s: key %r appears again (not next to its first members); that sample is dropped "
                            "as %s under the key %r", spec["path"], key, DUPLICATE_KEY_REASON, f"{key}_dup{n}")
                row[rows.KEY] = f"{key}_dup{n}"
                row["_missing_image"] = DUPLICATE_KEY_REASON
            seen.add(row[rows.KEY])
            buf.append(row)
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
            row["_missing_image"] = sample.get(SKIPPED, "image_missing")
        if TOO_LARGE in sample:  # whatever else the sample holds: one of its members was never read
            row["_missing_image"] = TOO_LARGE_REASON
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
    missing = [r.get("_missing_image") for r in buf]  # None, or the reason the image is missing
    if any(missing):
        t = rows.mark_dropped(t, missing, "source")
    return t
