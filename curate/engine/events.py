"""What the engine tells whoever watches a run (the CLI draws it; a notebook may log it).

The engine calls ``on_progress(event)`` from the driver's thread; a slow callback
slows the driver, so renderers only record and redraw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseStarted:
    phase: int  # 0-based
    phases: int
    shards: int
    #: input rows expected in this phase, when the source knows them up front
    rows: int | None
    stages: tuple[str, ...]


@dataclass(frozen=True)
class RowsDone:
    """Rows that reached the end of a phase (stored in part files) since the last event."""

    phase: int
    rows: int
    kept: int


@dataclass(frozen=True)
class PhaseEnded:
    phase: int
    seconds: float


@dataclass(frozen=True)
class GlobalsDone:
    """The global stages after a phase decided (dedup clusters, fraction thresholds)."""

    phase: int
    stages: tuple[str, ...]
    seconds: float


Event = PhaseStarted | RowsDone | PhaseEnded | GlobalsDone
OnProgress = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default watcher: nobody."""
