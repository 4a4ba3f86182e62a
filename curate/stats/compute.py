"""Compute ``stats.json`` for a finished run from its ledger, manifest, markers and shards.

The ledger (``OUTPUT/ledger/*.parquet``) has one row per input row with its
fate and every score a stage recorded, so nearly every number comes from it.
It is read with polars lazy scans, one per file, and only the columns a query
needs are read: a million-row ledger is a few small column reads, never a
whole table in memory. The manifest gives the recipe order of the stages and
the global stages' info (duplicate cluster sizes); the ``_done`` markers give
packing numbers when a run packed; the Parquet shards' footers give the
embedding columns and their dimension (no data pages are read).

Example::

    from curate.stats import compute_stats
    stats = compute_stats("out/")          # a Stats model
    stats.rows.input == stats.rows.kept + stats.rows.dropped
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import curate.stats.thumbnails as thumbs
from curate import __version__, rows
from curate.errors import CurateError
from curate.stats.model import (
    CategoryCount,
    Distribution,
    DuplicateClusters,
    Example,
    FunnelStep,
    GalleryGroup,
    Histogram,
    ImageSizes,
    Languages,
    Packing,
    RowCounts,
    ShardFiles,
    SourceCount,
    Stats,
    Summary,
    Tokens,
    UnreadableShard,
)

log = logging.getLogger(__name__)

#: Bins of a histogram: fine enough to see a threshold's cut, coarse enough that
#: a few hundred rows still fill them.
NUM_BINS = 30
#: Integer columns whose range is at most this get one bin per integer value
#: (word counts, small token counts), which reads better than fractional bins.
MAX_INTEGER_BINS = 60
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Languages shown by name; the tail is summed into ``other`` so the chart stays legible.
TOP_LANGUAGES = 15
#: Sources listed by name (a mixture has a handful; a per-row value would have millions).
TOP_SOURCES = 50
EXAMPLES_PER_REASON = 3
KEPT_EXAMPLES = 6
#: Longest caption stored in an example; stats.json stays small whatever the input.
EXAMPLE_CAPTION_CHARS = 300

SOURCE_COLUMN = "source"
#: The ``_done`` marker's block written by the packed sink: sequences, tokens, capacity, efficiency.
PACKED_KEY = "packed"
TOKENS_COLUMN = "num_tokens"
#: The language stage writes ``lang``; ``language`` is accepted for outputs of other tools.
LANGUAGE_COLUMNS = ("lang", "language")
#: Image size columns, best first: the size before the download stage resized it says
#: more about the data than the (often fixed) stored size.
SIZE_COLUMNS = (("original_width", "original_height"), ("width", "height"))
#: Numeric columns that are not scores: they have their own sections (sizes, tokens,
#: caption length) or are codes, not quantities (HTTP status, a 64-bit perceptual hash).
NOT_SCORES = frozenset({"http_status", "width", "height", "original_width", "original_height",
                        TOKENS_COLUMN, "caption_words", "caption_chars", "phash", "text_tokens"})


class StatsError(CurateError):
    """The output cannot be summarised (no manifest, unreadable ledger)."""


# ------------------------------------------------------------------ reading


class RunFiles:
    """The parts of a run's output that statistics read, on any fsspec file system."""

    def __init__(self, output: str) -> None:
        self.root = output.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.root)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols  # polars reads these paths itself, lazily
        manifest_path = f"{self._root}/manifest.json"
        if not self.fs.exists(manifest_path):
            raise StatsError(f"{self.root}: no manifest.json; is this the output folder of `curate run`?")
        try:
            with self.fs.open(manifest_path, "r") as f:
                self.manifest: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as e:
            raise StatsError(f"{self.root}/manifest.json: not readable JSON: {e}") from e
        self.ledger_files = [f"{self._root}/{p}" for p in self.manifest.get("ledger", [])]
        missing = [p for p in self.ledger_files if not self.fs.exists(p)]
        if missing:
            raise StatsError(f"{self.root}: ledger file(s) listed in manifest.json are missing: {missing[:3]}")

    def ledger_schema(self) -> pa.Schema:
        """The union of every ledger file's schema (shards may differ in carried or null-typed columns)."""
        schemas = []
        for p in self.ledger_files:
            with self.fs.open(p, "rb") as f:
                schemas.append(pq.read_schema(f))
        if not schemas:
            return pa.schema([])
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # e.g. a carried column that is int in one shard, text in another
            types: dict[str, pa.DataType] = {}
            for sch in schemas:
                for f in sch:
                    if f.name not in types or pa.types.is_null(types[f.name]):
                        types[f.name] = f.type
                    elif types[f.name] != f.type and not pa.types.is_null(f.type):
                        types[f.name] = pa.string()  # conflicting: summarised as text, never as a score
            return pa.schema(list(types.items()))

    def scan_ledger(self, columns: list[str]) -> pl.LazyFrame:
        """A lazy frame of ``columns`` over every ledger file (absent columns read as null)."""
        frames = []
        for p in self.ledger_files:
            if self.local:
                lf = pl.scan_parquet(p)
                names = lf.collect_schema().names()
            else:  # object stores polars cannot address: read the needed columns of one file at a time
                with self.fs.open(p, "rb") as f:
                    names = pq.read_schema(f).names
                with self.fs.open(p, "rb") as f:
                    lf = pl.read_parquet(f, columns=[c for c in columns if c in names]).lazy()
            present = [c for c in columns if c in names]
            lf = lf.select(present)
            missing = [pl.lit(None).alias(c) for c in columns if c not in names]
            frames.append(lf.with_columns(missing) if missing else lf)
        if not frames:
            return pl.LazyFrame({c: [] for c in columns})
        return pl.concat(frames, how="diagonal_relaxed").select(columns)

    def done_markers(self) -> list[dict[str, Any]]:
        try:
            paths = sorted(self.fs.glob(f"{self._root}/_done/*.json"))
        except FileNotFoundError:
            return []
        out = []
        for p in paths:
            with self.fs.open(p, "r") as f:
                out.append(json.load(f))
        return out

    def shard_footers(self) -> tuple[list[ShardFiles], dict[str, int]]:
        """Files, samples and bytes per output format; embedding dimensions from Parquet footers."""
        by_format: dict[str, ShardFiles] = {}
        dims: dict[str, int] = {}
        for entry in self.manifest.get("shards", []):
            path = f"{self._root}/{entry['path']}"
            fmt = entry.get("format", "?")
            sf = by_format.setdefault(fmt, ShardFiles(format=fmt, files=0, samples=0, bytes=0))
            sf.files += 1
            sf.samples += int(entry.get("num_samples", 0))
            try:
                sf.bytes += int(self.fs.size(path) or 0)
            except FileNotFoundError:
                log.warning("%s: shard %s listed in manifest.json is missing", self.root, entry["path"])
                continue
            if fmt == "parquet":
                with self.fs.open(path, "rb") as f:
                    schema = pq.read_schema(f)
                for field in schema:
                    if rows.is_embedding(field.name) and field.name not in dims:
                        dims[field.name] = _list_size(field.type)
        return list(by_format.values()), dims


