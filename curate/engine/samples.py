"""Thumbnail samples on a row's way through the engine (``write.thumbnails``; rows chosen as in
:mod:`curate.stats.thumbnails`: bottom-k by a seeded hash of the key).

Where each sample is drawn, always while the row still holds its image bytes:

- a map stage's drops: on the stage's worker right after the stage (:func:`sample_drops`, called
  by the adapters), from the input batch, since marking a row dropped releases its image. Each
  worker keeps, per (stage, shard, reason), the k smallest hashes it has seen and thumbnails only
  rows that enter them: a handful per batch at most, and fewer as the shard goes on.
- a global stage's drops: the driver sees every key, so it picks the k smallest per reason itself
  (:func:`pick_global`) and writes them, with each duplicate's kept row (``duplicate_of``), to
  ``_work/gK/_samples.parquet``; the next phase's read tasks thumbnail those rows before joining
  the decisions (:func:`thumbnail_wanted`).
- kept rows: per shard, as it is finalized (:func:`sample_kept`).

Each shard's finalize merges its kept rows' sample and its parts' samples to the shard's k
smallest per (stage, reason) and thumbnails only those (:func:`sample_shard`), into
``_work/kept/NNNNN.parquet``; :func:`merge_run` merges the shards' files.

A sampled row carries its records (``_sample``, JSON) and its image bytes (``_thumb``) to the part
writer, which stores them beside its part as ``_work/pK/samples/<part name>`` (:func:`split_samples`),
the bytes as they are (up to 512 KiB): only a row chosen for the shard is ever thumbnailed. A map stage's candidates are pruned once
more in the writer, to the k smallest per (stage, reason) of the part (a part's rows commit
together), so a shard's thumbnails are about k per reason and part, not one per row that entered
the worker's running k smallest (k·(1 + ln(m/k)) over a stream of m drops). Only
the samples of committed parts are merged, so a resumed run merges the same set as an uninterrupted
one; :func:`merge_run` writes ``_work/samples.parquet`` when the run is complete.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import curate.stats.thumbnails as th
from curate import rows
from curate.fsutil import atomic_open

SAMPLE_COL = "_sample"  # JSON list of sample records of the row (without the thumbnail)
THUMB_COL = "_thumb"  # the row's image bytes until the part writer makes them its thumbnail, or null
_PRUNE = "_prune"  # a record of a map stage's drop: the writer keeps the part's k smallest per (stage, reason)
DUPLICATE_OF = "duplicate_of"
#: A global stage's chosen rows, in its decisions folder.
GLOBAL_SAMPLES = "_samples.parquet"
#: Shards whose pruning state a worker keeps (each: k hashes per stage and reason); an evicted
#: shard only thumbnails a few more candidates, never a different sample.
MAX_SHARDS = 256
_NOT_FIELDS = frozenset({rows.KEY, rows.URL, rows.CAPTION, rows.STATUS, rows.DROPPED_BY, rows.REASON,
                         rows.IMAGE, rows.IMAGE_FORMAT, rows.SHA256, DUPLICATE_OF})


class DropSampler:
    """A worker's k smallest hashes per (stage, shard, reason): a row whose hash is not among them
    cannot be in the run's sample, so it is never thumbnailed.

    Only rows of the same shard prune each other: a shard's rows are committed together or rerun
    together, so the rows that pruned a candidate are in the same commit as the candidate.
    """

    def __init__(self, k: int = th.PER_REASON) -> None:
        self.k = k
        self.lock = threading.Lock()  # download runs several batches at once in one actor
        self.shards: OrderedDict[tuple[str, int], dict[str, list[int]]] = OrderedDict()

    def admit(self, stage: str, shard: int, reason: str, sorted_hashes: list[int]) -> int:
        """How many of ``sorted_hashes`` (ascending) enter the k smallest; they are recorded."""
        with self.lock:
            per = self.shards.get((stage, shard))
            if per is None:
                per = self.shards[(stage, shard)] = {}
                if len(self.shards) > MAX_SHARDS:
                    self.shards.popitem(last=False)
            else:
                self.shards.move_to_end((stage, shard))
            best = per.setdefault(reason, [])
            n = 0
            for h in sorted_hashes:
                if len(best) >= self.k and h > best[-1]:
                    break
                if h not in best:  # a retried batch offers its rows again: they stay admitted
                    best.append(h)
                    best.sort()
                    del best[self.k:]
                n += 1
            return n


_WORKER_SAMPLER = DropSampler()


def fields_of(table: pa.Table, columns: list[str], i: int) -> str:
    """The row's scalar values of ``columns`` as JSON (scores, reasons' numbers, HTTP status)."""
    out = {}
    for c in columns:
        if c in table.column_names and c not in _NOT_FIELDS and not rows.is_internal(c) \
                and not rows.is_embedding(c) and th.is_field_type(table.schema.field(c).type):
            out[c] = th.json_value(table[c][i].as_py())
    return json.dumps(out)


def with_sample_columns(table: pa.Table) -> pa.Table:
    """Every batch of a run with thumbnails has both columns, typed, so Ray Data's blocks never differ."""
    for name, typ in ((SAMPLE_COL, pa.string()), (THUMB_COL, pa.binary())):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, typ))
    return table


