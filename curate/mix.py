"""Mixtures (``curate mix MIXTURE.yaml -o OUT``): several curated outputs at target ratios, one corpus.

A mixture file names sources — a curate run's output folder (its ``manifest.json``
shard list, Parquet shards preferred), Parquet files with image bytes, or
WebDataset tars — and how much of each to take: ``weight`` (a share of
``total_samples`` / ``total_tokens``) or ``epochs`` (passes over the source).
``unit: samples`` counts rows; ``unit: tokens`` counts a token column
(``token_column``, default ``num_tokens``, as the packing stage writes it) when the
source has it, else an approximation — UTF-8 bytes of the caption / 4, the usual
BPE rate on English — that the manifest marks ``tokens_exact: false``.

Sampling is seeded and deterministic. Without ``replace: true`` a row is taken at
most once per pass; when a source is too small for its share, ``if_short`` decides:
``error`` (the default: the mixture cannot be met as written), ``cap`` (take all of
it, warn, record the shortfall) or ``repeat`` (whole passes plus a random part,
i.e. upsampling). ``epochs: 2.5`` is two whole passes plus half.

It streams: a first pass reads only keys and token counts, rows are chosen by
index, then each source is read once per pass in its own order, the sources are
interleaved by a seeded random merge, and the output is written shard by shard —
at most one output shard of image bytes is in memory. Output keys are
``<source>_<key>`` (``_<n>`` added for the n-th repeat), with ``mix_source`` and
``source_key`` columns. ``OUT/mixture_manifest.json`` records, per source, the
requested and achieved ratios, samples, unique samples, tokens and the seed.

Example mixture::

    sources:
      - {name: web, path: runs/web-curated, weight: 0.7}
      - {name: synth, path: runs/synthetic, weight: 0.3}
    unit: tokens
    total_tokens: 2000000
    seed: 0
    write: {formats: [webdataset, parquet], samples_per_shard: 10000}
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from curate import rows
from curate.errors import CurateError, InputError, OutputError, RecipeError
from curate.fsutil import write_json

log = logging.getLogger(__name__)

MANIFEST_FILE = "mixture_manifest.json"
RUN_MANIFEST = "manifest.json"
DEFAULT_TOKEN_COLUMN = "num_tokens"  # what the pack stage writes
BYTES_PER_TOKEN = 4  # BPE tokenizers average about 4 UTF-8 bytes per token on English text
APPROX_TOKENS = f"approx: utf-8 bytes of the caption / {BYTES_PER_TOKEN}"
SOURCE_COLUMN = "mix_source"
SOURCE_KEY_COLUMN = "source_key"
READ_BATCH_ROWS = 1024  # rows per batch read from a source: bounded memory, few read calls
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ---------------------------------------------------------------- the mixture file


class MixSource(BaseModel):
    """One input of the mixture and how much of it to take."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short name: prefixes output keys, names the source in the manifest.")
    path: str | list[str] = Field(description="A curate output folder, Parquet file/folder/glob, or tars.")
    weight: float | None = Field(None, gt=0, description="Share of the total (normalised over sources).")
    epochs: float | None = Field(None, gt=0, description="Passes over the source instead of a weight.")
    format: Literal["auto", "parquet", "webdataset"] = "auto"

    @model_validator(mode="after")
    def _one_amount(self) -> MixSource:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, _ and - only")
        if (self.weight is None) == (self.epochs is None):
            raise ValueError("give exactly one of `weight` or `epochs`")
        return self


class MixWrite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str | None = Field(None, description="Output folder; `-o` sets it.")
    formats: list[Literal["webdataset", "parquet"]] = Field(default_factory=lambda: ["webdataset", "parquet"],
                                                            min_length=1)
    samples_per_shard: int = Field(10000, ge=1)
    caption_column: str = Field("caption", description="Column written as KEY.txt.")