def _list_size(t: pa.DataType) -> int:
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    return -1  # a variable-length list: the dimension is per row


# ------------------------------------------------------------------ distributions


def _is_numeric(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t)) and not pa.types.is_boolean(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _finite(expr: pl.Expr) -> pl.Expr:
    """Values usable in a histogram: not null, not NaN, not infinite."""
    e = expr.cast(pl.Float64)
    return e.filter(e.is_finite())


def _summary_exprs(name: str, prefix: str, expr: pl.Expr) -> list[pl.Expr]:
    v = _finite(expr)
    out = [v.len().alias(f"{prefix}count"), v.min().alias(f"{prefix}min"), v.max().alias(f"{prefix}max"),
           v.mean().alias(f"{prefix}mean")]
    out += [v.quantile(q, interpolation="linear").alias(f"{prefix}q{q}") for q in QUANTILES]
    return out


def _summary(row: dict[str, Any], prefix: str, total: int) -> Summary:
    count = int(row[f"{prefix}count"] or 0)

    def num(x: Any) -> float | None:
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)

    return Summary(count=count, nulls=total - count, min=num(row[f"{prefix}min"]), max=num(row[f"{prefix}max"]),
                   mean=num(row[f"{prefix}mean"]),
                   quantiles={f"p{round(q * 100):02d}": float(row[f"{prefix}q{q}"]) for q in QUANTILES
                              if count and row[f"{prefix}q{q}"] is not None})


