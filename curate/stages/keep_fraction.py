"""Keep the best fraction of the whole pool by a score column (a global stage).

DataComp's CLIP filter keeps "the top 30 %": a fraction, so the threshold is a
property of the whole pool and can only be computed once every sample is
scored. This stage reads only keys and the score column of the committed work
files, finds the threshold, and drops the rest. Ties at the threshold are all
kept, so the kept share exceeds the fraction by at most one tie group.
Rows without a score (never scored) are dropped with ``<column>_missing``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate import rows
from curate.stages.base import GlobalStage, StageConfig
from curate.stages.registry import register


class KeepFractionConfig(StageConfig):
    use: Literal["keep_fraction"] = "keep_fraction"
    column: str = Field(description="Score column written by an earlier stage, e.g. clip_score.")
    fraction: float = Field(gt=0, le=1, description="Share of the scored pool to keep.")
    higher_is_better: bool = True


@register
class KeepFraction(GlobalStage[KeepFractionConfig]):
    name = "keep_fraction"
    Config = KeepFractionConfig

    def input_columns(self) -> list[str]:
        return [self.config.column]

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        cfg = self.config
        if cfg.column not in table.column_names:
            raise ValueError(f"{self.stage_name}: column {cfg.column!r} was not produced by an earlier stage")
        keys = table[rows.KEY].to_pylist()
        values = [v if v is not None and math.isfinite(v) else None for v in table[cfg.column].to_pylist()]
        scored = np.array([v for v in values if v is not None], dtype=np.float64)  # NaN/inf count as missing
        sign = 1.0 if cfg.higher_is_better else -1.0
        reasons: list[str | None] = []
        if len(scored):
            n_keep = max(1, math.ceil(cfg.fraction * len(scored)))
            ranked = np.sort(scored * sign)[::-1]
            threshold = float(ranked[n_keep - 1] * sign)
        else:
            threshold = float("nan")
        for v in values:
            if v is None:
                reasons.append(f"{cfg.column}_missing")
            elif (v - threshold) * sign >= 0:
                reasons.append(None)
            else:
                reasons.append(f"{cfg.column}_below_fraction")
        kept = sum(r is None for r in reasons)
        info = {"column": cfg.column, "fraction": cfg.fraction, "threshold": threshold,
                "scored": int(len(scored)), "kept": kept,
                "kept_share": round(kept / len(scored), 6) if len(scored) else 0.0}
        return pa.table({rows.KEY: pa.array(keys, pa.string()), rows.REASON: pa.array(reasons, pa.string())}), info
