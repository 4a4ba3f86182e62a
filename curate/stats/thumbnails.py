"""Thumbnails of what each filter dropped and kept: which rows, how they are drawn, how samples merge.

"What did each filter throw away?" is answered with pictures: up to :data:`PER_REASON`
rows per (stage, reason), :data:`KEPT` kept rows, and for the dedup stages each sampled
copy beside the kept row it was dropped against (``duplicate_of``). The rows are a
*bottom-k* sample: per group, the k rows with the smallest seeded hash of their key
(:func:`sample_hash`). That set depends on the keys alone, so every worker can keep its
own k smallest, write them beside its part files, and the merge (:func:`merge`, the k
smallest overall) gives the same rows whatever the number of workers, the batches or the
order they ran in, and whatever a resumed run redid.

A thumbnail is a :data:`THUMB_PX`-pixel JPEG (:func:`make_thumbnail`; JPEG sources are
decoded in Pillow's draft mode, at 1/2-1/8 scale in the DCT domain). Rows without image
bytes (dropped by ``download`` itself, or an undecodable image) are kept as text-only
entries: key, caption, URL, reason and the stage's fields.

The engine draws the samples (:mod:`curate.engine.samples`) and merges them into
``OUTPUT/_work/samples.parquet`` (:data:`SAMPLES_FILE`); ``stats.json`` lists the
entries (:func:`gallery`) and ``report.html`` embeds the thumbnails as ``data:`` URIs
(:func:`thumbnail_uris`). This module imports only pyarrow and Pillow: the engine's
workers import it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

#: Changing the seed draws another sample; the sample of a run never changes with it fixed.
SEED = b"curate-thumbnails-1"
#: Rows shown per (stage, reason), and kept rows shown.
PER_REASON = 8
KEPT = 16
#: Longer side of a thumbnail (pixels) and its JPEG quality: ~2-4 KB each.
THUMB_PX = 96
THUMB_QUALITY = 75
#: Images larger than this (from the header) are not decoded for a thumbnail: a text-only entry.
MAX_PIXELS = 50_000_000
#: Longest caption, URL and text field kept in a sample.
TEXT_CHARS = 300
#: Merged samples of a finished run, relative to its output root.
SAMPLES_FILE = "_work/samples.parquet"

DROPPED, KEPT_ROLE, ORIGINAL = "dropped", "kept", "original"
#: What a sample record holds. ``stage`` and ``reason`` are null for kept rows; ``pair`` is the kept
#: key a duplicate was dropped against (role ``dropped``) or the copy an ``original`` is shown beside.
SCHEMA = pa.schema([
    ("key", pa.string()), ("hash", pa.uint64()), ("stage", pa.string()), ("reason", pa.string()),
    ("role", pa.string()), ("pair", pa.string()), ("caption", pa.string()), ("url", pa.string()),
    ("fields", pa.string()), ("thumbnail", pa.binary()), ("image", pa.binary()),
])
#: A worker stores a candidate's image bytes up to this size and leaves the thumbnail to the merge,
#: which makes one only for the rows it chooses; a larger image is thumbnailed at once.
RAW_BYTES = 512 * 1024


def sample_hash(key: str) -> int:
    """The key's seeded 64-bit hash: its rank in every bottom-k sample (smaller = sampled first)."""
    return int.from_bytes(hashlib.blake2b(str(key).encode("utf-8", "surrogatepass"), digest_size=8,
                                          key=SEED).digest(), "big")


def hashes(keys: Iterable[Any]) -> list[int]:
    return [sample_hash(k) for k in keys]


def make_thumbnail(data: bytes | None, size: int = THUMB_PX) -> bytes | None:
    """A JPEG whose longer side is at most ``size``; None when the bytes are no decodable image."""
    if not data:
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, truncated-file and EXIF noise
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > MAX_PIXELS:
                return None
            if im.format == "JPEG":
                im.draft("RGB" if im.mode in ("RGB", "YCbCr", "CMYK") else im.mode, (size, size))
            im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            elif im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=THUMB_QUALITY)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - untrusted bytes: any failure is a text-only entry
        return None


def short(text: Any, limit: int = TEXT_CHARS) -> str | None:
    if text is None:
        return None
    s = str(text)
    return s if len(s) <= limit else s[:limit - 1] + "…"


