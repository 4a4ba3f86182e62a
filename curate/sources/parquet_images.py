"""Parquet files that already hold image bytes (an earlier curate or img2dataset-style export).

One input shard per group of row groups of about ``samples_per_shard`` rows, so a
large file is split without being read on the driver. The image column may be
binary or a Hugging Face style struct ``{bytes, path}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curate import rows
from curate.errors import InputError
from curate.sources.base import Source, base_columns, rename_reserved, sha256_hex
from curate.sources.urllist import make_key


class ParquetImageSource(Source):
    def validate(self) -> None:
        cfg = self.config
        for path in self.files:
            try:
                with fsspec.open(path, "rb") as f:
                    names = pq.ParquetFile(f).schema_arrow.names
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{path}: not a readable Parquet file: {e}") from e
            missing = [c for c in [cfg.image_col] + ([cfg.key_col] if cfg.key_col else []) if c not in names]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing}; the file has: {', '.join(names)}")
        if cfg.key_col:  # one small column per file: lineage and dedup join on keys, so they must be unique
            seen: set[str] = set()
            for path in self.files:
                with fsspec.open(path, "rb") as f:
                    for k in pq.read_table(f, columns=[cfg.key_col])[cfg.key_col].to_pylist():
                        k = rows.safe_key(str(k)) if k is not None else None
                        if k is None or k in seen:
                            raise InputError(f"{path}: source.key_col {cfg.key_col!r} has "
                                             f"{'an empty' if k is None else 'a repeated'} key {k!r}; keys must be unique")
                        seen.add(k)

    def plan(self, work_dir: str, samples_per_shard: int) -> list[dict[str, Any]]:
        specs: list[dict[str, Any]] = []
        for path in self.files:
            with fsspec.open(path, "rb") as f:
                md = pq.ParquetFile(f).metadata
            group: list[int] = []
            count = 0
            for rg in range(md.num_row_groups):
                group.append(rg)
                count += md.row_group(rg).num_rows
                if count >= samples_per_shard:
                    specs.append({"shard": len(specs), "kind": "parquet", "path": path, "row_groups": group,
                                  "spp": samples_per_shard})
                    group, count = [], 0
            if group:
                specs.append({"shard": len(specs), "kind": "parquet", "path": path, "row_groups": group,
                              "spp": samples_per_shard})
        return specs

    def read_shard(self, spec: dict[str, Any], batch_rows: int) -> Iterator[pa.Table]:
        cfg = self.config
        idx = 0
        with fsspec.open(spec["path"], "rb") as f:
            pf = pq.ParquetFile(f)
            for b in pf.iter_batches(batch_size=batch_rows, row_groups=spec["row_groups"]):
                t = pa.Table.from_batches([b])
                n = t.num_rows
                img = t[cfg.image_col]
                if pa.types.is_struct(img.type):
                    img = pa.chunked_array([c.field("bytes") for c in img.chunks]) if img.num_chunks else pa.nulls(n, pa.binary())
                images = img.cast(pa.binary()).to_pylist()
                if cfg.key_col:
                    keys = [None if k is None else rows.safe_key(str(k)) for k in t[cfg.key_col].to_pylist()]
                else:
                    keys = [make_key(spec["shard"], idx + i, spec["spp"]) for i in range(n)]
                idx += n
                fmt = t["image_format"] if "image_format" in t.column_names else None
                out = {
                    rows.KEY: pa.array(keys, pa.string()),
                    rows.URL: t[cfg.url_col].cast(pa.string()) if cfg.url_col in t.column_names else pa.nulls(n, pa.string()),
                    rows.CAPTION: t[cfg.caption_col].cast(pa.string()) if cfg.caption_col and cfg.caption_col in t.column_names else pa.nulls(n, pa.string()),
                    rows.IMAGE: pa.array(images, pa.binary()),
                    rows.IMAGE_FORMAT: fmt.cast(pa.string()) if fmt is not None else pa.array([_sniff(x) for x in images], pa.string()),
                    rows.SHA256: pa.array([sha256_hex(x) for x in images], pa.string()),
                }
                used = {cfg.image_col, cfg.url_col, cfg.caption_col, cfg.key_col, "image_format"}
                extra = [c for c in t.column_names if c not in used]
                if cfg.columns is not None:
                    extra = [c for c in extra if c in cfg.columns]
                carried = rename_reserved(t.select(extra), keep=set())
                table = pa.table(out)
                for name in carried.column_names:
                    table = table.append_column(name, carried[name])
                for name, arr in base_columns(n).items():
                    table = table.append_column(name, arr)
                table = rows.mark_dropped(table, ["image_missing" if x is None else None for x in images], "source")
                yield table


def _sniff(data: bytes | None) -> str | None:
    if data is None:
        return None
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"