class Mixture(BaseModel):
    """A mixture file: sources with weights or epochs, a unit, a total, a seed."""

    model_config = ConfigDict(extra="forbid")
    sources: list[MixSource] = Field(min_length=1)
    unit: Literal["samples", "tokens"] = "samples"
    total_samples: int | None = Field(None, ge=1)
    total_tokens: int | None = Field(None, ge=1)
    seed: int = 0
    replace: bool = Field(False, description="Sample with replacement (i.i.d. draws).")
    if_short: Literal["error", "cap", "repeat"] = Field(
        "error", description="Without replace, a source smaller than its share: fail, take all, or repeat it.")
    token_column: str = Field(DEFAULT_TOKEN_COLUMN, description="Exact token counts when a source has them.")
    write: MixWrite = Field(default_factory=MixWrite)

    @model_validator(mode="after")
    def _totals(self) -> Mixture:
        names = [s.name for s in self.sources]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"source name {dup!r} is used twice")
        weighted = [s for s in self.sources if s.weight is not None]
        if weighted and len(weighted) != len(self.sources):
            raise ValueError("give every source a `weight`, or every source `epochs`, not a mix of both")
        total = self.total_samples if self.unit == "samples" else self.total_tokens
        other = self.total_tokens if self.unit == "samples" else self.total_samples
        if other is not None:
            raise ValueError(f"unit is {self.unit}: use total_{self.unit}, not total_"
                             f"{'tokens' if self.unit == 'samples' else 'samples'}")
        if weighted and total is None:
            raise ValueError(f"weights need a total: set total_{self.unit}")
        if not weighted and total is not None:
            raise ValueError(f"total_{self.unit} needs weights; with `epochs` the total follows from the sources")
        return self

    @property
    def total(self) -> int | None:
        return self.total_samples if self.unit == "samples" else self.total_tokens


def load_mixture(path: str | os.PathLike, *, output: str | None = None, overrides: Iterable[str] = ()) -> Mixture:
    """Load and validate a mixture file; errors name the file, line and key like recipe errors."""
    from curate.recipe import _apply_override, _keypath, _line_for, _load_yaml, _msg

    doc = _load_yaml(path)
    if not isinstance(doc.data, dict):
        raise RecipeError("a mixture is a mapping with keys sources, unit, total_samples/total_tokens, seed, write",
                          file=doc.file, line=1)
    set_keys = {_apply_override(doc.data, expr): expr for expr in overrides}
    if output is not None:
        doc.data.setdefault("write", {})["output"] = output
    try:
        mix = Mixture.model_validate(doc.data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        for k, expr in set_keys.items():
            if loc[: len(k)] == k:
                raise RecipeError(_msg(err), file=f"--set {expr}", key=_keypath(loc)) from None
        raise RecipeError(_msg(err), file=doc.file, line=_line_for(doc, loc), key=_keypath(loc) or None) from None
    if not mix.write.output:
        raise RecipeError("no output folder: pass -o OUT or set write.output", file=doc.file)
    return mix


# ---------------------------------------------------------------- reading sources


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


def _tar_samples(path: str) -> Iterator[dict[str, Any]]:
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


def _tar_row(sample: dict[str, Any]) -> dict[str, Any]:
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
            for s in _tar_samples(path):
                r = _tar_row(s)
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


# ---------------------------------------------------------------- choosing rows


@dataclass
class Selection:
    """Chosen rows of one source: index into the source's rows, and which copy (0 = first) each is."""

    rows: np.ndarray
    copy: np.ndarray
    capped: bool = False
    shortfall: float = 0.0


def _copies(idx: np.ndarray) -> np.ndarray:
    """The occurrence number of each value in ``idx`` (0 for the first time a row is drawn)."""
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_idx)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
    out = np.empty(len(idx), dtype=np.int64)
    out[order] = np.arange(len(idx)) - run_start
    return out


