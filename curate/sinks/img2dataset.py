"""img2dataset's output layout, file for file: what ``curate img2dataset`` writes, and ``formats: [img2dataset]``.

For each shard, in ``write.img2dataset.output_folder`` (default: ``write.output`` itself;
``curate img2dataset`` runs the engine in ``OUTPUT/_curate`` and writes this layout to
``OUTPUT``)::

    NNNNN.tar            output_format webdataset: KEY.jpg, KEY.json, KEY.txt per downloaded sample
    NNNNN/               output_format files: the same three files per sample, in a folder
    NNNNN.parquet        webdataset/files: every row's metadata, failures included;
                         output_format parquet: the same rows plus the image bytes (column ``jpg``)
    NNNNN_stats.json     count, successes, failed_to_download, failed_to_resize, status_dict…

``NNNNN`` is the shard number padded to ``oom_shard_count`` digits, and keys follow
img2dataset's ``compute_key``: the shard number, then the row's index within the shard
padded to ``ceil(log10(number_sample_per_shard))`` digits. Each ``KEY.json`` and each
metadata row carry img2dataset's fields in its order: the additional columns, ``caption``,
``url``, ``key``, ``status`` (``success`` / ``failed_to_download`` / ``failed_to_resize``),
``error_message`` (curate's drop reason: ``http_404``, ``not_an_image``…), ``width``,
``height``, ``original_width``, ``original_height``, ``exif`` (when ``extract_exif``) and the
hash of the downloaded bytes (``compute_hash``, e.g. ``sha256``).

What differs from img2dataset: ``error_message`` holds curate's reasons rather than Python
exception texts, and ``exif`` is null unless the rows carry an ``exif`` column (the
``download`` stage does not keep the original bytes' EXIF yet; img2dataset writes ``"{}"`` for
an image without EXIF).

The sink's options come in its :class:`~curate.sinks.base.SinkContext` (``write.img2dataset``
and ``write.samples_per_shard``); a resumed run has the same recipe (the fingerprint guard), so
it writes what the first one did.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from curate import rows
from curate.net.image import FAILED_TO_RESIZE
from curate.sinks.base import ShardRows, ShardWrite, Sink, SinkContext, atomic_open
from curate.sinks.tar import TarWriter

OutputFormat = Literal["files", "webdataset", "parquet"]
HashName = Literal["sha256", "md5", "sha512"]
#: The stage whose reasons split into img2dataset's failed_to_download / failed_to_resize.
DOWNLOAD_STAGE = "download"


class Img2datasetOutput(BaseModel):
    """``write.img2dataset``: the options of the img2dataset layout (``formats: [img2dataset]``)."""

    model_config = ConfigDict(extra="forbid")
    output_folder: str | None = Field(None, description=(
        "Folder of the img2dataset layout; a relative path is relative to write.output "
        "(`..` for its parent). Default: write.output itself."))
    output_format: OutputFormat = Field("files", description="files | webdataset | parquet, as img2dataset.")
    oom_shard_count: int = Field(5, ge=1, description="Digits of the shard number in file names and keys.")
    caption: bool = Field(True, description="Put the caption in each row's metadata (img2dataset: caption_col set "
                          "and the input not txt).")
    save_caption: bool = Field(True, description="Write KEY.txt (img2dataset: caption_col set).")
    additional_columns: list[str] = Field(default_factory=list, description=(
        "Input columns written first in the metadata (img2dataset's save_additional_columns)."))
    extract_exif: bool = Field(True, description="Include the `exif` field.")
    encode_format: str = Field("jpg", description="Extension of KEY.<ext> and the image column of the parquet form.")
    compute_hash: HashName | None = Field("sha256", description=(
        "Field with the downloaded bytes' hash (the download stage's original_<hash> column)."))
    verify_hash_column: bool = Field(False, description=(
        "img2dataset's verify_hash was given: the hash field sits before `url` in the metadata schema."))


def i2d_key(index: int, shard: int, number_sample_per_shard: int, oom_shard_count: int) -> str:
    """img2dataset's ``compute_key`` (downloader.py): shard then index, zero-padded."""
    oom_sample = math.ceil(math.log10(number_sample_per_shard)) if number_sample_per_shard > 0 else 0
    return f"{(10 ** oom_sample) * shard + index:0{oom_sample + oom_shard_count}d}"


def resolve_folder(root: str, folder: str | None) -> str:
    """``folder`` relative to ``root`` (``..`` allowed, also behind a protocol), or as given if absolute."""
    if not folder:
        return root.rstrip("/")
    if "://" in folder or folder.startswith("/"):
        return folder.rstrip("/")
    proto, sep, path = root.rpartition("://")
    joined = posixpath.normpath(posixpath.join(path, folder))
    return f"{proto}{sep}{joined}" if sep else joined