def json_value(v: Any) -> Any:
    """A field's value as stats.json can hold it (finite numbers, short text), or None."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    if isinstance(v, str):
        return short(v, 120)
    return None


def is_field_type(t: pa.DataType) -> bool:
    """Columns shown beside a thumbnail: scalars (numbers, booleans, text); never lists or bytes."""
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t))


def records_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{name: r.get(name) for name in SCHEMA.names} for r in records], schema=SCHEMA)


def image_or_thumbnail(data: bytes | None) -> dict[str, bytes | None]:
    """A candidate's picture as a worker stores it: the bytes (thumbnailed by the merge, and only if
    chosen) or, above :data:`RAW_BYTES`, the thumbnail made now."""
    if data is not None and len(data) > RAW_BYTES:
        return {"thumbnail": make_thumbnail(data), "image": None}
    return {"thumbnail": None, "image": data}


def _has_picture(r: dict[str, Any]) -> bool:
    return r["thumbnail"] is not None or r["image"] is not None


def merge(tables: Sequence[pa.Table], *, per_reason: int = PER_REASON, kept: int = KEPT,
          all_originals: bool = False) -> pa.Table:
    """The k smallest hashes per (stage, reason) over every sample, kept rows apart, and each chosen
    duplicate's original (every original with ``all_originals``: a merge of one shard's samples,
    whose copies may lie in other shards). Input order never matters: ties are broken by key.
    Chosen rows that hold image bytes are thumbnailed here."""
    seen: dict[tuple, dict[str, Any]] = {}
    for t in tables:
        for name in SCHEMA.names:
            if name not in t.column_names:  # samples written before a column existed
                t = t.append_column(name, pa.nulls(t.num_rows, SCHEMA.field(name).type))
        for r in t.select(SCHEMA.names).cast(SCHEMA).to_pylist():
            ident = (r["stage"], r["reason"], r["role"], r["key"], r["pair"])
            old = seen.get(ident)
            if old is None or (not _has_picture(old) and _has_picture(r)):
                seen[ident] = r
    groups: dict[tuple, list[dict[str, Any]]] = {}
    originals: list[dict[str, Any]] = []
    for r in seen.values():
        if r["role"] == ORIGINAL:
            originals.append(r)
        else:
            groups.setdefault((r["stage"], r["reason"], r["role"]), []).append(r)
    out: list[dict[str, Any]] = []
    chosen: set[tuple] = set()
    for (stage, reason, role), rs in sorted(groups.items(), key=lambda kv: tuple(x or "" for x in kv[0])):
        for r in sorted(rs, key=lambda r: (r["hash"], r["key"]))[:kept if role == KEPT_ROLE else per_reason]:
            out.append(r)
            chosen.add((stage, reason, r["key"]))
    out += sorted((r for r in originals if all_originals or (r["stage"], r["reason"], r["pair"]) in chosen),
                  key=lambda r: (r["stage"] or "", r["reason"] or "", r["pair"] or "", r["key"]))
    thumbs: dict[bytes, bytes | None] = {}  # a copy and its original often share their bytes
    for r in out:
        if r["thumbnail"] is None and r["image"] is not None:
            if r["image"] not in thumbs:
                thumbs[r["image"]] = make_thumbnail(r["image"])
            r["thumbnail"] = thumbs[r["image"]]
        r["image"] = None
    return pa.Table.from_pylist(out, schema=SCHEMA)


# ------------------------------------------------------------------ reading, for stats and the report


def read_samples(root: str) -> pa.Table | None:
    """The merged samples of the run in ``root``, or None (thumbnails off, or an older run)."""
    import fsspec
    import pyarrow.parquet as pq

    path = f"{root.rstrip('/')}/{SAMPLES_FILE}"
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return pq.read_table(f)


def gallery(table: pa.Table | None, funnel_counts: dict[tuple[str | None, str | None], int]) -> list[dict[str, Any]]:
    """Gallery groups for ``stats.json``: per (stage, reason) in funnel order, then the kept rows.

    ``funnel_counts`` maps (stage, reason) to rows dropped, in the order the report lists them
    ((None, None): kept rows). A duplicate's entry holds its ``original``.
    """
    if table is None or table.num_rows == 0:
        return []
    recs = table.drop(["thumbnail"]).to_pylist()
    has_thumb = table["thumbnail"].is_valid().to_pylist()
    originals: dict[tuple, dict[str, Any]] = {}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r, thumb in zip(recs, has_thumb, strict=True):
        entry = {"key": r["key"], "caption": r["caption"], "url": r["url"],
                 "fields": json.loads(r["fields"]) if r["fields"] else {}, "thumbnail": bool(thumb)}
        if r["role"] == ORIGINAL:
            originals[(r["stage"], r["reason"], r["pair"])] = entry
        else:
            groups.setdefault((r["stage"], r["reason"]), []).append({**entry, "duplicate_of": r["pair"]})
    order = list(funnel_counts) + [g for g in groups if g not in funnel_counts]
    out = []
    for stage, reason in order:
        entries = groups.get((stage, reason))
        if not entries:
            continue
        for e in entries:
            e["original"] = originals.get((stage, reason, e["key"]))
        out.append({"stage": stage, "reason": reason, "rows": funnel_counts.get((stage, reason), 0),
                    "entries": entries})
    return out


def thumbnail_uris(table: pa.Table | None) -> dict[str, str]:
    """Key → ``data:image/jpeg;base64,…`` for every sampled row that has a thumbnail."""
    if table is None:
        return {}
    out = {}
    for key, thumb in zip(table["key"].to_pylist(), table["thumbnail"].to_pylist(), strict=True):
        if thumb is not None and key not in out:
            out[key] = "data:image/jpeg;base64," + base64.b64encode(thumb).decode("ascii")
    return out
