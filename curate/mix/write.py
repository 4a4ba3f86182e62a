"""The whole mix: index the sources, choose rows, interleave them by a seeded random merge, write
the output shard by shard (at most one shard of image bytes in memory) and ``mixture_manifest.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from curate import rows
from curate.errors import InputError, OutputError, RecipeError
from curate.fsutil import write_json
from curate.mix.model import MANIFEST_FILE, Mixture
from curate.mix.read import SourceFiles, SourceIndex, index_source, read_rows, resolve_source
from curate.mix.select import Selection, select, targets
from curate.mix.tokens import Counting, resolve_unit

log = logging.getLogger(__name__)

SOURCE_COLUMN = "mix_source"
SOURCE_KEY_COLUMN = "source_key"


def _stream(ix: SourceIndex, sel: Selection, token_column: str) -> Iterator[pa.Table]:
    """The chosen rows as tables, pass by pass, each pass in file order (one sequential read per pass);
    ``token_column`` set to the rows' tokens in the mixture's unit when they were counted."""
    if not len(sel.rows):
        return
    files = ix.file_idx[sel.rows]
    positions = ix.row_idx[sel.rows]
    tokens = ix.tokens[sel.rows] if ix.tokens is not None else None
    for copy in range(int(sel.copy.max()) + 1):
        mask = sel.copy == copy
        order = np.lexsort((positions[mask], files[mask]))
        f_sel, p_sel = files[mask][order], positions[mask][order]
        t_sel = tokens[mask][order] if tokens is not None else None
        for fi in np.unique(f_sel):
            wanted = p_sel[f_sel == fi]
            t_file = t_sel[f_sel == fi] if t_sel is not None else None
            done = 0
            for table in read_rows(ix.files, int(fi), wanted):  # rows come back in `wanted` order
                if t_file is not None:
                    t = t_file[done:done + table.num_rows]
                    table = rows.with_column(table, token_column, pa.array(t, pa.int32()))
                done += table.num_rows
                yield _label(table, ix.files.name, copy)


def _label(table: pa.Table, source: str, copy: int) -> pa.Table:
    """Prefix keys with the source (and the repeat number) so keys stay unique in the mixture."""
    keys = table[rows.KEY].cast(pa.string())
    suffix = f"_{copy}" if copy else ""
    new = pa.array([rows.safe_key(f"{source}_{k}{suffix}") for k in keys.to_pylist()], pa.string())
    table = rows.with_column(table, SOURCE_KEY_COLUMN, keys)
    table = rows.with_column(table, rows.KEY, new)
    return rows.with_column(table, SOURCE_COLUMN, pa.array([source] * table.num_rows, pa.string()))


class _Buffered:
    """Take n rows at a time from a stream of tables."""

    def __init__(self, stream: Iterator[pa.Table]) -> None:
        self.stream, self.buf, self.offset = stream, [], 0

    def take(self, n: int) -> pa.Table | None:
        if n == 0:
            return None
        have = sum(t.num_rows for t in self.buf) - self.offset
        while have < n:
            t = next(self.stream)
            self.buf.append(t)
            have += t.num_rows
        out = rows.concat(self.buf).slice(self.offset, n)
        self.offset += n
        while self.buf and self.offset >= self.buf[0].num_rows:  # forget fully used tables
            self.offset -= self.buf.pop(0).num_rows
        return out


def _unify(tables: list[pa.Table]) -> pa.Table:
    """Concatenate batches of several sources; a column whose types cannot be reconciled is left out."""
    try:
        return rows.concat(tables)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        types: dict[str, set[str]] = {}
        for t in tables:
            for f in t.schema:
                types.setdefault(f.name, set()).add(str(f.type))
        bad = {c for c, ts in types.items() if len({x for x in ts if x != "null"}) > 1}
        log.warning("mixture: columns with different types across sources are left out: %s", sorted(bad))
        return rows.concat([t.drop_columns([c for c in bad if c in t.column_names]) for t in tables])


# ---------------------------------------------------------------- the whole mix


@dataclass
class MixResult:
    output: str
    manifest: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)


def run_mix(mix: Mixture, *, overwrite: bool = False) -> MixResult:
    """Index, choose, interleave and write the mixture; returns the manifest written to ``OUT``."""
    from curate import __version__
    from curate.sinks.parquet import write_parquet_shard
    from curate.sinks.webdataset import write_webdataset

    start = time.perf_counter()
    out = mix.write.output.rstrip("/")  # type: ignore[union-attr]
    resolved = [resolve_source(s) for s in mix.sources]
    stale = _check_output(out, overwrite, resolved)
    counting = _counting(mix, resolved)
    try:
        indexes = [index_source(sf, src, counting) for sf, src in zip(resolved, mix.sources, strict=True)]
    except (RecipeError, InputError) as e:  # a source cannot be counted in the unit: fatal by tokens
        if mix.unit == "tokens" or counting is None:
            raise
        log.warning("mixture: tokens are not counted, the sources cannot share a unit: %s", e)
        counting = None
        indexes = [index_source(sf, src, None) for sf, src in zip(resolved, mix.sources, strict=True)]
    amounts = targets(mix, indexes)
    selections = []
    for i, (src, ix, target) in enumerate(zip(mix.sources, indexes, amounts, strict=True)):
        rng = np.random.default_rng([mix.seed, i])
        amount = np.ones(ix.rows, np.int64) if mix.unit == "samples" else ix.tokens
        if_short = "repeat" if src.epochs is not None else mix.if_short
        selections.append(select(amount, target, rng, replace=mix.replace, if_short=if_short,
                                 name=src.name, unit=mix.unit))
    counts = [len(s.rows) for s in selections]
    if stale:  # nothing was refused: the earlier mixture's shards make way
        fs = fsspec.core.url_to_fs(out)[0]
        for folder in stale:
            fs.rm(folder, recursive=True)
    # A seeded random merge: which source each output position comes from.
    labels = np.random.default_rng([mix.seed, len(mix.sources)]).permutation(
        np.repeat(np.arange(len(counts), dtype=np.int16), counts))  # 2 bytes per output sample
    streams = [_Buffered(_stream(ix, sel, mix.token_column)) for ix, sel in zip(indexes, selections, strict=True)]
    shards: list[dict[str, Any]] = []
    per = mix.write.samples_per_shard
    for shard_no, lo in enumerate(range(0, len(labels), per)):
        part = labels[lo:lo + per]
        in_shard = np.bincount(part, minlength=len(streams))
        taken = [streams[s].take(int(in_shard[s])) for s in range(len(streams))]
        table = _unify([t for t in taken if t is not None])
        # the table holds each source's rows in a block; put them at their merged positions
        first = np.r_[0, np.cumsum(in_shard)[:-1]]
        order = np.empty(len(part), np.int64)
        for s in range(len(streams)):
            order[part == s] = first[s] + np.arange(in_shard[s])
        table = table.take(pa.array(order))
        for fmt in mix.write.formats:
            rel = f"{fmt}/{shard_no:05d}.{'tar' if fmt == 'webdataset' else 'parquet'}"
            if fmt == "webdataset":
                n = write_webdataset(table, f"{out}/{rel}", caption_column=mix.write.caption_column)
            else:
                n = write_parquet_shard(table, f"{out}/{rel}")
            shards.append({"path": rel, "format": fmt, "num_samples": n})
    manifest = _manifest(mix, counting, indexes, amounts, selections, shards)
    manifest.update(curate_version=__version__, elapsed_seconds=round(time.perf_counter() - start, 3))
    write_json(f"{out}/{MANIFEST_FILE}", manifest)
    return MixResult(out, manifest, shards)


def _counting(mix: Mixture, resolved: list[SourceFiles]) -> Counting | None:
    """The mixture's token unit (see :mod:`curate.mix.tokens`). By tokens a unit that cannot be settled
    stops the mix; by samples tokens are only reported, so they are left uncounted (with a warning)."""
    recorded = [(sf.name, rec) for sf in resolved for rec in sf.recorded if rec is not None]
    try:
        unit, origin = resolve_unit(mix.token_unit, recorded)
    except RecipeError as e:
        if mix.unit == "tokens":
            raise
        log.warning("mixture: tokens are not counted, the sources cannot share a unit: %s", e)
        return None
    return Counting(unit, origin, mix.token_column, mix.write.caption_column)


def _check_output(out: str, overwrite: bool, sources: list[SourceFiles]) -> list[str]:
    """Refuse to write over a source or a folder that is not an earlier mixture (unless ``overwrite``);
    returns the old mixture's shard folders, removed once the new mixture is settled."""
    fs, root = fsspec.core.url_to_fs(out)
    prefix = fs.unstrip_protocol(root).rstrip("/") + "/"
    for sf in sources:
        if any(fs.unstrip_protocol(fsspec.core.url_to_fs(f)[1]).startswith(prefix) for f in sf.files):
            raise OutputError(f"output {out} holds files of mixture source {sf.name!r}; write the mixture elsewhere")
    if not fs.exists(root) or not fs.ls(root):
        return []
    if fs.exists(f"{root}/{MANIFEST_FILE}") or overwrite:  # the old mixture's shards: a smaller mix must not keep them
        return [f"{root}/{sub}" for sub in ("webdataset", "parquet") if fs.exists(f"{root}/{sub}")]
    raise OutputError(f"{out} is not empty and holds no {MANIFEST_FILE}; choose another -o or pass --overwrite")