def _status(dropped_by: str | None, reason: str | None) -> tuple[str, str | None]:
    if dropped_by is None:
        return "success", None
    reason = reason or "unknown"
    if dropped_by == DOWNLOAD_STAGE and (reason in FAILED_TO_RESIZE or reason.startswith(("image_", "decode"))):
        return "failed_to_resize", reason
    if dropped_by in (DOWNLOAD_STAGE, "source"):
        return "failed_to_download", reason
    return "filtered", f"{dropped_by}:{reason}"  # a later stage dropped it (recipes beyond the drop-in)


def _index(key: str, position: int, samples_per_shard: int) -> int:
    """The row's index in its input shard: the key's last digits (URL-list keys), else its position."""
    from curate.sources.urllist import key_widths

    _, width = key_widths(samples_per_shard)
    tail = key[-width:]
    return int(tail) if len(key) > width and key.isdigit() else position


class Img2datasetSink(Sink):
    """img2dataset's files for a shard: NNNNN.tar / NNNNN/ / NNNNN.parquet, and NNNNN_stats.json."""

    name = "img2dataset"

    def __init__(self, ctx: SinkContext) -> None:
        super().__init__(ctx)
        self._options = Img2datasetOutput.model_validate(ctx.img2dataset or {})

    def options(self) -> tuple[Img2datasetOutput, int]:
        return self._options, self.ctx.samples_per_shard

    def on_start(self) -> None:
        opts, _ = self.options()
        folder = resolve_folder(self.ctx.root, opts.output_folder)
        fs, path = fsspec.core.url_to_fs(folder)
        fs.makedirs(path, exist_ok=True)

    # ------------------------------------------------------------ one shard

    def write(self, shard: ShardRows) -> ShardWrite:
        opts, sps = self.options()
        folder = resolve_folder(self.ctx.root, opts.output_folder)
        name = f"{shard.shard:0{opts.oom_shard_count}d}"
        table = shard.table
        n = table.num_rows
        old_keys = table[rows.KEY].to_pylist() if n else []
        new_keys = [i2d_key(_index(k, i, sps), shard.shard, sps, opts.oom_shard_count) for i, k in enumerate(old_keys)]
        meta = self._metadata(table, new_keys, opts)
        key_of = dict(zip(old_keys, new_keys, strict=True))
        images: dict[str, bytes] = {}
        if shard.kept.num_rows:
            for k, img in zip(shard.kept[rows.KEY].to_pylist(), shard.kept[rows.IMAGE].to_pylist(), strict=True):
                if img is not None:
                    images[key_of[k]] = img
        captions = self._captions(table)
        files: list[str] = []
        if opts.output_format == "webdataset":
            files.append(self._write_tar(f"{folder}/{name}.tar", meta, images, captions, opts))
        elif opts.output_format == "files":
            self._write_files(f"{folder}/{name}", meta, images, captions, opts)
            files.append(f"{name}/")
        schema = self._schema(table, opts)
        if opts.output_format == "parquet":
            schema = schema.append(pa.field(opts.encode_format, pa.binary()))
            for m in meta:
                m[opts.encode_format] = images.get(m["key"])
        with atomic_open(f"{folder}/{name}.parquet") as f:
            pq.write_table(pa.Table.from_pylist(meta, schema=schema), f)
        files.append(f"{name}.parquet")
        files.append(self._write_stats(f"{folder}/{name}_stats.json", shard, meta))
        return ShardWrite(record={"img2dataset": {"folder": folder, "files": files,
                                                  "successes": len(images), "count": n}})

    def _captions(self, table: pa.Table) -> list[str | None]:
        col = self.ctx.caption_column
        return table[col].to_pylist() if col in table.column_names else [None] * table.num_rows

    def _input_column(self, name: str, table: pa.Table) -> str | None:
        """The rows' column holding input column ``name`` (sources carry reserved names as source_<name>)."""
        for c in (f"source_{name}" if name in rows.RESERVED else name, name):
            if c in table.column_names:
                return c
        return None

    def _metadata(self, table: pa.Table, keys: list[str], opts: Img2datasetOutput) -> list[dict[str, Any]]:
        """One dict per row, fields in img2dataset's order (downloader.py's ``meta``)."""
        n = table.num_rows

        def col(name: str | None) -> list[Any]:
            return table[name].to_pylist() if name and name in table.column_names else [None] * n

        extra = {c: col(self._input_column(c, table)) for c in opts.additional_columns}
        caption = col(self.ctx.caption_column)
        url = col(rows.URL)
        dropped_by, reason = col(rows.DROPPED_BY), col(rows.REASON)
        width, height = col("width"), col("height")
        ow, oh = col("original_width"), col("original_height")
        exif = col("exif")
        digest = col(f"original_{opts.compute_hash}") if opts.compute_hash else None
        out: list[dict[str, Any]] = []
        for i in range(n):
            status, error = _status(dropped_by[i], reason[i])
            ok = status == "success"
            m: dict[str, Any] = {c: v[i] for c, v in extra.items()}
            if opts.caption:
                m["caption"] = caption[i]
            m["url"] = url[i]
            m["key"] = keys[i]
            m["status"] = status
            m["error_message"] = error
            m["width"] = width[i] if ok else None
            m["height"] = height[i] if ok else None
            m["original_width"] = ow[i] if ok else None
            m["original_height"] = oh[i] if ok else None
            if opts.extract_exif:
                m["exif"] = exif[i] if ok else None
            if opts.compute_hash and digest is not None:
                m[opts.compute_hash] = digest[i] if ok else None
            out.append(m)
        return out

    def _schema(self, table: pa.Table, opts: Img2datasetOutput) -> pa.Schema:
        """img2dataset's metadata schema: the input columns it read, then its own fields."""
        fields = []
        for c in opts.additional_columns:
            src = self._input_column(c, table)
            typ = table.schema.field(src).type if src else pa.string()
            fields.append(pa.field(c, pa.string() if pa.types.is_null(typ) else typ))
        if opts.caption:
            fields.append(pa.field("caption", pa.string()))
        if opts.compute_hash and opts.verify_hash_column:
            fields.append(pa.field(opts.compute_hash, pa.string()))
        fields += [pa.field("url", pa.string()), pa.field("key", pa.string()), pa.field("status", pa.string()),
                   pa.field("error_message", pa.string()), pa.field("width", pa.int32()),
                   pa.field("height", pa.int32()), pa.field("original_width", pa.int32()),
                   pa.field("original_height", pa.int32())]
        if opts.extract_exif:
            fields.append(pa.field("exif", pa.string()))
        if opts.compute_hash and not opts.verify_hash_column:
            fields.append(pa.field(opts.compute_hash, pa.string()))
        return pa.schema(fields)

    @staticmethod
    def _members(meta: dict[str, Any], img: bytes, caption: str | None,
                 opts: Img2datasetOutput) -> list[tuple[str, bytes]]:
        """KEY.<ext>, KEY.json, KEY.txt: webdataset's TarWriter writes a sample's fields sorted by name."""
        key = meta["key"]
        members = [(f"{key}.{opts.encode_format}", img),
                   (f"{key}.json", json.dumps(meta, indent=4).encode())]
        if opts.save_caption:
            members.append((f"{key}.txt", (str(caption) if caption is not None else "").encode("utf-8")))
        return sorted(members, key=lambda m: m[0].rsplit(".", 1)[1])

    def _write_tar(self, path: str, meta: list[dict[str, Any]], images: dict[str, bytes],
                   captions: list[str | None], opts: Img2datasetOutput) -> str:
        with atomic_open(path) as f, TarWriter(f, mtime=int(time.time()), owner="img2dataset") as tar:
            for m, cap in zip(meta, captions, strict=True):
                img = images.get(m["key"])
                if img is not None:
                    for member, data in self._members(m, img, cap, opts):
                        tar.add(member, data)
        return path.rsplit("/", 1)[1]

    def _write_files(self, subfolder: str, meta: list[dict[str, Any]], images: dict[str, bytes],
                     captions: list[str | None], opts: Img2datasetOutput) -> None:
        fs, path = fsspec.core.url_to_fs(subfolder)
        if fs.exists(path):  # a shard written again (resume after a crash): no stale samples
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        for m, cap in zip(meta, captions, strict=True):
            img = images.get(m["key"])
            if img is not None:
                for member, data in self._members(m, img, cap, opts):
                    with fs.open(f"{path}/{member}", "wb") as f:
                        f.write(data)

    def _write_stats(self, path: str, shard: ShardRows, meta: list[dict[str, Any]]) -> str:
        """img2dataset's ``write_stats``: every row of the shard is counted once."""
        counts = {"success": 0, "failed_to_download": 0, "failed_to_resize": 0, "filtered": 0}
        status_dict: dict[str, int] = {}
        for m in meta:
            counts[m["status"]] += 1
            k = m["error_message"] or m["status"]
            status_dict[k] = status_dict.get(k, 0) + 1
        now = time.time()
        stats = {"count": len(meta), "successes": counts["success"],
                 "failed_to_download": counts["failed_to_download"], "failed_to_resize": counts["failed_to_resize"],
                 "duration": now - self.ctx.started, "start_time": self.ctx.started, "end_time": now,
                 "status_dict": status_dict}
        if counts["filtered"]:
            stats["filtered"] = counts["filtered"]
        with atomic_open(path) as f:
            f.write(json.dumps(stats, indent=4).encode())
        return path.rsplit("/", 1)[1]


__all__ = ["Img2datasetOutput", "Img2datasetSink", "i2d_key", "resolve_folder"]