def select(amount: np.ndarray, target: float, rng: np.random.Generator, *, replace: bool,
           if_short: str, name: str, unit: str) -> Selection:
    """Choose rows whose ``amount`` (1 per row, or tokens) adds up to ``target``.

    Without replacement a random permutation is cut where the running sum comes closest
    to the target; short sources repeat whole passes, cap, or fail (``if_short``).
    """
    n = len(amount)
    if target <= 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n == 0 or amount.sum() == 0:
        raise CurateError(f"mixture source {name!r} is empty but its share is {target:g} {unit}")
    if replace:
        mean = float(amount.mean())
        picks: list[np.ndarray] = []
        got = 0.0
        while got < target:  # draw in chunks until the running sum passes the target
            chunk = rng.integers(0, n, size=max(16, int((target - got) / mean * 1.1) + 1))
            picks.append(chunk)
            got += float(amount[chunk].sum())
        drawn = np.concatenate(picks)
        idx = drawn[: _cut(np.cumsum(amount[drawn]), target)]
        return Selection(idx, _copies(idx))
    total = float(amount.sum())
    passes = 0
    capped = False
    shortfall = 0.0
    if target > total:
        if if_short == "error":
            raise CurateError(
                f"mixture source {name!r} has {total:g} {unit} but its share is {target:g}: set `if_short: cap` "
                "(take all of it), `if_short: repeat` (upsample by repeating it), or `replace: true`")
        if if_short == "cap":
            log.warning("mixture source %s: %g %s available, %g asked; taking all of it", name, total, unit, target)
            capped, shortfall, target = True, target - total, total
        else:
            passes = int(target // total)
            target -= passes * total
    parts = [np.arange(n, dtype=np.int64)] * passes
    copies = [np.full(n, p, dtype=np.int64) for p in range(passes)]
    if target > 0:
        perm = rng.permutation(n)
        k = _cut(np.cumsum(amount[perm]), target)
        parts.append(perm[:k])
        copies.append(np.full(k, passes, dtype=np.int64))
    return Selection(np.concatenate(parts), np.concatenate(copies), capped, shortfall)


def _cut(cumsum: np.ndarray, target: float) -> int:
    """How many leading items bring the running sum closest to ``target``."""
    k = int(np.searchsorted(cumsum, target))
    if k >= len(cumsum):
        return len(cumsum)
    below = cumsum[k - 1] if k > 0 else 0
    return k + 1 if abs(cumsum[k] - target) < abs(target - below) else k


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer shares of ``total`` in proportion to ``weights`` that add up to ``total`` exactly."""
    w = np.array(weights, dtype=float) / sum(weights)
    raw = w * total
    base = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - base), kind="stable")[: total - int(base.sum())]:
        base[i] += 1
    return base.tolist()


def targets(mix: Mixture, indexes: list[SourceIndex]) -> list[float]:
    """The amount (rows or tokens) to take from each source."""
    sizes = [float(ix.rows if mix.unit == "samples" else ix.tokens.sum()) for ix in indexes]
    if mix.sources[0].weight is None:
        out = [s.epochs * size for s, size in zip(mix.sources, sizes, strict=True)]  # type: ignore[operator]
        return [float(round(x)) for x in out] if mix.unit == "samples" else out
    weights = [s.weight for s in mix.sources]
    if mix.unit == "samples":
        return [float(x) for x in _largest_remainder(mix.total, weights)]  # type: ignore[arg-type]
    return [mix.total * w / sum(weights) for w in weights]  # type: ignore[operator]


# ---------------------------------------------------------------- reading chosen rows


def _stream(ix: SourceIndex, sel: Selection) -> Iterator[pa.Table]:
    """The chosen rows as tables, pass by pass, each pass in file order (one sequential read per pass)."""
    if not len(sel.rows):
        return
    files = ix.file_idx[sel.rows]
    positions = ix.row_idx[sel.rows]
    for copy in range(int(sel.copy.max()) + 1):
        mask = sel.copy == copy
        order = np.lexsort((positions[mask], files[mask]))
        f_sel, p_sel = files[mask][order], positions[mask][order]
        for fi in np.unique(f_sel):
            wanted = p_sel[f_sel == fi]
            for table in _read_rows(ix.files, int(fi), wanted):
                yield _label(table, ix.files.name, copy)


def _read_rows(sf: SourceFiles, fi: int, wanted: np.ndarray) -> Iterator[pa.Table]:
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
    for pos, sample in enumerate(_tar_samples(path)):
        if pos in wanted_set:
            batch.append(_tar_row(sample))
            if len(batch) >= READ_BATCH_ROWS:
                yield pa.Table.from_pylist(batch)
                batch = []
    if batch:
        yield pa.Table.from_pylist(batch)


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
    _check_output(out, overwrite, resolved)
    indexes = [index_source(sf, mix.token_column) for sf in resolved]
    amounts = targets(mix, indexes)
    selections = []
    for i, (src, ix, target) in enumerate(zip(mix.sources, indexes, amounts, strict=True)):
        rng = np.random.default_rng([mix.seed, i])
        amount = np.ones(ix.rows, np.int64) if mix.unit == "samples" else ix.tokens
        if_short = "repeat" if src.epochs is not None else mix.if_short
        selections.append(select(amount, target, rng, replace=mix.replace, if_short=if_short,
                                 name=src.name, unit=mix.unit))
    counts = [len(s.rows) for s in selections]
    # A seeded random merge: which source each output position comes from.
    labels = np.random.default_rng([mix.seed, len(mix.sources)]).permutation(
        np.repeat(np.arange(len(counts), dtype=np.int16), counts))  # 2 bytes per output sample
    streams = [_Buffered(_stream(ix, sel)) for ix, sel in zip(indexes, selections, strict=True)]
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
    manifest = _manifest(mix, indexes, amounts, selections, shards)
    manifest.update(curate_version=__version__, elapsed_seconds=round(time.perf_counter() - start, 3))
    write_json(f"{out}/{MANIFEST_FILE}", manifest)
    return MixResult(out, manifest, shards)


def _check_output(out: str, overwrite: bool, sources: list[SourceFiles]) -> None:
    """Refuse to write over a source or a folder that is not an earlier mixture (unless ``overwrite``)."""
    fs, root = fsspec.core.url_to_fs(out)
    prefix = fs.unstrip_protocol(root).rstrip("/") + "/"
    for sf in sources:
        if any(fs.unstrip_protocol(fsspec.core.url_to_fs(f)[1]).startswith(prefix) for f in sf.files):
            raise OutputError(f"output {out} holds files of mixture source {sf.name!r}; write the mixture elsewhere")
    if not fs.exists(root) or not fs.ls(root):
        return
    if fs.exists(f"{root}/{MANIFEST_FILE}") or overwrite:
        for sub in ("webdataset", "parquet"):  # the old mixture's shards: a smaller new mix must not keep them
            if fs.exists(f"{root}/{sub}"):
                fs.rm(f"{root}/{sub}", recursive=True)
        return
    raise OutputError(f"{out} is not empty and holds no {MANIFEST_FILE}; choose another -o or pass --overwrite")


def _manifest(mix: Mixture, indexes: list[SourceIndex], amounts: list[float], selections: list[Selection],
              shards: list[dict[str, Any]]) -> dict[str, Any]:
    total_samples = sum(len(s.rows) for s in selections)
    total_tokens = sum(int(ix.tokens[s.rows].sum()) for ix, s in zip(indexes, selections, strict=True))
    requested_total = sum(amounts) + sum(s.shortfall for s in selections)
    per_source = []
    for src, ix, target, sel in zip(mix.sources, indexes, amounts, selections, strict=True):
        samples, tokens = len(sel.rows), int(ix.tokens[sel.rows].sum())
        achieved = samples if mix.unit == "samples" else tokens
        achieved_total = total_samples if mix.unit == "samples" else total_tokens
        per_source.append({
            "name": src.name, "path": src.path, "format": ix.files.format, "files": len(ix.files.files),
            "weight": src.weight, "epochs": src.epochs,
            "requested": round(target + sel.shortfall, 3),
            "requested_ratio": round((target + sel.shortfall) / requested_total, 6) if requested_total else None,
            "achieved": achieved,
            "achieved_ratio": round(achieved / achieved_total, 6) if achieved_total else None,
            "samples": samples, "unique_samples": int(len(np.unique(sel.rows))), "tokens": tokens,
            "available_samples": ix.rows, "available_tokens": int(ix.tokens.sum()),
            "epochs_achieved": round(achieved / (ix.rows if mix.unit == "samples" else max(1, ix.tokens.sum())), 6),
            "tokens_exact": ix.tokens_exact,
            "token_count": mix.token_column if ix.tokens_exact else APPROX_TOKENS,
            "capped": sel.capped, "shortfall": round(sel.shortfall, 3),
        })
    return {
        "mixture": mix.model_dump(mode="json"), "unit": mix.unit, "seed": mix.seed, "replace": mix.replace,
        "samples": total_samples, "tokens": total_tokens, "sources": per_source, "shards": shards,
    }


def read_mixture_manifest(out: str) -> dict[str, Any]:
    with fsspec.open(f"{out.rstrip('/')}/{MANIFEST_FILE}", "rt") as f:
        return json.load(f)


__all__ = ["Mixture", "MixResult", "load_mixture", "read_mixture_manifest", "run_mix", "select"]
