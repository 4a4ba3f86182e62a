"""The run's progress as a person reads it: a bar per phase on a terminal, a line now and then in a log.

On a terminal (``tty=True``): a rich bar per phase with rows done of rows expected,
rows/s, kept and dropped so far, and the time left. Elsewhere (CI logs, ``nohup``,
a pipe): one plain line every ``interval`` seconds (15 by default) and one when a
phase ends, so a long run shows it is alive without flooding the log.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from curate.engine.events import Event, GlobalsDone, PhaseEnded, PhaseStarted, RowsDone

#: Seconds between two progress lines when the output is not a terminal.
LOG_INTERVAL_S = 15.0


class ProgressView:
    """Draws engine events (:mod:`curate.engine.events`); call it with each event, ``close()`` at the end."""

    def __init__(self, *, tty: bool, stream: IO[str] | None = None, interval: float = LOG_INTERVAL_S) -> None:
        self.tty = tty
        self.stream = stream or sys.stderr
        self.interval = interval
        self._bar = None
        self._task = None
        self._phase: PhaseStarted | None = None
        self._rows = self._kept = 0
        self._t0 = self._last_line = 0.0

    def __call__(self, event: Event) -> None:
        if isinstance(event, PhaseStarted):
            self._start(event)
        elif isinstance(event, RowsDone):
            self._rows += event.rows
            self._kept += event.kept
            if self._bar is not None:
                self._bar.update(self._task, advance=event.rows, kept=self._kept, dropped=self._rows - self._kept)
            elif not self.tty and time.monotonic() - self._last_line >= self.interval:
                self._line()
        elif isinstance(event, PhaseEnded):
            if self._bar is not None:
                self._bar.update(self._task, total=self._rows, completed=self._rows)  # size unknown up front
                self._bar.stop()
                self._bar = None
            else:
                self._line(done=True)
        elif isinstance(event, GlobalsDone):
            self._print(f"global stages after phase {event.phase + 1} ({', '.join(event.stages)}): "
                        f"{event.seconds:.1f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ------------------------------------------------------------ internals

    def _title(self) -> str:
        p = self._phase
        assert p is not None
        stages = ", ".join(p.stages) if p.stages else "finalize"
        return f"phase {p.phase + 1}/{p.phases} ({stages})"

    def _start(self, event: PhaseStarted) -> None:
        self.close()
        self._phase = event
        self._rows = self._kept = 0
        self._t0 = self._last_line = time.monotonic()
        if not self.tty:
            self._print(f"{self._title()}: {event.shards} shard(s)"
                        + (f", {event.rows:,} rows" if event.rows else ""))
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RowsPerSecond(ProgressColumn):
            def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
                elapsed = task.elapsed or 0.0
                speed = task.completed / elapsed if elapsed > 0 and task.completed else None
                return Text(f"{speed:,.0f} rows/s" if speed else "- rows/s", style="progress.data.speed")

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            RowsPerSecond(), TextColumn("kept {task.fields[kept]:,}  dropped {task.fields[dropped]:,}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
        self._bar.start()
        self._task = self._bar.add_task(self._title(), total=event.rows, kept=0, dropped=0)

    def _line(self, done: bool = False) -> None:
        if self._phase is None:
            return
        now = time.monotonic()
        self._last_line = now
        elapsed = max(now - self._t0, 1e-9)
        rate = self._rows / elapsed
        total = self._phase.rows
        parts = [f"{self._rows:,}" + (f"/{total:,} rows ({100 * self._rows / total:.1f} %)" if total else " rows"),
                 f"{rate:,.0f} rows/s", f"kept {self._kept:,}", f"dropped {self._rows - self._kept:,}"]
        if done:
            parts.append(f"done in {elapsed:.1f}s")
        elif total and rate > 0:
            parts.append(f"ETA {max(total - self._rows, 0) / rate:.0f}s")
        self._print(f"{self._title()}: " + ", ".join(parts))

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
