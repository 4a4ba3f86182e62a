"""Statistics of a finished run: ``stats.json`` and a self-contained ``report.html``.

``curate stats OUTPUT`` calls :func:`write_stats`; so does every ``curate run``
once its manifest is complete (:func:`write_stats_after_run`, which never fails
the run: the outputs are already complete, and the stats can be redone).

Example::

    from curate.stats import write_stats
    stats = write_stats("out/")   # writes out/stats.json, out/report.html, updates out/manifest.json
    print(stats.rows.kept, "kept of", stats.rows.input)
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from curate.stats.model import Stats

if TYPE_CHECKING:
    from curate.manifest import Manifest
    from curate.stats.compute import StatsError, compute_stats

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
REPORT_FILE = "report.html"

__all__ = ["REPORT_FILE", "STATS_FILE", "Stats", "StatsError", "compute_stats", "write_stats",
           "write_stats_after_run"]


def __getattr__(name: str) -> Any:
    """``compute_stats`` and ``StatsError`` load polars on first use: the engine's workers import
    :mod:`curate.stats.thumbnails` and never compute statistics."""
    if name in ("compute_stats", "StatsError"):
        from curate.stats import compute

        return getattr(compute, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_stats(output: str, *, report: bool = True) -> Stats:
    """Compute the run's statistics and write ``stats.json`` (and ``report.html``) into ``output``.

    The manifest's ``stats`` field is updated to name the files written.
    """
    import fsspec

    from curate.fsutil import write_json
    from curate.stats.compute import compute_stats
    from curate.stats.report import write_report
    from curate.stats.thumbnails import read_samples, thumbnail_uris

    root = output.rstrip("/")
    stats = compute_stats(root)
    write_json(f"{root}/{STATS_FILE}", stats.as_json())
    written = {"stats": STATS_FILE}
    if report:
        write_report(stats, f"{root}/{REPORT_FILE}", thumbnails=thumbnail_uris(read_samples(root)))
        written["report"] = REPORT_FILE
    with fsspec.open(f"{root}/manifest.json", "r") as f:
        manifest = json.load(f)
    manifest["stats"] = {**manifest.get("stats", {}), **written}
    write_json(f"{root}/manifest.json", manifest)
    return stats


def write_stats_after_run(output: str, manifest: Manifest) -> Manifest:
    """End of ``curate run``: write the statistics and return the manifest that names them.

    A failure here is logged, not raised: the run's outputs are complete and
    committed, and ``curate stats OUTPUT`` recomputes the statistics alone.
    """
    try:
        stats = write_stats(output)
    except Exception as e:  # noqa: BLE001 - statistics must not turn a finished run into a failed one
        log.error("statistics failed (%s: %s); the run's outputs are complete, retry with `curate stats %s`",
                  e.__class__.__name__, e, output)
        return manifest
    log.info("statistics written in %.2fs: %s/%s", stats.seconds, output.rstrip("/"), REPORT_FILE)
    return manifest.model_copy(update={"stats": {**manifest.stats, "stats": STATS_FILE, "report": REPORT_FILE}})
