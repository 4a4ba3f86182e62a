"""A recipe as phases: per-sample stages run in phases, global stages between them.

::

    stages: [download, caption_rules, clip_score, dedup_exact, keep_fraction, recaption, pack]
    phase 0: download → caption_rules → clip_score          (per sample, streamed)
    globals after phase 0: dedup_exact, keep_fraction         (whole pool, keys and scores only)
    phase 1: recaption → pack                                 (per sample, on the rows still kept)

Everything that can be checked before any work is checked here: each stage's own
``check()`` (a missing checkpoint), the columns global stages read, the packing options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curate import rows
from curate.errors import RecipeError
from curate.recipe import Recipe
from curate.sinks.packed import packing_options
from curate.sources.base import Source
from curate.stages.base import GlobalStage, StageConfig
from curate.stages.registry import stage_class


def stage_name(cfg: StageConfig) -> str:
    """The name a stage goes by in the ledger and the manifest."""
    return cfg.name or cfg.use


@dataclass
class Phase:
    """Per-sample stages that run streamed, then the global stages that need all of their output."""

    index: int
    stages: list[StageConfig] = field(default_factory=list)
    globals_after: list[StageConfig] = field(default_factory=list)
    final: bool = False


@dataclass
class Plan:
    """What a run does, decided before any work."""

    phases: list[Phase]
    #: what the packed writer needs (from the one ``pack`` stage), or None without packed output
    packing: dict[str, Any] | None


def make_phases(stages: list[StageConfig]) -> list[Phase]:
    """Split the stage list at global stages: [map…] [global…] [map…] …"""
    phases = [Phase(0)]
    for cfg in stages:
        if stage_class(cfg.use).kind == "global":
            phases[-1].globals_after.append(cfg)
        else:
            if phases[-1].globals_after:
                phases.append(Phase(len(phases)))
            phases[-1].stages.append(cfg)
    if phases[-1].globals_after:
        phases.append(Phase(len(phases)))
    phases[-1].final = True
    return phases


def make_plan(recipe: Recipe, source: Source) -> Plan:
    """Check the recipe against this machine and its input, then split it into phases."""
    for cfg in recipe.stages:  # fail before any work when a stage cannot run here (e.g. no checkpoint)
        stage_class(cfg.use)(cfg).check()
    check_global_columns(recipe, source)
    packing = packing_options(recipe)  # `packed` output without a `pack` stage fails here
    return Plan(phases=make_phases(recipe.stages), packing=packing)


def check_global_columns(recipe: Recipe, source: Source) -> None:
    """For sources whose columns are all known up front (URL lists): a global stage reading a column
    that neither the input nor an earlier stage provides fails now, not after every download."""
    from curate.sources.urllist import UrlListSource

    if not isinstance(source, UrlListSource):
        return  # sources with images carry metadata columns known only once read
    known = {rows.KEY, rows.URL, rows.CAPTION, rows.STATUS, rows.DROPPED_BY, rows.REASON}
    used = {recipe.source.url_col, recipe.source.caption_col, recipe.source.key_col}
    known |= {f"source_{c}" if c in rows.RESERVED else c for c in source._header(source.files[0]) if c not in used}
    for cfg in recipe.stages:
        stage = stage_class(cfg.use)(cfg)
        if isinstance(stage, GlobalStage):
            missing = [c for c in stage.input_columns() if c not in known]
            if missing:
                raise RecipeError(
                    f"stage {stage_name(cfg)} reads column(s) {missing}, which neither the input nor an earlier "
                    f"stage provides; available then: {', '.join(sorted(known))}", key="stages")
        known |= set(stage.output_columns)
