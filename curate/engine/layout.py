"""Where a run's files live under the output root, the fingerprint guard, and what is still to do.

::

    OUT/
      manifest.json  stats.json  report.html
      webdataset/NNNNN.tar  parquet/NNNNN.parquet  packed/…  ledger/NNNNN.parquet
      shard_stats/NNNNN_stats.json          img2dataset's per-shard stats
      _done/NNNNN.json                      a finalized shard (written last: what resume trusts)
      _work/recipe.json                     the recipe's fingerprint (another recipe is refused)
      _work/plan.json                       the input shards, planned once
      _work/pK/NNNNN.json, _work/pK/parts/  phase K's committed shards and their part files
      _work/gK/NAME.parquet                 the decisions of the global stages after phase K
      _work/source_errors/NNNNN.json        input shards that could not be read this run
      _work/stages/NAME/                    a stage's own state (VLM replies for resume)

Any fsspec URL works as the root.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from curate.errors import NO_SPACE_ERRNOS, NoSpaceError, OutputError
from curate.fsutil import TEMP_NAME, write_json

WORK = "_work"
DONE = "_done"
SOURCE_ERRORS = "source_errors"

log = logging.getLogger(__name__)


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn a full disk or quota while writing ``path`` into an error that names it.

    The OSError itself says only "No space left on device", not where; the writers use
    ``atomic_open``, so the half-written file is already gone when this fires.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        raise NoSpaceError(
            f"{path}: no space left on the output's storage ({e.strerror or e}); nothing partial was committed. "
            "Free space (or pick another -o) and re-run the same command: it resumes from the committed shards"
        ) from e


@dataclass
class ShardMarker:
    """A shard committed by a phase: its row count, its part files, the seconds each stage spent."""

    shard: int
    rows: int
    parts: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardMarker:
        return cls(shard=d["shard"], rows=d["rows"], parts=list(d["parts"]), seconds=dict(d.get("seconds", {})))


class Layout:
    """Where everything lives under the output root (any fsspec URL)."""

    def __init__(self, output: str) -> None:
        self.root = output.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def work(self, *parts: str) -> str:
        return self.path(WORK, *parts)

    def phase_dir(self, phase: int) -> str:
        return self.work(f"p{phase}")

    def parts_dir(self, phase: int) -> str:
        return self.work(f"p{phase}", "parts")

    def decisions_dir(self, phase: int) -> str:
        return self.work(f"g{phase}")

    def stage_dir(self, stage: str) -> str:
        return self.work("stages", stage)

    def marker(self, phase: int, shard: int) -> str:
        return self.work(f"p{phase}", f"{shard:05d}.json")

    def done(self, shard: int) -> str:
        return self.path(DONE, f"{shard:05d}.json")

    def source_errors(self) -> str:
        return self.work(SOURCE_ERRORS)

    def source_error(self, shard: int) -> str:
        return self.work(SOURCE_ERRORS, f"{shard:05d}.json")

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def write_json(self, path: str, data: Any) -> None:
        with writing(path):
            write_json(path, data)

    def read_marker(self, phase: int, shard: int) -> ShardMarker:
        return ShardMarker.from_json(self.read_json(self.marker(phase, shard)))

    def write_marker(self, phase: int, marker: ShardMarker) -> None:
        self.write_json(self.marker(phase, marker.shard), asdict(marker))

    def listdir_names(self, path: str) -> list[str]:
        try:
            return [p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def shards_in(self, path: str) -> set[int]:
        """Shard numbers of the ``NNNNN.json`` markers in a folder."""
        return {int(n[:-5]) for n in self.listdir_names(path) if n.endswith(".json") and n[:-5].isdigit()}


def prepare_output(layout: Layout, *, fingerprint: str, resolved: dict[str, Any], overwrite: bool) -> None:
    """Make the output ready: new, or a run of the same recipe to resume; anything else is refused."""
    fp_path = layout.work("recipe.json")
    fs = layout.fs
    if layout.exists(layout.root) and layout.listdir_names(layout.root):
        if overwrite:
            for p in fs.ls(layout.root, detail=False):
                fs.rm(p, recursive=True)
        elif not layout.exists(fp_path):
            raise OutputError(
                f"output {layout.root} is not empty and holds no curate run; choose another -o or pass --overwrite")
        else:
            old = layout.read_json(fp_path).get("fingerprint")
            if old != fingerprint:
                raise OutputError(
                    f"output {layout.root} holds a run of a different recipe (fingerprint {old} vs {fingerprint}); "
                    "pass --overwrite to replace it, or choose another -o")
            remove_stale_temps(layout)
    fs.makedirs(layout.work(), exist_ok=True)
    if not layout.exists(fp_path):
        layout.write_json(fp_path, {"fingerprint": fingerprint, "recipe": resolved})


def remove_stale_temps(layout: Layout) -> int:
    """Before a run resumes: remove the files a killed run was still writing (they never got their final
    name, so nothing trusts them, and the shard they belong to is written again). Returns how many."""
    stale = [p for p in layout.fs.find(layout.root) if TEMP_NAME.search(p)]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            layout.fs.rm(p)
    if stale:
        log.info("removed %d temporary files a stopped run left in %s", len(stale), layout.root)
    return len(stale)


@dataclass
class Pending:
    """What a phase still has to do: shards to run, and shards committed but not finalized."""

    to_run: list[dict[str, Any]]
    finalize_only: list[dict[str, Any]]

    def __bool__(self) -> bool:
        return bool(self.to_run or self.finalize_only)


def pending(layout: Layout, *, phase: int, final: bool, specs: list[dict[str, Any]]) -> Pending:
    """The shards of ``specs`` that phase ``phase`` has not finished (nothing once every shard is done)."""
    done = layout.shards_in(layout.path(DONE))
    if len(done) >= len(specs) and all(s["shard"] in done for s in specs):
        return Pending([], [])
    committed = layout.shards_in(layout.phase_dir(phase))
    to_run = [s for s in specs if s["shard"] not in committed]
    # A shard committed in the final phase only needs finalizing (a crash hit between the two).
    finalize_only = [s for s in specs if final and s["shard"] in committed and s["shard"] not in done]
    return Pending(to_run, finalize_only)