def sample_drops(before: pa.Table, after: pa.Table, stage_name: str, fields: list[str],
                 sampler: DropSampler | None = None) -> pa.Table:
    """After a map stage: sample the rows it dropped (``after``) with their images from ``before``."""
    after = with_sample_columns(after)
    if after.num_rows == 0 or rows.STATUS not in before.column_names:
        return after
    newly = pc.and_(pc.equal(before[rows.STATUS], rows.KEPT), pc.not_equal(after[rows.STATUS], rows.KEPT))
    idx = pc.indices_nonzero(pc.fill_null(newly, False).combine_chunks()).to_pylist()
    if not idx:
        return after
    sampler = sampler or _WORKER_SAMPLER
    keys = after[rows.KEY].take(idx).to_pylist()
    reasons = after[rows.REASON].take(idx).to_pylist()
    shards = after[rows.SHARD].take(idx).to_pylist() if rows.SHARD in after.column_names else [-1] * len(idx)
    groups: dict[tuple[int, str], list[tuple[int, str, int]]] = {}
    for i, key, reason, shard in zip(idx, keys, reasons, shards, strict=True):
        groups.setdefault((shard if shard is not None else -1, reason or "unknown"), []).append(
            (th.sample_hash(key), str(key), i))
    chosen: list[tuple[int, str, int]] = []
    for (shard, reason), cands in groups.items():
        cands.sort()
        cands = cands[:sampler.k]
        chosen += [(h, reason, i) for h, _, i in cands[:sampler.admit(stage_name, shard, reason, [h for h, _, _ in cands])]]
    if not chosen:
        return after
    new_cols = [c for c in after.column_names if c not in before.column_names]
    cols = list(dict.fromkeys([*fields, *new_cols]))
    images = before[rows.IMAGE] if rows.IMAGE in before.column_names else None
    records = {}
    for h, reason, i in chosen:
        records[i] = {"key": str(after[rows.KEY][i].as_py()), "hash": h, "stage": stage_name, "reason": reason,
                      "role": th.DROPPED, _PRUNE: True, "fields": fields_of(after, cols, i), **_text(before, i),
                      "_image": images[i].as_py() if images is not None else None}
    return attach(after, records)


def _text(table: pa.Table, i: int) -> dict[str, Any]:
    return {c: th.short(table[c][i].as_py()) if c in table.column_names else None for c in (rows.CAPTION, rows.URL)}


def attach(table: pa.Table, records: dict[int, dict[str, Any]]) -> pa.Table:
    """Add sample records (``_image``: the bytes to thumbnail) to rows by position: ``_sample`` and
    ``_thumb`` (the bytes; :func:`split_samples` thumbnails them)."""
    old_s = table[SAMPLE_COL].to_pylist() if SAMPLE_COL in table.column_names else [None] * table.num_rows
    old_t = table[THUMB_COL].to_pylist() if THUMB_COL in table.column_names else [None] * table.num_rows
    for i, rec in records.items():
        data = rec.pop("_image", None)
        if old_t[i] is None:
            old_t[i] = data
        old_s[i] = json.dumps((json.loads(old_s[i]) if old_s[i] else []) + [rec])
    table = rows.with_column(table, SAMPLE_COL, pa.array(old_s, pa.string()))
    return rows.with_column(table, THUMB_COL, pa.array(old_t, pa.binary()))