def _edges(lo: float, hi: float, integer: bool) -> list[float]:
    if integer and hi - lo <= MAX_INTEGER_BINS:
        return [lo - 0.5 + i for i in range(int(hi - lo) + 2)]
    if hi <= lo:
        return [lo - 0.5, lo + 0.5]
    step = (hi - lo) / NUM_BINS
    return [lo + i * step for i in range(NUM_BINS)] + [hi]


def _bin_counts(lf: pl.LazyFrame, column: str, edges: list[float], kept: pl.Expr) -> tuple[list[int], list[int]]:
    """Counts per bin for every row with a finite value and for the kept ones, in one pass."""
    n = len(edges) - 1
    lo, width = edges[0], (edges[-1] - edges[0]) / n
    v = pl.col(column).cast(pl.Float64)
    # one value so large that lo ± 0.5 rounds to lo: every row in the one bin
    b = ((pl.col("v") - lo) / width).floor().clip(0, n - 1) if width > 0 else pl.lit(0.0)
    binned = (
        lf.select(v.alias("v"), kept.alias("k"))
        .filter(pl.col("v").is_finite())
        .select(b.cast(pl.Int64).alias("b"), "k")
        .group_by("b")
        .agg(pl.len().alias("all"), pl.col("k").sum().alias("kept"))
        .collect(engine="streaming")
    )
    all_counts, kept_counts = [0] * n, [0] * n
    for b, a, k in binned.iter_rows():
        all_counts[b] += int(a)
        kept_counts[b] += int(k or 0)
    return all_counts, kept_counts


def distributions(lf: pl.LazyFrame, columns: dict[str, pl.Expr], integer: set[str]) -> dict[str, Distribution]:
    """Summary (all rows, kept rows) and a shared-edge histogram for each named expression.

    ``lf`` must have a ``status`` column. Two streaming passes: summaries, then bin counts.
    """
    if not columns:
        return {}
    kept = pl.col(rows.STATUS) == rows.KEPT
    frame = lf.select([pl.col(rows.STATUS)] + [e.alias(name) for name, e in columns.items()])
    exprs: list[pl.Expr] = [pl.len().alias("__total"), kept.sum().alias("__kept")]
    for name in columns:
        exprs += _summary_exprs(name, f"{name}|a|", pl.col(name))
        exprs += _summary_exprs(name, f"{name}|k|", pl.col(name).filter(kept))
    row = frame.select(exprs).collect(engine="streaming").row(0, named=True)
    total, n_kept = int(row["__total"]), int(row["__kept"] or 0)
    out: dict[str, Distribution] = {}
    for name in columns:
        s_all = _summary(row, f"{name}|a|", total)
        s_kept = _summary(row, f"{name}|k|", n_kept)
        if s_all.count == 0:
            continue
        edges = _edges(s_all.min, s_all.max, name in integer)  # type: ignore[arg-type]
        a, k = _bin_counts(frame, name, edges, kept)
        out[name] = Distribution(column=name, all=s_all, kept=s_kept, histogram=Histogram(edges=edges, all=a, kept=k))
    return out


# ------------------------------------------------------------------ sections


def funnel(manifest: dict[str, Any], dropped: dict[tuple[str, str], int], total: int) -> list[FunnelStep]:
    """Stages in recipe order (from the manifest), counts from the ledger."""
    by_stage: dict[str, dict[str, int]] = {}
    for (stage, reason), n in dropped.items():
        by_stage.setdefault(stage, {})[reason] = n
    order: list[tuple[str, str, str]] = [(s["name"], s.get("use", s["name"]), s.get("kind", "map"))
                                         for s in manifest.get("stages", [])]
    if "source" in by_stage and all(name != "source" for name, _, _ in order):
        order.insert(0, ("source", "source", "source"))
    known = {name for name, _, _ in order}
    order += [(name, name, "unknown") for name in sorted(by_stage) if name not in known]
    steps, alive = [], total
    for name, use, kind in order:
        d = dict(sorted(by_stage.get(name, {}).items(), key=lambda kv: (-kv[1], kv[0])))
        n = sum(d.values())
        steps.append(FunnelStep(name=name, use=use, kind=kind, rows_in=alive, kept=alive - n, dropped=d))
        alive -= n
    return steps


