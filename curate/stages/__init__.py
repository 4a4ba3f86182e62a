"""Stages by name. Importing this package registers every built-in stage."""

from curate.stages import caption_length, dedup_exact  # noqa: F401
from curate.stages.base import REGISTRY, GlobalStage, Resources, Stage, StageConfig, StageResult, register

__all__ = ["REGISTRY", "GlobalStage", "Resources", "Stage", "StageConfig", "StageResult", "register"]
