"""Stages: one file each, found by :mod:`curate.stages.registry` (``use: <name>`` in a recipe).

The contract is in :mod:`curate.stages.base`; importing this package imports no stage.
"""

from curate.stages.base import GlobalStage, Resources, Stage, StageConfig, StageContext, StageResult
from curate.stages.registry import register, stage_class, stage_classes

__all__ = ["GlobalStage", "Resources", "Stage", "StageConfig", "StageContext", "StageResult", "register",
           "stage_class", "stage_classes"]