def duplicate_clusters(manifest: dict[str, Any]) -> list[DuplicateClusters]:
    """Every ``cluster_sizes`` histogram in the global stages' info, at any nesting level."""
    out: list[DuplicateClusters] = []

    def visit(stage: str, level: str | None, info: Any) -> None:
        if not isinstance(info, dict):
            return
        sizes = info.get("cluster_sizes")
        if isinstance(sizes, dict):
            clean = {str(k): int(v) for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0]))}
            out.append(DuplicateClusters(
                stage=stage, level=level, cluster_sizes=clean, clusters=sum(clean.values()),
                rows_in_clusters=sum(int(k) * v for k, v in clean.items()),
                removed=sum((int(k) - 1) * v for k, v in clean.items())))
        for k, v in info.items():
            if k != "cluster_sizes" and isinstance(v, dict):
                visit(stage, k if level is None else f"{level}.{k}", v)

    for s in manifest.get("stages", []):
        visit(s["name"], None, s.get("info") or {})
    return out


def packing(manifest: dict[str, Any], markers: list[dict[str, Any]]) -> Packing | None:
    """Packing efficiency from the ``_done`` markers (summed tokens, so shards weigh by size), else the manifest.

    A marker's ``packed`` block (written by the packed sink) is read for ``tokens`` /
    ``capacity`` and ``sequences``; ``efficiency`` alone is averaged by sequences.
    ``packing_efficiency`` in the manifest's stage info is the fallback.
    """
    filled = capacity = sequences = 0
    weighted: list[tuple[float, int]] = []
    for m in markers:
        block = m.get(PACKED_KEY)
        if not isinstance(block, dict):
            continue
        seq = int(block.get("sequences") or 0)
        sequences += seq
        if block.get("tokens") is not None and block.get("capacity"):
            filled += int(block["tokens"])
            capacity += int(block["capacity"])
        elif block.get("efficiency") is not None:
            weighted.append((float(block["efficiency"]), max(seq, 1)))
    if capacity:
        return Packing(efficiency=filled / capacity, sequences=sequences or None, filled_tokens=filled,
                       capacity_tokens=capacity, found_in="_done markers")
    if weighted:
        eff = sum(e * w for e, w in weighted) / sum(w for _, w in weighted)
        return Packing(efficiency=eff, sequences=sequences or None, found_in="_done markers")
    for s in manifest.get("stages", []):
        info = s.get("info") or {}
        if isinstance(info.get("packing_efficiency"), int | float):
            return Packing(efficiency=float(info["packing_efficiency"]), sequences=info.get("sequences"),
                           found_in="manifest")
    return None


def _fold_sources(sources: list[SourceCount]) -> list[SourceCount]:
    """The TOP_SOURCES largest by rows (in name order), the rest summed into ``other``."""
    if len(sources) <= TOP_SOURCES:
        return sources
    ranked = sorted(sources, key=lambda s: (-s.rows, s.source))
    head, tail = ranked[:TOP_SOURCES - 1], ranked[TOP_SOURCES - 1:]
    tokens = None if tail[0].tokens is None else sum(s.tokens or 0 for s in tail)
    kept_tokens = None if tail[0].kept_tokens is None else sum(s.kept_tokens or 0 for s in tail)
    other = SourceCount(source="other", rows=sum(s.rows for s in tail), kept=sum(s.kept for s in tail),
                        tokens=tokens, kept_tokens=kept_tokens)
    return sorted(head, key=lambda s: s.source) + [other]


def unreadable_shards(manifest: dict[str, Any]) -> list[UnreadableShard]:
    """The input shards the run could not read, as the manifest lists them (by shard number)."""
    out = []
    for e in manifest.get("source_errors") or []:
        try:
            out.append(UnreadableShard(shard=int(e["shard"]), path=str(e.get("path", "")),
                                       error=str(e.get("error", "")), rows_read=int(e.get("rows_read") or 0)))
        except (KeyError, TypeError, ValueError):
            log.warning("manifest.json: unreadable source_errors entry %r", e)
    return sorted(out, key=lambda u: u.shard)


