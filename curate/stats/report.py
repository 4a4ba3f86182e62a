"""``report.html``: one self-contained page drawn from a :class:`~curate.stats.model.Stats`.

The page is a pure function of ``stats.json`` (and the thumbnails its gallery names, from
``_work/samples.parquet``), so it can be redrawn without the run. Plots are matplotlib PNGs and
thumbnails JPEGs, embedded as ``data:`` URIs; the page fetches
nothing (its Content-Security-Policy forbids any fetch and any script), so it
opens from a laptop, a bucket or an e-mail attachment alike. Every string that
came from the data (captions, URLs, reasons, source names) goes through
Jinja2's autoescaping: a caption holding ``<script>`` is shown as text.

Example::

    from curate.stats import compute_stats
    from curate.stats.report import render_report
    html = render_report(compute_stats("out/"))
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import jinja2

from curate.stats.model import Distribution, Stats

TEMPLATES = Path(__file__).parent / "templates"
#: Figure size in inches at FIG_DPI: 640×300 px reads on a laptop and keeps each PNG ~20 KB.
FIG_SIZE = (6.4, 3.0)
FIG_DPI = 100
#: Reasons shown in the drop chart; the rest are in the funnel table.
MAX_REASON_BARS = 20
#: Cluster counts spanning more than this factor are drawn on a log axis.
LOG_SCALE_SPREAD = 50
#: Up to this many distinct cluster sizes get a tick each.
MAX_SIZE_TICKS = 20
ALL_COLOR, KEPT_COLOR, DROP_COLOR = "#9aa5b1", "#2f7ed8", "#d9534f"
#: A histogram's axes in its 640×300 px figure: room for 7-digit counts on the left, the column's
#: name below and the legend (two entries in a row) above.
HISTOGRAM_MARGINS = {"left": 0.12, "right": 0.98, "bottom": 0.16, "top": 0.86}
#: Galleries drawn per stage (its largest reasons); the others are named under them.
MAX_GALLERY_REASONS = 12


@dataclass
class Plot:
    """One embedded figure: a title, a PNG data URI, and alt text for screen readers and tests."""

    id: str
    title: str
    src: str
    alt: str


def preload() -> None:
    """Import what computing and drawing the report needs (matplotlib and its Agg canvas: 0.6 s
    here; polars and the statistics module: 0.26 s) before it is needed: ``curate run`` calls this
    from a background thread while the stages work, so the report written after the last shard
    does not wait for the imports."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401

    import curate.stats.compute  # noqa: F401


def _figure(width_scale: float = 1.0, height_scale: float = 1.0, *, fixed: bool = False):
    """A figure; ``fixed``: fixed margins for axes whose labels are numbers (the constrained layout
    measures every label and costs about half of drawing a histogram, one per score, caption length
    and image size column)."""
    from matplotlib.figure import Figure  # the OO API: no pyplot global state, no GUI backend

    fig = Figure(figsize=(FIG_SIZE[0] * width_scale, FIG_SIZE[1] * height_scale), dpi=FIG_DPI,
                 layout=None if fixed else "constrained")
    if fixed:
        fig.subplots_adjust(**HISTOGRAM_MARGINS)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def funnel_plot(stats: Stats) -> Plot:
    labels = ["input"] + [s.name for s in stats.funnel]
    remaining = [stats.rows.input] + [s.kept for s in stats.funnel]
    dropped = [0] + [s.rows_in - s.kept for s in stats.funnel]
    fig = _figure(height_scale=max(1.0, 0.35 * len(labels) / 2))
    ax = fig.add_subplot()
    y = list(range(len(labels)))[::-1]
    ax.barh(y, remaining, color=KEPT_COLOR, label="rows left")
    ax.barh(y, dropped, left=remaining, color=DROP_COLOR, label="dropped here")
    for yi, r, d in zip(y, remaining, dropped, strict=True):
        ax.text(r, yi, f" {r:,}" + (f"  (−{d:,})" if d else ""), va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("rows")
    ax.set_xlim(0, max(stats.rows.input, 1) * 1.25)
    ax.legend(loc="lower right", fontsize=8)
    return Plot("funnel", "Funnel: rows left after each stage", _png(fig),
                f"funnel from {stats.rows.input} input rows to {stats.rows.kept} kept")


def reasons_plot(stats: Stats) -> Plot | None:
    pairs = [(f"{s.name}: {r}", n) for s in stats.funnel for r, n in s.dropped.items()]
    if not pairs:
        return None
    pairs = sorted(pairs, key=lambda p: -p[1])[:MAX_REASON_BARS][::-1]
    fig = _figure(height_scale=max(1.0, 0.3 * len(pairs) / 2))
    ax = fig.add_subplot()
    ax.barh(range(len(pairs)), [n for _, n in pairs], color=DROP_COLOR)
    ax.set_yticks(range(len(pairs)), [label for label, _ in pairs], fontsize=7)
    ax.set_xlabel("rows dropped")
    return Plot("reasons", "Drops by stage and reason", _png(fig), f"{len(pairs)} drop reasons")


def histogram_plot(dist: Distribution, title: str, plot_id: str) -> Plot:
    """All rows with a value (grey) behind kept rows (blue), on the same bins: the before/after view.

    Each is one filled step outline (``stairs``), not a bar per bin: the same picture, drawn as one
    patch instead of one per bin (five histograms: 0.58 s instead of 0.83 s here)."""
    h = dist.histogram
    fig = _figure(fixed=True)
    ax = fig.add_subplot()
    ax.stairs(h.all, h.edges, fill=True, color=ALL_COLOR, label=f"all ({dist.all.count:,})")
    ax.stairs(h.kept, h.edges, fill=True, color=KEPT_COLOR, alpha=0.85, label=f"kept ({dist.kept.count:,})")
    ax.set_xlabel(dist.column)
    ax.set_ylabel("rows")
    # above the axes: never over the bars, and no search for the emptiest corner (loc="best" tries
    # every bar against every candidate place)
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False)
    return Plot(plot_id, title, _png(fig), f"histogram of {dist.column}: all rows and kept rows")


