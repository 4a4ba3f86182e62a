"""Stages by name. Importing this package registers every built-in stage."""

import curate.stages.caption_rules  # noqa: F401
import curate.stages.clip_tags  # noqa: F401
import curate.stages.dedup_minhash  # noqa: F401
import curate.stages.dedup_phash  # noqa: F401
import curate.stages.dedup_semantic  # noqa: F401
import curate.stages.download  # noqa: F401
import curate.stages.image_hash  # noqa: F401
import curate.stages.image_rules  # noqa: F401
import curate.stages.language  # noqa: F401
import curate.stages.mlm_filter  # noqa: F401
import curate.stages.pack  # noqa: F401
import curate.stages.recaption  # noqa: F401
from curate.stages import caption_length, clip_score, dedup_exact, keep_fraction  # noqa: F401
from curate.stages.base import (
    REGISTRY,
    GlobalStage,
    Resources,
    Stage,
    StageConfig,
    StageResult,
    register,
)

__all__ = ["REGISTRY", "GlobalStage", "Resources", "Stage", "StageConfig", "StageResult", "register"]