def _examples(files: RunFiles, has_url: bool) -> list[Example]:
    cols = [rows.KEY, rows.CAPTION, rows.STATUS, rows.DROPPED_BY, rows.REASON] + ([rows.URL] if has_url else [])
    lf = files.scan_ledger(cols)
    caption = pl.col(rows.CAPTION).str.slice(0, EXAMPLE_CAPTION_CHARS)
    dropped = (lf.filter(pl.col(rows.STATUS) != rows.KEPT)
               .with_columns(caption)
               .sort(rows.KEY)
               .group_by([rows.DROPPED_BY, rows.REASON], maintain_order=True)
               .head(EXAMPLES_PER_REASON))
    kept = lf.filter(pl.col(rows.STATUS) == rows.KEPT).with_columns(caption).sort(rows.KEY).head(KEPT_EXAMPLES)
    d, k = pl.collect_all([dropped, kept])
    out = []
    for r in k.iter_rows(named=True):
        out.append(Example(key=r[rows.KEY], url=r.get(rows.URL), caption=r[rows.CAPTION]))
    for r in d.sort([rows.DROPPED_BY, rows.REASON, rows.KEY]).iter_rows(named=True):
        out.append(Example(key=r[rows.KEY], url=r.get(rows.URL), caption=r[rows.CAPTION],
                           stage=r[rows.DROPPED_BY], reason=r[rows.REASON]))
    return out


# ------------------------------------------------------------------ entry point