def categories_plot(plot_id: str, title: str, labels: list[str], all_counts: list[int],
                    kept_counts: list[int], xlabel: str, ylabel: str = "rows") -> Plot:
    fig = _figure(width_scale=max(1.0, len(labels) / 16))
    ax = fig.add_subplot()
    x = list(range(len(labels)))
    ax.bar([i - 0.2 for i in x], all_counts, width=0.4, color=ALL_COLOR, label="all")
    ax.bar([i + 0.2 for i in x], kept_counts, width=0.4, color=KEPT_COLOR, label="kept")
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center",
                  fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return Plot(plot_id, title, _png(fig), f"{title}: {len(labels)} values")


def duplicates_plot(stats: Stats) -> Plot | None:
    groups = [d for d in stats.duplicates if d.cluster_sizes]
    if not groups:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(groups)
    for i, d in enumerate(groups):
        sizes = [int(k) for k in d.cluster_sizes]
        ax.bar([s - 0.4 + width * (i + 0.5) for s in sizes], list(d.cluster_sizes.values()), width=width,
               label=f"{d.stage}" + (f" ({d.level})" if d.level else ""))
    from matplotlib.ticker import MaxNLocator

    counts = [n for d in groups for n in d.cluster_sizes.values()]
    sizes = sorted({int(k) for d in groups for k in d.cluster_sizes})
    ax.set_xlabel("cluster size (rows)")
    ax.set_ylabel("clusters")
    if len(sizes) <= MAX_SIZE_TICKS:
        ax.set_xticks(sizes)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if max(counts) > LOG_SCALE_SPREAD * min(counts):  # pairs vastly outnumber big clusters at scale
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return Plot("duplicates", "Duplicate cluster sizes", _png(fig), f"cluster sizes of {len(groups)} dedup levels")


def plots(stats: Stats) -> list[Plot]:
    """Every figure the data supports, in reading order."""
    out: list[Plot | None] = [funnel_plot(stats), reasons_plot(stats)]
    if stats.sources:
        out.append(categories_plot("sources", "Rows per source", [s.source for s in stats.sources],
                                   [s.rows for s in stats.sources], [s.kept for s in stats.sources], "source"))
        if stats.tokens:
            out.append(categories_plot("source-tokens", "Tokens per source", [s.source for s in stats.sources],
                                       [s.tokens or 0 for s in stats.sources],
                                       [s.kept_tokens or 0 for s in stats.sources], "source", "tokens"))
    for d in stats.scores:
        out.append(histogram_plot(d, f"Score: {d.column}", f"score-{d.column}"))
    for d, title in ((stats.caption_chars, "Caption length (characters)"),
                     (stats.caption_words, "Caption length (words)")):
        if d is not None:
            out.append(histogram_plot(d, title, d.column.replace("_", "-")))
    if stats.languages:
        c = stats.languages.counts
        out.append(categories_plot("languages", "Language mix", [x.value for x in c], [x.rows for x in c],
                                   [x.kept for x in c], stats.languages.column))
    if stats.image_sizes:
        s = stats.image_sizes
        out.append(histogram_plot(s.width, f"Image width ({s.width_column})", "image-width"))
        out.append(histogram_plot(s.height, f"Image height ({s.height_column})", "image-height"))
        out.append(histogram_plot(s.aspect_ratio, "Aspect ratio (width / height)", "aspect-ratio"))
    out.append(duplicates_plot(stats))
    return [p for p in out if p is not None]


def galleries(stats: Stats) -> tuple[list, dict[str, list[str]]]:
    """The gallery groups drawn (per stage its MAX_GALLERY_REASONS largest reasons), and per stage the
    reasons left out."""
    drawn: list = []
    left: dict[str, list[str]] = {}
    per: dict[str | None, int] = {}
    for g in stats.gallery:  # funnel order: a stage's reasons largest first
        per[g.stage] = per.get(g.stage, 0) + 1
        if per[g.stage] <= MAX_GALLERY_REASONS:
            drawn.append(g)
        else:
            left.setdefault(g.stage or "kept", []).append(g.reason or "")
    return drawn, left


def render_report(stats: Stats, thumbnails: dict[str, str] | None = None) -> str:
    """The HTML page; autoescaped, so data strings cannot inject markup.

    ``thumbnails`` maps a gallery row's key to its ``data:image/jpeg`` URI
    (:func:`curate.stats.thumbnails.thumbnail_uris`); rows without one are shown as text."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    kept_share = stats.rows.kept / stats.rows.input if stats.rows.input else 0.0
    env.filters["size"] = _human_bytes
    drawn, left = galleries(stats)
    return env.get_template("report.html.j2").render(stats=stats, plots=plots(stats), kept_share=kept_share,
                                                     gallery=drawn, gallery_left=left, thumbs=thumbnails or {})


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover - loop always returns


def write_report(stats: Stats, path: str, thumbnails: dict[str, str] | None = None) -> None:
    from curate.fsutil import atomic_open

    with atomic_open(path) as f:
        f.write(render_report(stats, thumbnails).encode("utf-8"))