def split_samples(t: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """A part's rows without the sample columns, and its sample records, thumbnailed (None when it has
    none). A map stage's drops are first cut to the part's k smallest hashes per (stage, reason)."""
    if SAMPLE_COL not in t.column_names:
        return t, None
    idx = pc.indices_nonzero(pc.is_valid(t[SAMPLE_COL]).combine_chunks()).to_pylist()
    per_row = {i: json.loads(t[SAMPLE_COL][i].as_py()) for i in idx}
    groups: dict[tuple[str, str], list[tuple[int, str, int, int]]] = {}
    for i, recs in per_row.items():
        for j, r in enumerate(recs):
            if r.get(_PRUNE):
                groups.setdefault((r["stage"], r["reason"]), []).append((r["hash"], r["key"], i, j))
    cut = {(i, j) for cands in groups.values() for _, _, i, j in sorted(cands)[th.PER_REASON:]}
    out = []
    for i, recs in per_row.items():
        recs = [{k: v for k, v in r.items() if k != _PRUNE} for j, r in enumerate(recs) if (i, j) not in cut]
        if recs:
            picture = th.image_or_thumbnail(t[THUMB_COL][i].as_py())
            out += [{**r, **picture} for r in recs]
    t = t.drop([SAMPLE_COL, THUMB_COL])
    return t, (th.records_table(out) if out else None)


def samples_dir(parts_dir: str) -> str:
    """``_work/pK/samples`` beside ``_work/pK/parts``: kept when the parts are removed after the run."""
    return parts_dir.rstrip("/").rsplit("/", 1)[0] + "/samples"


def read_tables(paths: list[str], *, missing_ok: bool = False) -> list[pa.Table | None]:
    """Small Parquet files, several at once (on object storage each is a round trip); a missing one
    is None with ``missing_ok``."""
    import fsspec

    def one(path: str) -> pa.Table | None:
        try:
            with fsspec.open(path, "rb") as f:
                return pq.read_table(f)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise

    with ThreadPoolExecutor(16, thread_name_prefix="curate-samples") as pool:
        return list(pool.map(one, paths))


def write_table(path: str, table: pa.Table) -> None:
    with atomic_open(path) as f:
        pq.write_table(table, f, compression="zstd")


# ------------------------------------------------------------------ global stages (driver, then read tasks)


def pick_global(stage_name: str, decisions: pa.Table, table: pa.Table, fields: list[str]) -> list[dict[str, Any]]:
    """The rows a global stage dropped that the sample shows, per reason the k smallest hashes, and the
    kept row each duplicate was dropped against: records with ``shard`` (where the row is read next)."""
    dropped = decisions.filter(pc.is_valid(decisions[rows.REASON]))
    if dropped.num_rows == 0:
        return []
    keys = dropped[rows.KEY].to_pylist()
    reasons = dropped[rows.REASON].to_pylist()
    best: dict[str, list[tuple[int, str, int]]] = {}
    for i, (key, reason) in enumerate(zip(keys, reasons, strict=True)):
        h = th.sample_hash(key)
        lst = best.setdefault(reason, [])
        if len(lst) < th.PER_REASON or (h, key) < lst[-1][:2]:
            lst.append((h, str(key), i))
            lst.sort()
            del lst[th.PER_REASON:]
    pos_all = {}
    picked = [(h, key, i, reason) for reason, lst in best.items() for h, key, i in lst]
    wanted_keys = [key for _, key, _, _ in picked]
    pairs = dropped[DUPLICATE_OF].to_pylist() if DUPLICATE_OF in dropped.column_names else [None] * len(keys)
    wanted_keys += [pairs[i] for _, _, i, _ in picked if pairs[i] is not None]
    where = pc.index_in(pa.array(wanted_keys, pa.string()), value_set=table[rows.KEY].combine_chunks().cast(pa.string()))
    for k, p in zip(wanted_keys, where.to_pylist(), strict=True):
        pos_all[k] = p
    out = []
    for h, key, i, reason in picked:
        p = pos_all.get(key)
        if p is None:
            continue
        pair = pairs[i]
        out.append({"key": key, "hash": h, "stage": stage_name, "reason": reason, "role": th.DROPPED, "pair": pair,
                    "fields": fields_of(table, fields, p), "shard": table[rows.SHARD][p].as_py()})
        q = pos_all.get(pair) if pair is not None else None
        if q is not None:
            out.append({"key": pair, "hash": th.sample_hash(pair), "stage": stage_name, "reason": reason,
                        "role": th.ORIGINAL, "pair": key, "fields": fields_of(table, fields, q),
                        "shard": table[rows.SHARD][q].as_py()})
    return out


def write_global_picks(path: str, picks: list[dict[str, Any]]) -> None:
    t = pa.Table.from_pylist([{"key": r["key"], "shard": r["shard"], "record": json.dumps(
        {k: v for k, v in r.items() if k != "shard"})} for r in picks],
        schema=pa.schema([("key", pa.string()), ("shard", pa.int64()), ("record", pa.string())]))
    write_table(path, t)


def read_global_picks(decisions_dir: str, shard: int) -> dict[str, list[dict[str, Any]]]:
    """Key → records of the rows of ``shard`` that the global stages before this phase sampled."""
    import fsspec

    path = f"{decisions_dir}/{GLOBAL_SAMPLES}"
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return {}
    with fs.open(p, "rb") as f:
        t = pq.read_table(f, filters=[("shard", "=", shard)])
    out: dict[str, list[dict[str, Any]]] = {}
    for key, rec in zip(t["key"].to_pylist(), t["record"].to_pylist(), strict=True):
        out.setdefault(key, []).append(json.loads(rec))
    return out


def thumbnail_wanted(batch: pa.Table, wanted: dict[str, list[dict[str, Any]]]) -> pa.Table:
    """Attach the global stages' samples to their rows of ``batch`` (read back with their images)."""
    batch = with_sample_columns(batch)
    if not wanted or batch.num_rows == 0:
        return batch
    keys = batch[rows.KEY].cast(pa.string()).to_pylist()
    hits = [i for i, k in enumerate(keys) if k in wanted]
    if not hits:
        return batch
    images = batch[rows.IMAGE] if rows.IMAGE in batch.column_names else None
    out = batch
    for i in hits:  # one key may be sampled twice (a copy's original for two stages): one thumbnail
        for rec in wanted[keys[i]]:
            out = attach(out, {i: {**rec, **_text(batch, i), "_image": images[i].as_py() if images is not None
                                   else None}})
    return out


# ------------------------------------------------------------------ kept rows (finalize) and the merge


def sample_kept(kept: pa.Table) -> pa.Table | None:
    """The shard's kept rows with the k smallest hashes, thumbnailed (``kept`` still holds the images)."""
    if kept.num_rows == 0:
        return None
    keys = kept[rows.KEY].cast(pa.string()).to_pylist()
    chosen = sorted((th.sample_hash(k), k, i) for i, k in enumerate(keys))[:th.KEPT]
    images = kept[rows.IMAGE] if rows.IMAGE in kept.column_names else None
    cols = [c for c in kept.column_names if pa.types.is_integer(kept.schema.field(c).type)
            or pa.types.is_floating(kept.schema.field(c).type)]
    recs = [{"key": k, "hash": h, "role": th.KEPT_ROLE, "fields": fields_of(kept, cols, i), **_text(kept, i),
             **th.image_or_thumbnail(images[i].as_py() if images is not None else None)}
            for h, k, i in chosen]
    return th.records_table(recs)


def shard_sample_paths(layout: Any, n_phases: int, last: Any) -> list[str]:
    """Where the sample files of a committed shard's parts would be, every phase's (``last``: its
    marker in the last phase). A part with no sampled row has none: :func:`sample_shard` skips it."""
    markers = [layout.read_marker(p, last.shard) for p in range(n_phases - 1)] + [last]
    return [f"{samples_dir(layout.parts_dir(p))}/{part.rsplit('/', 1)[-1]}"
            for p, m in enumerate(markers) for part in m.parts]


def sample_shard(kept: pa.Table, part_samples: list[str]) -> pa.Table | None:
    """A shard's sample, thumbnailed: its kept rows' and its parts' candidates cut to the k smallest
    per (stage, reason), every global pick's original kept (its copy may be in another shard)."""
    tables = [t for t in read_tables(part_samples, missing_ok=True) if t is not None]
    kept_sample = sample_kept(kept)
    if kept_sample is not None:
        tables.append(kept_sample)
    return th.merge(tables, all_originals=True) if tables else None


def merge_run(layout: Any, specs: list[dict[str, Any]]) -> int:
    """Merge the finalized shards' samples (:func:`sample_shard`) into ``_work/samples.parquet``;
    return how many records it holds."""
    kept_dir = layout.work("kept")
    present = set(layout.listdir_names(kept_dir))
    paths = [f"{kept_dir}/{s['shard']:05d}.parquet" for s in specs if f"{s['shard']:05d}.parquet" in present]
    merged = th.merge([t for t in read_tables(paths) if t is not None])
    write_table(layout.path(th.SAMPLES_FILE), merged)
    return merged.num_rows