def compute_stats(output: str) -> Stats:
    """Summarise the run in ``output`` (any fsspec path) into a :class:`Stats` model."""
    t0 = time.perf_counter()
    files = RunFiles(output)
    manifest = files.manifest
    schema = files.ledger_schema()
    names = set(schema.names)
    for required in (rows.KEY, rows.STATUS, rows.DROPPED_BY, rows.REASON):
        if files.ledger_files and required not in names:
            raise StatsError(f"{files.root}/ledger: column {required!r} is missing; columns: {sorted(names)}")
    kept_expr = pl.col(rows.STATUS) == rows.KEPT

    # counts per (stage, reason): the funnel
    base = files.scan_ledger([rows.STATUS, rows.DROPPED_BY, rows.REASON])
    grouped = (base.group_by([rows.STATUS, rows.DROPPED_BY, rows.REASON]).agg(pl.len().alias("n"))
               .collect(engine="streaming"))
    total = kept = 0
    dropped: dict[tuple[str, str], int] = {}
    for status, by, reason, n in grouped.iter_rows():
        total += n
        if status == rows.KEPT:
            kept += n
        else:
            key = (by or "unknown", reason or "unknown")
            dropped[key] = dropped.get(key, 0) + n
    steps = funnel(manifest, dropped, total)

    # per source and tokens
    sources = tokens = None
    has_tokens = TOKENS_COLUMN in names and _is_numeric(schema.field(TOKENS_COLUMN).type)
    if SOURCE_COLUMN in names or has_tokens:
        cols = [rows.STATUS] + [c for c in (SOURCE_COLUMN, TOKENS_COLUMN) if c in names and
                                (c != TOKENS_COLUMN or has_tokens)]
        lf = files.scan_ledger(cols)
        group = [pl.col(SOURCE_COLUMN).cast(pl.String).fill_null("(none)")] if SOURCE_COLUMN in names else [pl.lit("all")]
        aggs = [pl.len().alias("rows"), kept_expr.sum().alias("kept")]
        if has_tokens:
            aggs += [pl.col(TOKENS_COLUMN).sum().alias("tokens"),
                     pl.col(TOKENS_COLUMN).filter(kept_expr).sum().alias("kept_tokens")]
        per = lf.group_by(group[0].alias("source")).agg(aggs).sort("source").collect(engine="streaming")
        if SOURCE_COLUMN in names:
            sources = [SourceCount(source=r["source"], rows=r["rows"], kept=r["kept"],
                                   tokens=int(r["tokens"]) if has_tokens else None,
                                   kept_tokens=int(r["kept_tokens"]) if has_tokens else None)
                       for r in per.iter_rows(named=True)]
            sources = _fold_sources(sources)
        if has_tokens:
            tokens = Tokens(column=TOKENS_COLUMN, total=int(per["tokens"].sum()), kept=int(per["kept_tokens"].sum()))

    # distributions: scores, caption length, image sizes
    numeric = {f.name: f.type for f in schema if _is_numeric(f.type) and not rows.is_internal(f.name)}
    score_cols = [c for c in numeric if c not in NOT_SCORES]
    size_cols = next(((w, h) for w, h in SIZE_COLUMNS if w in numeric and h in numeric), None)
    wanted = [rows.STATUS] + score_cols + ([rows.CAPTION] if rows.CAPTION in names else [])
    wanted += list(size_cols) if size_cols else []
    lf = files.scan_ledger(list(dict.fromkeys(wanted)))
    exprs: dict[str, pl.Expr] = {c: pl.col(c) for c in score_cols}
    integer = {c for c in score_cols if pa.types.is_integer(numeric[c])}
    if rows.CAPTION in names:
        exprs["caption_chars"] = pl.col(rows.CAPTION).cast(pl.String).str.len_chars()
        exprs["caption_words"] = pl.col(rows.CAPTION).cast(pl.String).str.count_matches(r"\S+")
        integer |= {"caption_chars", "caption_words"}
    if size_cols:
        w, h = (pl.col(c).cast(pl.Float64) for c in size_cols)
        exprs["image_width"] = pl.when(w > 0).then(w)
        exprs["image_height"] = pl.when(h > 0).then(h)
        exprs["aspect_ratio"] = pl.when((w > 0) & (h > 0)).then(w / h)
        integer |= {"image_width", "image_height"}
    dist = distributions(lf, exprs, integer)

    image_sizes = None
    if size_cols and all(k in dist for k in ("image_width", "image_height", "aspect_ratio")):
        image_sizes = ImageSizes(width_column=size_cols[0], height_column=size_cols[1],
                                 width=dist["image_width"].model_copy(update={"column": size_cols[0]}),
                                 height=dist["image_height"].model_copy(update={"column": size_cols[1]}),
                                 aspect_ratio=dist["aspect_ratio"])

    # language mix
    languages = None
    lang_col = next((c for c in LANGUAGE_COLUMNS if c in names and _is_text(schema.field(c).type)), None)
    if lang_col:
        per = (files.scan_ledger([rows.STATUS, lang_col]).filter(pl.col(lang_col).is_not_null())
               .group_by(lang_col).agg(pl.len().alias("rows"), kept_expr.sum().alias("kept"))
               .sort(["rows", lang_col], descending=[True, False]).collect(engine="streaming"))
        counts = [CategoryCount(value=r[lang_col], rows=r["rows"], kept=r["kept"]) for r in per.iter_rows(named=True)]
        if len(counts) > TOP_LANGUAGES:
            tail = counts[TOP_LANGUAGES - 1:]
            counts = counts[:TOP_LANGUAGES - 1] + [CategoryCount(value="other", rows=sum(c.rows for c in tail),
                                                                 kept=sum(c.kept for c in tail))]
        languages = Languages(column=lang_col, counts=counts)

    markers = files.done_markers()
    shard_files, dims = files.shard_footers()
    examples = _examples(files, rows.URL in names) if files.ledger_files else []
    counts = {(st.name, r): n for st in steps for r, n in st.dropped.items()} | {(None, None): kept}
    gallery = [GalleryGroup.model_validate(g) for g in thumbs.gallery(thumbs.read_samples(files.root), counts)]

    m_counts = manifest.get("counts", {})
    m_dropped = {(st, r): n for st, rs in m_counts.get("dropped", {}).items() for r, n in rs.items()}
    checks = {
        "ledger_rows_equal_manifest_input": total == m_counts.get("input"),
        "ledger_kept_equals_manifest_kept": kept == m_counts.get("kept"),
        "ledger_drops_equal_manifest_drops": dropped == m_dropped,
        "input_equals_kept_plus_dropped": total == kept + sum(dropped.values()),
    }
    for sf in shard_files:
        checks[f"{sf.format}_samples_equal_kept"] = sf.samples == kept

    return Stats(
        curate_version=__version__, output=files.root, complete=bool(manifest.get("complete")),
        rows=RowCounts(input=total, kept=kept, dropped=total - kept), funnel=steps, sources=sources, tokens=tokens,
        scores=[dist[c] for c in score_cols if c in dist],
        caption_chars=dist.get("caption_chars"), caption_words=dist.get("caption_words"),
        languages=languages, image_sizes=image_sizes, duplicates=duplicate_clusters(manifest),
        packing=packing(manifest, markers), shards=shard_files, embeddings=dims, examples=examples, gallery=gallery,
        source_errors=unreadable_shards(manifest), checks=checks, seconds=round(time.perf_counter() - t0, 3),
    )
