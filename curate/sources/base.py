"""Sources: turn an input location into numbered shards and stream each shard's rows.

A source is planned once on the driver (``plan``), which returns JSON-able shard
specs; ``read_shard`` then runs on any Ray worker and yields Arrow batches with
``key``, ``url``, ``caption``, carried-through columns and, for sources that
already hold images, ``image`` / ``image_format`` / ``sha256``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Literal

import fsspec
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from curate import rows
from curate.errors import InputError

#: The download stage's cap on a body (``download.max_bytes``): the same default for a tar member.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024

SOURCE_FORMATS = ("auto", "parquet", "csv", "tsv", "json", "jsonl", "txt", "webdataset")


class SourceConfig(BaseModel):
    """Where the samples come from: a URL list, WebDataset tars, or Parquet with image bytes."""

    model_config = ConfigDict(extra="forbid")
    path: str | list[str] = Field(description="File, folder or glob; any fsspec URL (s3://, memory://).")
    format: Literal[SOURCE_FORMATS] = "auto"  # type: ignore[valid-type]
    url_col: str = "url"
    caption_col: str | None = "caption"
    image_col: str = Field("image", description="Parquet sources: column with image bytes.")
    key_col: str | None = Field(None, description="Use this input column as the sample key.")
    columns: list[str] | None = Field(
        None, description="Input columns to carry through to the outputs; default: all of them."
    )
    max_bytes: int = Field(
        DEFAULT_MAX_BYTES, ge=1,
        description="WebDataset sources: largest tar member read, in bytes (default 20 MiB, the download "
                    "stage's body cap). A sample with a larger member (image, caption, JSON) is dropped "
                    "with the reason `too_large`; the member's data is skipped (a seek), never read.",
    )


URL_LIST_EXTS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "json",
    ".txt": "txt",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")


def strip_compression(path: str) -> str:
    for c in COMPRESSIONS:
        if path.endswith(c):
            return path[: -len(c)]
    return path


def detect_format(path: str) -> str:
    base = strip_compression(path.lower())
    if base.endswith(".tar"):
        return "webdataset"
    for ext, fmt in URL_LIST_EXTS.items():
        if base.endswith(ext):
            return fmt
    raise InputError(
        f"{path}: cannot tell the format from the file name; set source.format to one of "
        "parquet, csv, tsv, json, jsonl, txt, webdataset"
    )


def expand_paths(path: str | list[str]) -> list[str]:
    """Files named by a path, folder or glob (sorted, so shard numbering is stable)."""
    specs = [path] if isinstance(path, str) else list(path)
    out: list[str] = []
    for spec in specs:
        fs, _, _ = fsspec.get_fs_token_paths(spec)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if any(ch in spec for ch in "*?["):
            found = sorted(fs.glob(spec))
        elif fs.isdir(spec):
            found = sorted(
                p for p in fs.find(spec)
                if not p.rsplit("/", 1)[-1].startswith((".", "_"))
                and _known_ext(p)
            )
        elif fs.exists(spec):
            found = [spec]
        else:
            raise InputError(f"source.path: {spec} does not exist")
        if not found:
            raise InputError(f"source.path: {spec} matches no input files")
        out += [f if (prefix == "" or f.startswith(prefix)) else prefix + f for f in found]
    return out


def _known_ext(p: str) -> bool:
    base = strip_compression(p.lower())
    return base.endswith(".tar") or any(base.endswith(e) for e in URL_LIST_EXTS)


def sha256_hex(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def rename_reserved(table: pa.Table, keep: set[str]) -> pa.Table:
    """Input columns that clash with pipeline columns are carried as ``source_<name>``."""
    names = [
        (f"source_{n}" if n in rows.RESERVED and n not in keep else n) for n in table.column_names
    ]
    return table.rename_columns(names)


def base_columns(n: int) -> dict[str, pa.Array]:
    return {
        rows.STATUS: pa.array([rows.KEPT] * n, pa.string()),
        rows.DROPPED_BY: pa.nulls(n, pa.string()),
        rows.REASON: pa.nulls(n, pa.string()),
    }


class Source(ABC):
    """A kind of input. Built from :class:`SourceConfig` by :func:`curate.sources.registry.make_source`."""

    def __init__(self, config: SourceConfig, files: list[str]) -> None:
        self.config = config
        self.files = files

    @abstractmethod
    def validate(self) -> None:
        """Fail before any work if a file is unreadable or lacks a required column."""

    @abstractmethod
    def plan(self, work_dir: str, samples_per_shard: int) -> list[dict[str, Any]]:
        """Split the input into shards; return one JSON-able spec per shard (with ``shard``)."""

    @abstractmethod
    def read_shard(self, spec: dict[str, Any], batch_rows: int) -> Iterator[pa.Table]:
        """Yield the shard's rows in batches (only the unit's rows for a spec from :meth:`split`)."""

    def split(self, spec: dict[str, Any], unit_rows: int) -> list[dict[str, Any]]:
        """Work units of one planned shard, read by separate tasks so that every worker takes part
        whatever ``samples_per_shard`` is. A unit keeps the shard's ``shard`` and ``rows`` and adds
        ``unit`` = [first row, rows]; the shard then commits once ``rows`` rows are back. The default,
        for sources that learn a shard's size only by reading it (tars), is the whole shard."""
        return [spec]