def _manifest(mix: Mixture, counting: Counting | None, indexes: list[SourceIndex], amounts: list[float],
              selections: list[Selection], shards: list[dict[str, Any]]) -> dict[str, Any]:
    counted = counting is not None
    tokens = [int(ix.tokens[s.rows].sum()) if ix.tokens is not None else None
              for ix, s in zip(indexes, selections, strict=True)]
    total_samples = sum(len(s.rows) for s in selections)
    total_tokens = sum(t or 0 for t in tokens) if counted else None
    requested_total = sum(amounts) + sum(s.shortfall for s in selections)
    unit = counting.unit if counting is not None else None
    texts = sorted({c for ix in indexes for c in ix.text_columns})
    per_source = []
    for src, ix, target, sel, tok in zip(mix.sources, indexes, amounts, selections, tokens, strict=True):
        samples = len(sel.rows)
        available = int(ix.tokens.sum()) if ix.tokens is not None else None
        achieved = samples if mix.unit == "samples" else tok
        achieved_total = total_samples if mix.unit == "samples" else total_tokens
        per_source.append({
            "name": src.name, "path": src.path, "format": ix.files.format, "files": len(ix.files.files),
            "weight": src.weight, "epochs": src.epochs,
            "requested": round(target + sel.shortfall, 3),
            "requested_ratio": round((target + sel.shortfall) / requested_total, 6) if requested_total else None,
            "achieved": achieved,
            "achieved_ratio": round(achieved / achieved_total, 6) if achieved_total else None,
            "samples": samples, "unique_samples": int(len(np.unique(sel.rows))), "tokens": tok,
            "available_samples": ix.rows, "available_tokens": available,
            "epochs_achieved": round(achieved / (ix.rows if mix.unit == "samples" else max(1, available)), 6),
            "tokens_exact": bool(unit and unit.exact),
            "token_count": unit.describe() if unit else None,
            "token_unit": {**unit.as_dict(), "text_columns": ix.text_columns} if unit else None,
            "tokens_from": ix.tokens_from, "recorded_units": ix.recorded,
            "capped": sel.capped, "shortfall": round(sel.shortfall, 3),
        })
    token_unit = None
    if counting is not None and unit is not None:
        token_unit = {**unit.as_dict(), "text_column": texts[0] if len(texts) == 1 else None, "exact": unit.exact,
                      "description": unit.describe(), "from": counting.origin}
    return {
        "mixture": mix.model_dump(mode="json"), "unit": mix.unit, "seed": mix.seed, "replace": mix.replace,
        "samples": total_samples, "tokens": total_tokens, "token_unit": token_unit,
        "token_column": mix.token_column if counted else None,
        "sources": per_source, "shards": shards,
    }


def read_mixture_manifest(out: str) -> dict[str, Any]:
    with fsspec.open(f"{out.rstrip('/')}/{MANIFEST_FILE}", "rt") as f:
        return json.load(f)
